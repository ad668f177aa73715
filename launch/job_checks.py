"""The checks of a training job that need no model: the world the launcher knows against the configuration, the files
the ranks will open, the directories they will write, and the planner's memory per rank against a device.

Each check returns the problems it found, one line each naming both values; :func:`launch.validate.check_job` runs
them all (and the model's shapes on fake process groups) and refuses the job listing every problem at once.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import ConfigError
from common.contracts import MANIFEST, StoreManifest, load_store_manifest
from common.devices import DEVICES, Device

TP_SPLIT = ("num_attention_heads", "hidden_size", "ffn_hidden_size", "vocab_size")  # split by tensor parallelism


def plural(n: int, word: str) -> str:
    """``1 node``, ``4 nodes``; ``8 GPUs``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


class JobRefused(ConfigError):
    """A job that cannot run as configured; ``problems`` has one line per problem."""

    def __init__(self, subject: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{subject}: {plural(len(problems), 'problem')}\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class World:
    """The ranks a launcher will start, as it knows them."""

    size: int  # ranks in all
    per_node: int  # ranks per node
    gpus: bool  # ranks on GPUs: tensor-parallel groups must then stay inside a node
    described: str  # how the size was given, for messages: "4 nodes x 8 GPUs", "--nproc 2"
    per_node_given: str = ""  # what set the ranks per node, for messages: "--gpus-per-node 3" ('' : one node)

    @classmethod
    def of(cls, nodes: int, per_node: int, gpus: bool, described: str, per_node_given: str) -> World:
        """``nodes`` x ``per_node`` ranks; ``per_node_given`` only matters across nodes."""
        return cls(nodes * per_node, per_node, gpus, described, per_node_given if nodes > 1 else "")


def structure_problems(cfg: Any, world: World) -> list[str]:
    """World size and the tensor-parallel splits against tp, TP groups inside a node on GPUs, the global batch."""
    tp, m, problems = cfg.tp, cfg.model, []
    if tp < 1:
        return [f"tp ({tp}) must be at least 1"]
    for name in TP_SPLIT:
        if getattr(m, name) % tp:
            problems.append(f"tp ({tp}) must divide model.{name} ({getattr(m, name)})")
    if world.size % tp:
        problems.append(f"world size {world.size} ({world.described}) must be a multiple of tp ({tp})")
        return problems
    if world.gpus and world.per_node_given and world.per_node % tp:
        problems.append(f"{world.per_node_given} is not a multiple of tp ({tp}): world size {world.size} "
                        f"({world.described}) would put a tensor-parallel group across two nodes; on GPUs they must "
                        "stay inside a node, on NVLink (4 all-reduces per layer, ranks numbered TP-fastest)")
    try:
        cfg.accumulation(world.size // tp)
    except ConfigError as exc:
        problems.append(f"{exc} (world size {world.size} = {world.described}, tp {tp})")
    return problems


def window_problems(cfg: Any, seq: int) -> list[str]:
    """The data's sequence length against the model's positions and sequence parallelism's split."""
    problems = []
    if seq > cfg.model.max_position_embeddings:
        problems.append(f"the data's seq_len ({seq}) exceeds model.max_position_embeddings "
                        f"({cfg.model.max_position_embeddings})")
    if cfg.model.sequence_parallel and cfg.tp > 1 and seq % cfg.tp:
        problems.append(f"model.sequence_parallel splits the sequence ({seq}) over tp ({cfg.tp}): it must divide it")
    return problems


def _readable(path: Path) -> str:
    """'' when the file opens and reads, else why not (root passes permission bits, so this opens it)."""
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        return exc.strerror or str(exc)
    return ""


def store_problems(label: str, path: str, cfg: Any, languages: list[str]) -> tuple[list[str], StoreManifest | None]:
    """A token store the ranks will open: its manifest, its shards, its tokenizer, its vocabulary and languages."""
    if not (Path(path) / MANIFEST).is_file():
        why = "does not exist" if not Path(path).exists() else f"has no {MANIFEST} (not a store, or not built yet)"
        return [f"{label} {path} {why}: build it with `codegeex data build --output {path}`"], None
    try:
        meta = load_store_manifest(path)
    except (ValueError, OSError) as exc:
        return [f"{label} {path}: {exc}"], None
    problems = []
    missing = [s.file for s in meta.shards if not (Path(path) / s.file).is_file()]
    if missing:
        problems.append(f"{label} {path}: {len(missing)} of its {len(meta.shards)} shard(s) listed in {MANIFEST} are "
                        f"missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    unreadable = [f"{s.file} ({why})" for s in meta.shards[:1] if (why := _readable(Path(path) / s.file))]
    problems += [f"{label} {path}: shard {u} cannot be read" for u in unreadable if not missing]
    if meta.tokenizer.path:
        tok = Path(meta.tokenizer.path)  # absolute, or relative to the working directory (as the trainer opens it)
        if tok.is_dir():  # a byte-level BPE directory: its vocabulary is what the trainer reads first
            tok = tok / "vocab.json"
        if not tok.is_file():
            problems.append(f"{label} {path}: its tokenizer {meta.tokenizer.path} (recorded in {path}/{MANIFEST}) "
                            f"does not exist{' relative to ' + os.getcwd() if not tok.is_absolute() else ''}: the "
                            "checkpoints carry it and generation needs it")
        elif why := _readable(tok):
            problems.append(f"{label} {path}: its tokenizer {tok} cannot be read ({why})")
    if meta.tokenizer.vocab_size > cfg.model.vocab_size:
        problems.append(f"{label} {path}: tokenizer vocabulary ({meta.tokenizer.vocab_size}) exceeds "
                        f"model.vocab_size ({cfg.model.vocab_size})")
    unknown = [lang for lang in languages if meta.languages and lang not in meta.languages]
    if unknown:
        problems.append(f"{label} {path}: languages {unknown} are not in it (it has {sorted(meta.languages)})")
    return problems, meta


def data_problems(cfg: Any) -> tuple[list[str], int]:
    """Every training source and the validation store; returns the problems and the longest sequence found."""
    problems, seq = [], 0
    stores = [(f"data.sources[{i}]", s.path, list(s.languages)) for i, s in enumerate(cfg.data.sources)]
    if cfg.validation.path:
        stores.append(("validation.path", cfg.validation.path, []))
    for label, path, languages in stores:
        found, meta = store_problems(label, path, cfg, languages)
        problems += found
        seq = max(seq, meta.seq_len if meta else 0)
    if cfg.init_from and not Path(cfg.init_from).exists():
        problems.append(f"init_from {cfg.init_from} does not exist")
    if cfg.checkpoint.resume not in ("auto", "none") and not Path(cfg.checkpoint.resume).exists():
        problems.append(f"checkpoint.resume {cfg.checkpoint.resume} does not exist (or use auto / none)")
    return problems, seq


def writable_problem(label: str, path: Path) -> str:
    """'' when ``path`` is a directory this process can write to, or can be created; else why not. Probed by creating
    a file in the nearest existing directory (permission bits do not stop root; read-only mounts do)."""
    target = Path(os.path.abspath(path))
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{label} {path} cannot be created: {existing} is a file, not a directory"
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".codegeex-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        verb = "is not writable" if existing == target else f"cannot be created ({existing} is not writable)"
        return f"{label} {path} {verb}: {exc.strerror or exc}"
    return ""


def directory_problems(cfg: Any) -> list[str]:
    problems = [writable_problem("checkpoint directory", cfg.checkpoint_dir),
                writable_problem("run_dir", Path(cfg.run_dir))]
    return [p for p in problems if p]


def memory_check(cfg: Any, world: World, seq: int, device: Device | None, force: bool) -> tuple[str, list[str]]:
    """(the report's line, problems): the planner's memory per rank (``cfg.precision.dtype`` resolved) for this
    layout, against ``device``; above its memory is a problem unless ``force``."""
    from launch.planner import PlanRequest, memory_gib
    from megatron_code.train_config import PRECISION_DTYPES

    if world.size % cfg.tp:
        return "predicted memory per rank: not computed (the world does not split into TP groups)", []
    dp = world.size // cfg.tp
    req = PlanRequest(cfg.model, world.size, device or DEVICES["H100-80"], cfg.data.global_batch_size, seq,
                      PRECISION_DTYPES[cfg.precision.dtype], sequence_parallel=cfg.model.sequence_parallel)
    mem = memory_gib(req, cfg.tp, 1, dp, cfg.zero_stage if dp > 1 else 0, cfg.micro_batch_size,
                     cfg.activation_checkpointing)
    parts = (f"parameters {mem['parameters']:.1f}, gradients {mem['gradients']:.1f}, optimizer "
             f"{mem['optimizer']:.1f}, activations {mem['activations']:.1f}, logits {mem['transient']:.1f}, "
             f"reserve {mem['reserve']:.1f}")
    if device is None:
        return (f"predicted memory per rank: {mem['total']:.1f} GiB ({parts}); not checked against a device: "
                f"give --gpu KIND ({', '.join(DEVICES)})"), []
    line = f"predicted memory per rank: {mem['total']:.1f} GiB of {device.name}'s {device.memory_gib:g} GiB ({parts})"
    if mem["total"] <= device.memory_gib:
        return line, []
    remedies = ["lower micro_batch_size"] + (["raise zero_stage"] if cfg.zero_stage < 3 else []) + ["raise tp"]
    if cfg.activation_checkpointing != "full":
        remedies.append(f"activation_checkpointing={'selective or ' if cfg.activation_checkpointing == 'off' else ''}"
                        "full")
    problem = (f"predicted memory per rank {mem['total']:.1f} GiB exceeds {device.name}'s {device.memory_gib:g} GiB "
               f"({parts}): {', '.join(remedies)} (`codegeex plan` ranks the layouts that fit); --force launches "
               "anyway")
    if force:
        return line + "; above the device's memory, launched anyway (--force)", []
    return line, [problem]


def with_precision(cfg: Any, gpus: bool) -> Any:
    """A copy of ``cfg`` with the precision the ranks will settle on (bf16 by default on GPUs, fp32 on CPU)."""
    from megatron_code.train_config import resolve_precision

    copy = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model),
                               precision=dataclasses.replace(cfg.precision))
    resolve_precision(copy, gpus)
    return copy
