"""The sampler: a deterministic, resumable, data-parallel order over one or more token stores.

Sources are (store, optional language subset, weight). A source is drawn in proportion to its size times its
weight, so weight 1 everywhere visits every window once per epoch and weight 2 upsamples a language twice.
The blend is decided one global sample at a time by the largest deficit (``share * (g + 1) - drawn``), as
Megatron's blended dataset does; within a source, the k-th draw is window ``perm[k mod n]`` of a permutation
seeded by (seed, source, epoch). Everything follows from a few integers, the :class:`SamplerState`, so a resumed
run sees exactly the samples an uninterrupted one would have.

A global batch of ``global_batch_size`` consecutive samples is cut into ``dp_size`` contiguous slices; data-parallel
rank r reads slice r. Tensor-parallel ranks of one data-parallel group use the same ``dp_rank`` and so read the
same batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.config import option
from data_pipeline.languages import get_language
from data_pipeline.packing import document_ids, position_ids
from data_pipeline.store import StoreError, TokenStore


@dataclass
class SourceConfig:
    """One source of a blend."""

    path: str = option("", "token store directory")
    weight: float = option(1.0, "upsampling factor: the source is drawn in proportion to its size times this")
    languages: list[str] = option([], "only windows of these languages (empty: all)")

    def validate(self) -> None:
        if not self.path:
            raise ValueError("sources[].path: give the token store directory")
        if self.weight <= 0:
            raise ValueError(f"sources[].weight ({self.weight}) must be positive (drop the source instead)")


@dataclass
class SamplerConfig:
    """How training reads token stores."""

    sources: list[SourceConfig] = option([], "stores (and language subsets) to blend")
    seed: int = option(1234, "seed of the shuffle")
    global_batch_size: int = option(8, "samples per optimizer step across all data-parallel ranks")
    verify_checksums: bool = option(True, "check every shard's SHA-256 when a store is opened")

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("sources: give at least one token store")
        if self.global_batch_size < 1:
            raise ValueError(f"global_batch_size ({self.global_batch_size}) must be at least 1")


@dataclass
class SamplerState:
    """All a checkpoint needs to resume the data order exactly."""

    seed: int
    consumed_samples: int = 0
    source_counts: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "consumed_samples": self.consumed_samples, "source_counts": list(self.source_counts)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplerState:
        return cls(int(d["seed"]), int(d["consumed_samples"]), [int(c) for c in d["source_counts"]])


class _Source:
    def __init__(self, index: int, store: TokenStore, cfg: SourceConfig) -> None:
        self.index, self.store = index, store
        if cfg.languages:
            ids = [get_language(name).id for name in cfg.languages]
            self.windows = np.flatnonzero(np.isin(store.languages, ids))
        else:
            self.windows = np.arange(len(store))
        if len(self.windows) == 0:
            raise StoreError(f"{store.path}: no windows of languages {cfg.languages}")
        self._epoch = -1
        self._perm = self.windows

    def window(self, seed: int, k: int) -> int:
        """The store index of this source's k-th draw."""
        n = len(self.windows)
        epoch = k // n
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64([seed, self.index, epoch]))
            self._perm = self.windows[rng.permutation(n)]
            self._epoch = epoch
        return int(self._perm[k % n])


class DataSampler:
    """Yields this data-parallel rank's slice of every global batch, as numpy arrays."""

    def __init__(self, cfg: SamplerConfig, dp_rank: int = 0, dp_size: int = 1, state: SamplerState | None = None) -> None:
        if cfg.global_batch_size % dp_size:
            raise ValueError(f"global_batch_size ({cfg.global_batch_size}) must be a multiple of the data-parallel "
                             f"size ({dp_size})")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size ({dp_size}))")
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        stores: dict[str, TokenStore] = {}
        self.sources = []
        for i, sc in enumerate(cfg.sources):
            key = str(Path(sc.path).resolve())
            if key not in stores:
                stores[key] = TokenStore(sc.path, verify=cfg.verify_checksums)
            self.sources.append(_Source(i, stores[key], sc))
        windows = {s.store.window for s in self.sources}
        if len(windows) > 1:
            raise StoreError(f"stores of different window sizes {sorted(windows)} cannot be blended")
        self.window = windows.pop()
        sizes = np.array([len(s.windows) * sc.weight for s, sc in zip(self.sources, cfg.sources)], dtype=np.float64)
        self.shares = sizes / sizes.sum()
        self.state = state or SamplerState(cfg.seed, 0, [0] * len(self.sources))
        if len(self.state.source_counts) != len(self.sources):
            raise ValueError(f"sampler state has {len(self.state.source_counts)} source counts, config has "
                             f"{len(self.sources)} sources")
        if self.state.seed != cfg.seed:
            raise ValueError(f"sampler state seed ({self.state.seed}) differs from the config's seed ({cfg.seed})")

    @property
    def local_batch_size(self) -> int:
        return self.cfg.global_batch_size // self.dp_size

    def _draw(self) -> tuple[int, int]:
        """The next global sample as (source, store index); advances the state."""
        st = self.state
        g = st.consumed_samples
        deficit = self.shares * (g + 1) - np.asarray(st.source_counts)
        i = int(np.argmax(deficit))  # ties go to the first source
        idx = self.sources[i].window(st.seed, st.source_counts[i])
        st.source_counts[i] += 1
        st.consumed_samples += 1
        return i, idx

    def next_indices(self) -> list[tuple[int, int]]:
        """This rank's (source, store index) pairs of the next global batch; every rank advances the same state."""
        batch = [self._draw() for _ in range(self.cfg.global_batch_size)]
        lo = self.dp_rank * self.local_batch_size
        return batch[lo:lo + self.local_batch_size]

    def next_batch(self) -> dict[str, np.ndarray]:
        picks = self.next_indices()
        batch = collate([self.sources[s].store[i] for s, i in picks])
        batch["sample_keys"] = np.array(picks, dtype=np.int64).reshape(-1, 2)  # (B, 2): source, store index
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.state.to_dict()


def collate(samples: list[Any]) -> dict[str, np.ndarray]:
    """Stack samples into a batch with everything the trainer needs for per-document attention and the loss.

    tokens (B, W) int64; position_ids and document_ids (B, W) int32, restarting at each document start;
    num_tokens (B,) int32 (positions past it are padding); modality (B, W) uint8 when the store has it.
    """
    w = len(samples[0].tokens)
    batch = {
        "tokens": np.stack([s.tokens for s in samples]).astype(np.int64),  # (B, W)
        "position_ids": np.stack([position_ids(s.doc_starts, w) for s in samples]),  # (B, W)
        "document_ids": np.stack([document_ids(s.doc_starts, w) for s in samples]),  # (B, W)
        "num_tokens": np.array([s.num_tokens for s in samples], dtype=np.int32),  # (B,)
    }
    if samples[0].modality is not None:
        batch["modality"] = np.stack([s.modality for s in samples])  # (B, W)
    return batch
