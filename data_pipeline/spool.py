"""Spool files (one per work unit, phase A's output) and phase B: deduplicate, pack, write the store.

A spool is an Arrow IPC file ``.work/unit-NNNNNN.arrow`` with one row per accepted document: language, content
hash, MinHash signature and LSH band keys, the matched benchmark item (or null), its tokens and modality. The
unit is done when its stats file ``unit-NNNNNN.json`` exists (written after the spool, both atomically).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from common.config import from_mapping
from common.contracts import LanguageCounts, PairLayout, StoreManifest, TokenizerRecord
from common.io import write_json_atomic
from data_pipeline.config import BuildConfig
from data_pipeline.dedup import exact_duplicates, near_duplicates
from data_pipeline.documents import Document
from data_pipeline.filters import SKIP_REASONS
from data_pipeline.languages import LANGUAGES
from data_pipeline.packing import Packer
from data_pipeline.store import ShardWriter


def _paths(work: Path, index: int) -> tuple[Path, Path]:
    return work / f"unit-{index:06d}.arrow", work / f"unit-{index:06d}.json"


def spool_done(work: Path, index: int) -> bool:
    return _paths(work, index)[1].exists()


def unit_stats(work: Path, index: int) -> dict[str, Any]:
    """The stats a finished unit was spooled with (documents, skips, corrupt inputs)."""
    return dict(json.loads(_paths(work, index)[1].read_text()))


def write_spool(work: Path, index: int, docs: list[Document], tokens: list[tuple[np.ndarray, np.ndarray | None]],
                hashes: list[int], signatures: list[np.ndarray] | None, band_keys: list[np.ndarray] | None,
                contaminated: list[str | None], token_dtype: np.dtype, stats: dict[str, Any]) -> None:
    arrow_path, stats_path = _paths(work, index)
    lengths = np.array([len(t) for t, _ in tokens], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    flat = np.concatenate([t for t, _ in tokens]).astype(token_dtype) if tokens else np.zeros(0, token_dtype)
    mods = [m if m is not None else np.zeros(len(t), np.uint8) for t, m in tokens]
    cols: dict[str, pa.Array] = {
        "language": pa.array([d.language.id for d in docs], type=pa.uint8()),
        "hash": pa.array(hashes, type=pa.uint64()),
        "contaminated": pa.array(contaminated, type=pa.string()),
        "n_bytes": pa.array([d.n_bytes for d in docs], type=pa.int64()),
        "is_pair": pa.array([d.pair is not None for d in docs], type=pa.bool_()),
        "source": pa.array([d.source for d in docs], type=pa.string()),
        "tokens": pa.ListArray.from_arrays(offsets, pa.array(flat)),
        "modality": pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(mods) if mods else np.zeros(0, np.uint8))),
    }
    if signatures is not None and band_keys is not None:
        p, b = (len(signatures[0]), len(band_keys[0])) if signatures else (1, 1)
        sig = np.stack(signatures).reshape(-1) if signatures else np.zeros(0, np.uint32)
        bands = np.stack(band_keys).reshape(-1) if band_keys else np.zeros(0, np.uint32)
        cols["signature"] = pa.FixedSizeListArray.from_arrays(pa.array(sig, type=pa.uint32()), p)
        cols["bands"] = pa.FixedSizeListArray.from_arrays(pa.array(bands, type=pa.uint32()), b)
    table = pa.table(cols)
    tmp = arrow_path.with_name(arrow_path.name + ".tmp")
    with pa.ipc.new_file(str(tmp), table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, arrow_path)
    write_json_atomic(stats_path, stats)


def _open(work: Path, index: int) -> pa.Table:
    """A spool, memory-mapped (drop the table to unmap it)."""
    return pa.ipc.open_file(pa.memory_map(str(_paths(work, index)[0]), "r")).read_all()


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).combine_chunks().to_numpy(zero_copy_only=False)


def _fixed(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name).combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1)


def _scan(work: Path, units: int, near: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Small per-document columns of every spool, one spool mapped at a time: (rows per unit, hashes,
    contaminated, band keys (N, bands) or empty)."""
    rows, hashes, contaminated, bands = [], [], [], []
    for i in range(units):
        t = _open(work, i)
        rows.append(t.num_rows)
        hashes.append(_column(t, "hash"))
        contaminated.append(t.column("contaminated").is_valid().to_numpy(zero_copy_only=False))
        if near and t.num_rows:
            bands.append(np.array(_fixed(t, "bands")))
        del t
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
    return (np.array(rows, dtype=np.int64), cat(hashes, np.uint64), cat(contaminated, bool),
            np.concatenate(bands) if bands else np.zeros((0, 1), np.uint32))


def _duplicates(cfg: BuildConfig, work: Path, rows: np.ndarray, hashes: np.ndarray,
                bands: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(hashes)
    exact = exact_duplicates(hashes) if cfg.dedup.exact else np.zeros(n, dtype=bool)
    if not cfg.dedup.near or n == 0:
        return exact, np.zeros(n, dtype=bool)
    starts = np.concatenate([[0], np.cumsum(rows)])
    opened: dict[int, np.ndarray] = {}

    def signature(i: int) -> np.ndarray:
        unit = int(np.searchsorted(starts, i, side="right") - 1)
        if unit not in opened:
            if len(opened) >= 8:  # a few spools mapped at a time
                opened.clear()
            opened[unit] = _fixed(_open(work, unit), "signature")
        return opened[unit][i - starts[unit]]

    near = near_duplicates(lambda b: bands[:, b], cfg.dedup.bands, signature, cfg.dedup.threshold, exact)
    return exact, near & ~exact


def merge_spools(cfg: BuildConfig, work: Path, state: dict[str, Any], progress: Callable[..., Any]) -> StoreManifest:
    """Phase B over every spool, in unit order; returns the manifest (without command and config)."""
    skips: Counter[str] = Counter(state["enumeration_skips"])
    for i in range(state["units"]):
        skips.update(json.loads(_paths(work, i)[1].read_text())["skips"])
    rows, hashes, contaminated, bands = _scan(work, state["units"], cfg.dedup.near)
    exact, near = _duplicates(cfg, work, rows, hashes, bands)
    contaminated &= ~(exact | near)
    skips.update(exact_duplicate=int(exact.sum()), near_duplicate=int(near.sum()), contaminated=int(contaminated.sum()))
    keep = ~(exact | near | contaminated)

    tok = state["tokenizer"]
    window = cfg.pack.seq_len + 1
    with_modality = cfg.extract.functions
    token_dtype = np.dtype(tok["token_dtype"])
    per_shard = max(1, int(cfg.pack.shard_mb * 2**20 / (window * (token_dtype.itemsize + int(with_modality)))))
    writer = ShardWriter(Path(cfg.output), window, token_dtype, with_modality, per_shard)
    packers = [Packer(window, lang.id, tok["pad_id"], writer.add, cfg.pack.mode, with_modality, cfg.pack.open_windows)
               for lang in LANGUAGES]
    docs: Counter[str] = Counter()
    pairs: Counter[str] = Counter()
    ntok: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    examples: list[dict[str, str]] = []
    row = 0
    for unit in progress(range(state["units"]), desc="dedup, pack, write", unit="unit"):
        t = _open(work, unit)
        lang = _column(t, "language")
        col = t.column("tokens").combine_chunks()
        offsets, values = col.offsets.to_numpy(), col.values.to_numpy(zero_copy_only=False)
        mcol = t.column("modality").combine_chunks().values.to_numpy(zero_copy_only=False)
        is_pair, n_bytes = _column(t, "is_pair"), _column(t, "n_bytes")
        for r in range(t.num_rows):
            g = row + r
            if contaminated[g] and len(examples) < 20:
                examples.append({"source": t.column("source")[r].as_py(), "item": t.column("contaminated")[r].as_py()})
            if not keep[g]:
                continue
            name = LANGUAGES[lang[r]].name
            a, b = offsets[r], offsets[r + 1]
            packers[lang[r]].add(values[a:b], mcol[a:b] if with_modality else None)
            docs[name] += 1
            pairs[name] += int(is_pair[r])
            ntok[name] += int(b - a)
            nbytes[name] += int(n_bytes[r])
        row += t.num_rows
        del t, col, offsets, values, mcol  # unmap before the next spool
    for p in packers:
        p.flush()
    shards = writer.close()
    total_windows = sum(p.windows for p in packers)
    padding = sum(p.padding for p in packers)
    languages = {LANGUAGES[p.language].name: LanguageCounts(
        documents=docs[LANGUAGES[p.language].name], pairs=pairs[LANGUAGES[p.language].name],
        tokens=ntok[LANGUAGES[p.language].name], bytes=nbytes[LANGUAGES[p.language].name], windows=p.windows)
        for p in packers if p.windows}
    columns = ["tokens", "doc_starts", "num_tokens", "language"] + (["modality"] if with_modality else [])
    return StoreManifest(
        seq_len=cfg.pack.seq_len, window=window, token_dtype=token_dtype.name, columns=columns,
        pack_mode=cfg.pack.mode, tokenizer=from_mapping(TokenizerRecord, tok),
        pairs=PairLayout(order=cfg.extract.pair_order, normalize_whitespace=cfg.extract.normalize_whitespace)
        if with_modality else None,
        total_windows=total_windows, total_documents=int(keep.sum()), total_tokens=int(sum(ntok.values())),
        padding_fraction=padding / max(1, total_windows * window), languages=languages,
        skips={r: int(skips.get(r, 0)) for r in SKIP_REASONS},
        dedup={"exact": cfg.dedup.exact, "near": cfg.dedup.near, "num_perm": cfg.dedup.num_perm,
               "ngram": cfg.dedup.ngram, "bands": cfg.dedup.bands, "threshold": cfg.dedup.threshold},
        contaminated_examples=examples, shards=shards, identity=state["identity"])
