"""Model checkpoints: tensor-parallel shards in safetensors beside a JSON manifest; resharding to any TP size.

Layout::

    DIR/manifest.json                  format, model config, TP size, step, tokenizer, git revision, tensor specs
    DIR/model-tp00-of-02.safetensors   one file per tensor-parallel rank

A directory of checkpoints names its newest in a ``latest`` file (:func:`latest_pointer`, :func:`point_latest`):
training writes one under its checkpoint root (:mod:`megatron_code.train_checkpoint`).

A tensor's spec gives its full shape and the dimension it is split along (None: replicated). Loading into another
TP size reads, for each rank, only the slices it needs (safetensors reads slices without loading whole files).
Nothing is ever unpickled: tensors come from safetensors, metadata from JSON.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from common.config import load_config, to_dict
from common.contracts import (
    MANIFEST,
    CheckpointManifest,
    PairLayout,
    TensorSpec,
    TokenizerRecord,
    load_checkpoint_manifest,
    write_manifest,
)
from common.io import write_text_atomic
from common.revision import git_revision
from megatron_code.config import ModelConfig
from megatron_code.model import CodeGeeXModel
from megatron_code.parallel import ParallelContext

LATEST = "latest"  # the pointer file's name


def shard_name(rank: int, tp: int) -> str:
    return f"model-tp{rank:02d}-of-{tp:02d}.safetensors"


def tensor_specs(model: CodeGeeXModel) -> dict[str, TensorSpec]:
    """name -> full shape and the dimension split across tensor-parallel ranks (None: replicated)."""
    specs = {}
    for name, p in model.named_parameters():
        dim = getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None
        shape = list(p.shape)
        if dim is not None:
            shape[dim] *= model.pc.tp_size
        specs[name] = TensorSpec(shape=shape, partition_dim=dim)
    return specs


def new_manifest(cfg: ModelConfig, tensors: dict[str, TensorSpec], tp_size: int, step: int = 0,
                 tokenizer: TokenizerRecord | None = None, pairs: PairLayout | None = None,
                 objective: str | None = None, converted_from: str | None = None) -> CheckpointManifest:
    """The one place a checkpoint manifest is put together (training, conversion)."""
    return CheckpointManifest(model=to_dict(cfg), tp_size=tp_size, step=step, git_revision=git_revision(),
                              tensors=tensors, tokenizer=tokenizer, pairs=pairs, objective=objective,
                              converted_from=converted_from)


def save_checkpoint(path: str | Path, model: CodeGeeXModel, step: int = 0, tokenizer: TokenizerRecord | None = None,
                    pairs: PairLayout | None = None, objective: str | None = None) -> None:
    """Write this rank's shard (data-parallel rank 0 of each TP group) and, on global rank 0, the manifest."""
    path = Path(path)
    pc = model.pc
    if pc.dp_rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.named_parameters()}
        save_file(state, str(path / shard_name(pc.tp_rank, pc.tp_size)))
    if pc.rank == 0:
        write_manifest(path, new_manifest(model.cfg, tensor_specs(model), pc.tp_size, step, tokenizer, pairs,
                                          objective))


def latest_pointer(root: Path) -> Path | None:
    """The directory ``root``'s ``latest`` pointer names, or None when there is no pointer or no such directory."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def point_latest(root: Path, name: str) -> None:
    """Make ``root``'s ``latest`` pointer name ``name`` (written beside it, then renamed over it: never half-written)."""
    write_text_atomic(root / LATEST, name + "\n")


def resolve_model_dir(path: str | Path) -> Path:
    """The model directory of a model directory, a training step directory (``step-N/model``), a checkpoint root or
    a run directory (the last two through their ``latest`` pointer)."""
    p = Path(path)
    for root in (p, p / "checkpoints"):
        latest = latest_pointer(root)
        if latest is not None:
            p = latest
            break
    for candidate in (p, p / "model"):
        if (candidate / MANIFEST).is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no checkpoint there (a model, step-N, checkpoints or run directory)")


def read_manifest(path: str | Path) -> CheckpointManifest:
    return load_checkpoint_manifest(path)


def model_config(manifest: CheckpointManifest) -> ModelConfig:
    return load_config(ModelConfig, values=manifest.model)


def _slice(spec: TensorSpec, old_tp: int, new_tp: int, rank: int,
           read: Callable[[int, tuple[slice, ...]], Tensor]) -> Tensor:
    """Rank ``rank``'s piece under ``new_tp`` of a tensor stored as ``old_tp`` shards; read(shard, index)."""
    dim = spec.partition_dim
    if dim is None:
        return read(0, ())
    full = spec.shape[dim]
    for tp in (old_tp, new_tp):
        if full % tp:
            raise ValueError(f"dimension {dim} of size {full} cannot be split {tp} ways")
    old_part, new_part = full // old_tp, full // new_tp
    lo, hi = rank * new_part, (rank + 1) * new_part
    pieces = []
    for k in range(lo // old_part, (hi - 1) // old_part + 1):
        a, b = max(lo, k * old_part) - k * old_part, min(hi, (k + 1) * old_part) - k * old_part
        index = tuple(slice(None) for _ in range(dim)) + (slice(a, b),)
        pieces.append(read(k, index))
    return torch.cat(pieces, dim=dim) if len(pieces) > 1 else pieces[0]


def reshard(shards: list[dict[str, Tensor]], specs: dict[str, TensorSpec], new_tp: int) -> list[dict[str, Tensor]]:
    """In-memory resharding of full sets of shards (works on the meta device)."""
    old_tp = len(shards)

    def reader(name: str) -> Callable[[int, tuple[slice, ...]], Tensor]:
        return lambda k, idx: shards[k][name][idx]

    return [{name: _slice(spec, old_tp, new_tp, r, reader(name)) for name, spec in specs.items()} for r in range(new_tp)]


def load_shard(path: str | Path, tp_rank: int, tp_size: int) -> dict[str, Tensor]:
    """The state of rank ``tp_rank`` under ``tp_size``, reading only the slices it needs."""
    path = Path(path)
    manifest = read_manifest(path)
    old_tp = manifest.tp_size
    handles = [safe_open(str(path / shard_name(k, old_tp)), framework="pt") for k in range(old_tp)]

    def reader(name: str) -> Callable[[int, tuple[slice, ...]], Tensor]:
        return lambda k, idx: handles[k].get_slice(name)[idx] if idx else handles[k].get_tensor(name)

    return {name: _slice(spec, old_tp, tp_size, tp_rank, reader(name)) for name, spec in manifest.tensors.items()}


def load_checkpoint(path: str | Path, model: CodeGeeXModel) -> CheckpointManifest:
    """Load weights into ``model`` (any TP size); returns the manifest."""
    manifest = read_manifest(path)
    mine = model_config(manifest)
    if to_dict(mine) != to_dict(model.cfg):
        diff = {k: (v, to_dict(model.cfg)[k]) for k, v in to_dict(mine).items() if to_dict(model.cfg)[k] != v}
        raise ValueError(f"{path}: checkpoint's model config differs from the model's: {diff}")
    load_parameters(model, load_shard(path, model.pc.tp_rank, model.pc.tp_size), str(path))
    return manifest


def load_parameters(model: CodeGeeXModel, state: dict[str, Tensor], source: str) -> None:
    """Copy ``state`` into the model's parameters; every parameter must be there with its shape, nothing else."""
    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"{source}: tensors do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(f"{source}: {name} has shape {tuple(state[name].shape)}, the model wants {tuple(p.shape)}")
            p.copy_(state[name])


def load_model(path: str | Path, pc: ParallelContext) -> CodeGeeXModel:
    """Build the model a checkpoint describes, for this parallel context, and load it (for inference: without
    sequence parallelism, which a KV cache's one-token steps cannot split)."""
    cfg = model_config(read_manifest(path))
    cfg.sequence_parallel = False
    model = CodeGeeXModel(cfg, pc, initialize=False)
    load_parameters(model, load_shard(path, pc.tp_rank, pc.tp_size), str(path))
    return model


def full_state(path: str | Path) -> tuple[CheckpointManifest, dict[str, Tensor]]:
    """(manifest, the whole model's state at TP=1) without any process group."""
    return read_manifest(path), load_shard(path, 0, 1)


def write_full_state(path: str | Path, manifest: CheckpointManifest, state: dict[str, Tensor], tp: int) -> None:
    """Write a TP=1 state as a ``tp``-way checkpoint (conversion, no process group)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    for r, shard in enumerate(reshard([state], manifest.tensors, tp)):
        save_file({k: v.contiguous() for k, v in shard.items()}, str(path / shard_name(r, tp)))
    write_manifest(path, dataclasses.replace(manifest, tp_size=tp))
