"""Model checkpoints: tensor-parallel shards in safetensors beside a JSON manifest; resharding to any TP size.

Layout::

    DIR/manifest.json                  format, model config, TP size, step, tokenizer, git revision, tensor specs
    DIR/model-tp00-of-02.safetensors   one file per tensor-parallel rank
    DIR/tokenizer.model                the SentencePiece model (and tokenizer.vocab), when the trainer knew it
    DIR/tokenizer/                     or the byte-level BPE directory's files (CodeGeeX's tokenizer)

The manifest names the tokenizer relative to DIR, so a checkpoint works from any directory and after a move. Every
file is written 0644 and every folder 0755 whatever the umask: a checkpoint is readable by the group.

A directory of checkpoints names its newest in a ``latest`` file (:func:`latest_pointer`, :func:`point_latest`):
training writes one under its checkpoint root (:mod:`megatron_code.train_checkpoint`). Every command taking a
checkpoint finds its model directory through :func:`resolve_model_dir`.

A tensor's spec gives its full shape and the dimension it is split along (None: replicated). Loading into another
TP size reads, for each rank, only the slices it needs (safetensors reads slices without loading whole files).
Nothing is ever unpickled: tensors come from safetensors, metadata from JSON.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from common.config import load_config, to_dict
from common.contracts import (
    BPE_CARRIED,
    MANIFEST,
    CheckpointManifest,
    PairLayout,
    TensorSpec,
    TokenizerRecord,
    load_checkpoint_manifest,
    tokenizer_sha256,
    write_manifest,
)
from common.integrity import FileRecord, list_files, my_share, record, require, trust, verify
from common.io import DIR_MODE, FILE_MODE, make_shared, write_bytes_atomic, write_text_atomic
from common.revision import git_revision
from megatron_code.config import ModelConfig
from megatron_code.model import CodeGeeXModel
from megatron_code.parallel import ParallelContext

log = logging.getLogger("codegeex.model")

LATEST = "latest"  # the pointer file's name
TOKENIZER_FILE = "tokenizer.model"  # the tokenizer's copy in a model directory (its .vocab beside it as tokenizer.vocab)
TOKENIZER_DIR = "tokenizer"  # a byte-level BPE tokenizer's copy (vocab.json, merges.txt, added_tokens.json, configs)
EXPECTED = ("a model directory (with manifest.json), a step-N directory (with model/), or a checkpoints or run "
            "directory (with a latest pointer or step-N directories)")


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
                    pairs: PairLayout | None = None, objective: str | None = None, seal: bool = True) -> None:
    """Write this rank's shard (data-parallel rank 0 of each TP group) and, on global rank 0, the manifest and a copy
    of the tokenizer (:func:`carry_tokenizer`: ``tokenizer.path`` is absolute or relative to the working directory).
    Every rank calls it. ``seal``: then record every file's size and digest in the manifest (after a barrier, on
    rank 0); the trainer seals its checkpoints itself, with digests computed by the ranks that wrote the files."""
    path = Path(path)
    pc = model.pc
    if pc.dp_rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(DIR_MODE)
        state = {k: v.detach().cpu().contiguous() for k, v in model.named_parameters()}
        shard = path / shard_name(pc.tp_rank, pc.tp_size)
        save_file(state, str(shard))
        shard.chmod(FILE_MODE)
    if pc.rank == 0:
        record = carry_tokenizer(path, tokenizer)
        write_manifest(path, new_manifest(model.cfg, tensor_specs(model), pc.tp_size, step, record, pairs, objective),
                       FILE_MODE)
    if seal:
        if pc.world_size > 1:
            torch.distributed.barrier()
        if pc.rank == 0:
            seal_model_dir(path)


def carry_tokenizer(directory: Path, record: TokenizerRecord | None,
                    source: str | Path | None = None) -> TokenizerRecord | None:
    """Copy the tokenizer ``source`` (default: the one ``record`` names, absolute or relative to the working
    directory) into ``directory``: a SentencePiece model as ``tokenizer.model`` (its ``.vocab`` beside it as
    ``tokenizer.vocab`` when there is one), a BPE directory's files into ``tokenizer/``. Returns the record naming
    the copy (relative to ``directory``) with its fingerprint. When there is no such tokenizer, or its fingerprint is
    not the recorded one, nothing is copied and the record is returned as it is (with a warning: generation will
    look for the recorded path, or need --tokenizer)."""
    if record is None or not (source or record.path):
        return record
    src = Path(source or record.path)
    if not (src.is_file() or src.is_dir()):
        log.warning("%s: tokenizer %s not found; the checkpoint does not carry it", directory, src)
        return record
    digest = tokenizer_sha256(src)
    if record.sha256 and record.sha256 != digest:
        log.warning("%s: tokenizer %s has sha256 %s, not the recorded %s; the checkpoint does not carry it",
                    directory, src, digest, record.sha256)
        return record
    if src.is_dir():
        (directory / TOKENIZER_DIR).mkdir(exist_ok=True, mode=DIR_MODE)
        (directory / TOKENIZER_DIR).chmod(DIR_MODE)
        for name in BPE_CARRIED:
            if (src / name).is_file():
                write_bytes_atomic(directory / TOKENIZER_DIR / name, (src / name).read_bytes(), FILE_MODE)
        return dataclasses.replace(record, path=TOKENIZER_DIR, sha256=digest)
    write_bytes_atomic(directory / TOKENIZER_FILE, src.read_bytes(), FILE_MODE)
    vocab = src.with_suffix(".vocab")
    if vocab.is_file():
        write_bytes_atomic(directory / Path(TOKENIZER_FILE).with_suffix(".vocab"), vocab.read_bytes(), FILE_MODE)
    return dataclasses.replace(record, path=TOKENIZER_FILE, sha256=digest)


def read_pointer(root: Path) -> str | None:
    """The step directory's name ``root``'s ``latest`` pointer holds; None without a pointer, or when it holds no
    ``step-N`` name (empty or garbled, e.g. after a power loss), with a warning."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    if re.fullmatch(r"step-\d+", name) is None:
        log.warning("%s holds %r, not a step directory's name: ignored", pointer, name[:40])
        return None
    return name


def step_number(name: str) -> int:
    """The step of a ``step-N`` (or ``.old-step-N``) directory name."""
    return int(name.rsplit("-", 1)[1])


def latest_pointer(root: Path) -> Path | None:
    """The directory ``root``'s ``latest`` pointer names, or None when there is no pointer or no such directory."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def point_latest(root: Path, name: str) -> None:
    """Make ``root``'s ``latest`` pointer name ``name`` (written beside it, then renamed over it: never half-written)."""
    write_text_atomic(root / LATEST, name + "\n", FILE_MODE)


def _model_in(step: Path) -> Path | None:
    """The model directory of a step directory (``step/model``, or ``step`` itself), or None."""
    for candidate in (step, step / "model"):
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


def _root_model(root: Path) -> Path | None:
    """The model directory a checkpoint root offers: that of the step its ``latest`` names; without a pointer, that
    of its newest ``step-*`` directory holding one (step directories copied without it, or a crash between a first
    save's rename and its pointer); None when it offers neither."""
    name = read_pointer(root)
    steps = sorted((m for d in root.glob("step-*") if (m := _model_in(d)) is not None),
                   key=lambda m: step_number((m if m.name.startswith("step-") else m.parent).name))
    if name is not None:
        model = _model_in(root / name) or _model_in(root / f".old-{name}")  # .old-: a re-save killed mid-way
        if model is not None:
            return model
        older = [m for m in steps if step_number((m if m.name.startswith("step-") else m.parent).name)
                 < step_number(name)]
        if not older:
            raise FileNotFoundError(f"{root}: no checkpoint there: its {LATEST} pointer names {name!r}, which holds no "
                                    f"model directory ({MANIFEST}), and no earlier step directory does")
        log.warning("%s: its %s pointer names %s, which holds no model directory: taking %s, the newest before it",
                    root, LATEST, name, older[-1])
        return older[-1]
    if steps:
        log.info("%s: no %s pointer; taking its newest step directory, %s", root, LATEST, steps[-1])
        return steps[-1]
    return None


def resolve_model_dir(path: str | Path) -> Path:
    """The model directory (the one holding manifest.json) of: a model directory; a step directory (its ``model/``);
    a checkpoint root or a run directory (its ``checkpoints/``), through their ``latest`` pointer, or without one
    their newest step directory. Every command taking a checkpoint resolves it here; FileNotFoundError naming the
    path and what was expected otherwise."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist (expected {EXPECTED})")
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is a file, not a checkpoint (expected {EXPECTED}; a CodeGeeX .pt file "
                                "converts with `codegeex model convert FILE --to native`)")
    model = _model_in(p)
    for root in (p, p / "checkpoints"):
        model = model or _root_model(root)
    if model is None:
        raise FileNotFoundError(f"{p}: no checkpoint there (expected {EXPECTED})")
    return model


def read_manifest(path: str | Path) -> CheckpointManifest:
    return load_checkpoint_manifest(path)


def model_config(manifest: CheckpointManifest) -> ModelConfig:
    return load_config(ModelConfig, values=manifest.model)


def tp_slice(spec: TensorSpec, old_tp: int, new_tp: int, rank: int,
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

    return [{name: tp_slice(spec, old_tp, new_tp, r, reader(name)) for name, spec in specs.items()} for r in range(new_tp)]


def load_shard(path: str | Path, tp_rank: int, tp_size: int) -> dict[str, Tensor]:
    """The state of rank ``tp_rank`` under ``tp_size``, reading only the slices it needs, from shard files checked
    against the manifest's sizes and digests first (:func:`verify_model_files`)."""
    path = Path(path)
    manifest = read_manifest(path)
    old_tp = manifest.tp_size
    # the old shards this rank reads: shard 0 (replicated tensors) and those its slice of a split tensor overlaps
    needed = [k for k in range(old_tp) if k == 0 or (k * tp_size < (tp_rank + 1) * old_tp
                                                     and (k + 1) * tp_size > tp_rank * old_tp)]
    verify_model_files(path, manifest, [shard_name(k, old_tp) for k in needed])
    handles = [safe_open(str(path / shard_name(k, old_tp)), framework="pt") for k in range(old_tp)]

    def reader(name: str) -> Callable[[int, tuple[slice, ...]], Tensor]:
        return lambda k, idx: handles[k].get_slice(name)[idx] if idx else handles[k].get_tensor(name)

    return {name: tp_slice(spec, old_tp, tp_size, tp_rank, reader(name)) for name, spec in manifest.tensors.items()}


_unverified_warned: set[str] = set()


def verify_model_files(path: Path, manifest: CheckpointManifest, names: list[str] | None = None) -> None:
    """Check the model directory's files (``names``, default all) against the sizes and digests its manifest
    lists; CorruptCheckpointError naming each bad file. A manifest from before checksums lists none: a warning."""
    if not manifest.files:
        if str(path) not in _unverified_warned:
            _unverified_warned.add(str(path))
            log.warning("%s: written before checkpoints carried checksums: its files are not verified", path)
        return
    require(path, manifest.files, names)


def verify_together(directory: Path, files: dict[str, FileRecord]) -> list[str]:
    """The problems of ``files`` under ``directory``, found by all ranks together: each verifies every N-th file,
    all get the whole list (every rank calls this). When there are none, every rank trusts them all
    (:func:`common.integrity.trust`), so loading them does not hash them again on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        problems = verify(directory, files)
    else:
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = verify(directory, files, my_share(list(files), rank, world))
        gathered: list[list[str] | None] = [None] * world
        dist.all_gather_object(gathered, mine)
        problems = [p for part in gathered for p in part or []]
    if not problems:
        trust(directory, files)
    return problems


def seal_model_dir(path: Path, records: dict[str, FileRecord] | None = None) -> None:
    """Record every file of model directory ``path`` (but manifest.json) in its manifest with size and digest;
    ``records``: digests already computed (by the ranks that wrote the files), the others are computed here."""
    records = records or {}
    files = {name: records.get(name) or record(path / name) for name in list_files(path, skip=[MANIFEST])}
    write_manifest(path, dataclasses.replace(read_manifest(path), files=files), FILE_MODE)


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


def load_model(path: str | Path, pc: ParallelContext, dtype: str | None = None) -> CodeGeeXModel:
    """Build the model a checkpoint describes, for this parallel context, on its device, and load it (for inference:
    without sequence parallelism, which a KV cache's one-token steps cannot split). ``dtype``: the parameters' dtype
    (float32, bfloat16, float16; ``auto``: bfloat16 on a GPU, float32 on the CPU; None: the checkpoint's)."""
    cfg = model_config(read_manifest(path))
    cfg.sequence_parallel = False
    if dtype == "auto":
        dtype = "bfloat16" if pc.device.type == "cuda" else "float32"
    if dtype is not None:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {dtype!r} must be auto, float32, bfloat16 or float16")
        cfg.params_dtype = dtype  # type: ignore[assignment]  # checked just above
    model = CodeGeeXModel(cfg, pc, initialize=False)
    load_parameters(model, load_shard(path, pc.tp_rank, pc.tp_size), str(path))
    return model


def full_state(path: str | Path) -> tuple[CheckpointManifest, dict[str, Tensor]]:
    """(manifest, the whole model's state at TP=1) without any process group."""
    return read_manifest(path), load_shard(path, 0, 1)


def check_output_dir(path: Path) -> None:
    """Refuse to replace ``path`` unless it is missing, an empty directory or a checkpoint (has manifest.json)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file: a native checkpoint is a directory; choose another output")
    if path.is_dir() and not (path / MANIFEST).is_file() and any(path.iterdir()):
        raise ValueError(f"{path} exists and is not a checkpoint directory (no {MANIFEST}): refusing to replace it; "
                         "choose another output or remove it")


def write_full_state(path: str | Path, manifest: CheckpointManifest, state: dict[str, Tensor], tp: int,
                     tokenizer: str | Path | None = None) -> None:
    """Write a TP=1 state as a ``tp``-way checkpoint in directory ``path`` (conversion, no process group): written
    beside it and renamed, its parents created; a checkpoint already there is replaced, anything else refused
    (:func:`check_output_dir`). ``tokenizer``: the tokenizer file to carry (:func:`carry_tokenizer`, with the
    manifest's record); None: the record is kept as it is."""
    path = Path(path).resolve()
    check_output_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for r, shard in enumerate(reshard([state], manifest.tensors, tp)):
            save_file({k: v.contiguous() for k, v in shard.items()}, str(tmp / shard_name(r, tp)))
        record = manifest.tokenizer if tokenizer is None else carry_tokenizer(tmp, manifest.tokenizer, tokenizer)
        write_manifest(tmp, dataclasses.replace(manifest, tp_size=tp, tokenizer=record))
        seal_model_dir(tmp)
        make_shared(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
