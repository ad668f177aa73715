"""Launch-time validation: :func:`check_job`, the one function behind ``codegeex launch ...`` (before anything is
started or submitted, ``--dry-run`` too) and ``codegeex plan --validate CONFIG --world-size N``.

It checks what the launcher knows (:class:`launch.job_checks.World`: nodes x ranks per node) against the
configuration: world size against tp, the tensor-parallel splits, global batch = micro-batch x accumulation x DP,
the data stores and their tokenizer present and readable, the checkpoint and run directories writable or creatable,
the planner's memory per rank against the device of ``--gpu``. Then, when all of that holds, it builds the job as
the ranks would: torch's fake process group stands in for them (collectives return at once) and the model lives on
the meta device (shapes without memory), so a 13B model on 1,536 ranks is checked in seconds: the process groups
every rank creates, the model's tensor-parallel shapes, one forward and backward at the data's sequence length.
Every problem found is reported, one line each (:class:`launch.job_checks.JobRefused`, exit code 2).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from common.config import ConfigError
from common.devices import Device
from launch.job_checks import (
    JobRefused,
    World,
    data_problems,
    directory_problems,
    memory_check,
    plural,
    structure_problems,
    window_problems,
    with_precision,
)


def _ranks_to_check(world: int, tp: int) -> list[int]:
    """Shapes depend only on the tensor-parallel rank; groups on the position: first TP group, last rank."""
    return sorted({*range(min(tp, world)), world - 1})


def _rank_dry_run(cfg: Any, rank: int, world: int, seq: int) -> dict[str, Any]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_code.attention import MaskInfo
    from megatron_code.deepspeed_glue import deepspeed_config
    from megatron_code.model import CodeGeeXModel
    from megatron_code.objectives import vocab_parallel_cross_entropy
    from megatron_code.parallel import build_parallel_context

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    pc = build_parallel_context(cfg.tp)
    ds = deepspeed_config(cfg, pc.dp_size, cuda=False)
    with torch.device("meta"):  # sequence parallelism changes no shape here; its buffers cannot live on meta
        model = CodeGeeXModel(dataclasses.replace(cfg.model, sequence_parallel=False), pc)
        b = cfg.micro_batch_size
        tokens = torch.zeros(b, seq, dtype=torch.long)  # (B, T)
        positions = torch.arange(seq).expand(b, seq)  # (B, T)
        logits, _ = model(tokens, positions, MaskInfo(torch.zeros(b, seq, dtype=torch.long)))  # (B, T, V/tp)
        expected = (b, seq, cfg.model.vocab_size // pc.tp_size)
        if tuple(logits.shape) != expected:
            raise ConfigError(f"rank {rank}: logits {tuple(logits.shape)}, expected {expected}")
        vocab_parallel_cross_entropy(logits, tokens, pc).sum().backward()
    params = sum(p.numel() for p in model.parameters())
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    if missing:
        raise ConfigError(f"rank {rank}: no gradient reaches {', '.join(missing[:5])}")
    return {"rank": rank, "tp_rank": pc.tp_rank, "dp_rank": pc.dp_rank, "parameters": params,
            "accumulation": ds["gradient_accumulation_steps"], "zero_stage": ds["zero_optimization"]["stage"]}


def _shape_report(cfg: Any, world: World, seq: int) -> list[str]:
    """Build the job on fake process groups for the ranks that differ; raises ConfigError naming the rank."""
    try:
        rows = [_rank_dry_run(cfg, r, world.size, seq) for r in _ranks_to_check(world.size, cfg.tp)]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    dp, tp = world.size // cfg.tp, cfg.tp
    lines = [f"global batch {cfg.data.global_batch_size} = micro-batch {cfg.micro_batch_size} x accumulation "
             f"{rows[0]['accumulation']} x DP {dp}; sequence {seq}; ZeRO stage {rows[0]['zero_stage']}; "
             f"precision {cfg.precision.dtype}",
             f"tensor-parallel groups: [0..{tp - 1}], [{tp}..{2 * tp - 1}], ... ({dp} groups); "
             f"data-parallel groups: [0, {tp}, {2 * tp}, ...] ({tp} groups)"]
    lines += [f"  rank {r['rank']:>5} (tp {r['tp_rank']}, dp {r['dp_rank']}): {r['parameters']:,} parameters, forward "
              "and backward shapes OK" for r in rows]
    return lines


def check_job(cfg: Any, world: World, *, name: str, device: Device | None = None, force: bool = False) -> str:
    """Every check of a training job about to run on ``world``; returns the report, or raises
    :class:`JobRefused` listing every problem found (the model's shapes are built only when nothing else is wrong).
    ``cfg`` is not changed (the precision is settled on a copy, as the ranks will: bf16 by default on GPUs).
    ``device``: memory above its own is refused unless ``force``."""
    cfg = with_precision(cfg, world.gpus)
    files, seq = data_problems(cfg)
    seq = seq or cfg.model.max_position_embeddings
    problems = structure_problems(cfg, world) + files + window_problems(cfg, seq) + directory_problems(cfg)
    memory, over = memory_check(cfg, world, seq, device, force)
    problems += over
    lines = [f"{name}: valid for {plural(world.size, 'rank')} ({world.described}) = TP {cfg.tp} x DP {world.size // max(1, cfg.tp)}"]
    if not problems:  # the shapes (the slow part, seconds for a 13B), once everything else holds
        try:
            lines += _shape_report(cfg, world, seq)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise JobRefused(f"{name} on {plural(world.size, 'rank')} ({world.described})", problems)
    return "\n".join([*lines, memory])


def validate_job(config: str, world: int | World, overrides: list[str], device: Device | None = None,
                 force: bool = False) -> str:
    """``codegeex plan --validate``: :func:`check_job` for ``world`` ranks (an int: ``--world-size N``, nodes of
    ``device.per_node`` when a device is given, GPUs then)."""
    from megatron_code.train_config import load_train_config

    cfg = load_train_config(config, overrides)
    if isinstance(world, int):
        if world < 1:
            raise ConfigError(f"--world-size ({world}) must be at least 1")
        per_node = device.per_node if device and world > device.per_node else world
        nodes = -(-world // per_node)
        world = World(world, per_node, device is not None, f"--world-size {world}",
                      f"{device.name}'s {per_node} per node" if device and nodes > 1 else "")
    return check_job(cfg, world, name=config, device=device, force=force)
