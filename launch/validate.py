"""``codegeex plan --validate CONFIG --world-size N``: build the job as N ranks would, on one machine.

torch's fake process group stands in for the N ranks (collectives return at once) and the model lives on the meta
device (shapes without memory), so a 13B model on 1,536 ranks is checked in seconds: the configuration, the process
groups every rank creates, global batch = micro-batch x accumulation x DP, the model's tensor-parallel shapes, one
forward and backward at the data's sequence length, and the data sources.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.config import ConfigError
from common.contracts import MANIFEST, load_store_manifest


def _ranks_to_check(world: int, tp: int) -> list[int]:
    """Shapes depend only on the tensor-parallel rank; groups on the position: first TP group, last rank."""
    return sorted({*range(min(tp, world)), world - 1})


def _data_window(cfg: Any) -> tuple[int, list[str]]:
    notes, seq = [], 0
    for src in cfg.data.sources:
        if not (Path(src.path) / MANIFEST).is_file():
            notes.append(f"data source {src.path}: no manifest.json yet (built later?)")
            continue
        meta = load_store_manifest(src.path)
        seq = max(seq, meta.seq_len)
        vocab = meta.tokenizer.vocab_size
        if vocab > cfg.model.vocab_size:
            raise ConfigError(f"data source {src.path}: tokenizer vocabulary ({vocab}) exceeds model.vocab_size "
                              f"({cfg.model.vocab_size})")
    return seq or cfg.model.max_position_embeddings, notes


def _rank_dry_run(cfg: Any, rank: int, world: int, seq: int) -> dict[str, Any]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_code.deepspeed_glue import deepspeed_config
    from megatron_code.model import CodeGeeXModel
    from megatron_code.objectives import vocab_parallel_cross_entropy
    from megatron_code.parallel import build_parallel_context

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    pc = build_parallel_context(cfg.tp)
    cfg.model.check_tensor_parallel(pc.tp_size)
    ds = deepspeed_config(cfg, pc.dp_size)
    if cfg.model.sequence_parallel and pc.tp_size > 1 and seq % pc.tp_size:
        raise ConfigError(f"model.sequence_parallel splits the sequence ({seq}) over tp ({pc.tp_size}): it must "
                          "divide it")
    with torch.device("meta"):  # sequence parallelism changes no shape here; its buffers cannot live on meta
        model = CodeGeeXModel(dataclasses.replace(cfg.model, sequence_parallel=False), pc)
        b = cfg.micro_batch_size
        tokens = torch.zeros(b, seq, dtype=torch.long)  # (B, T)
        positions = torch.arange(seq).expand(b, seq)  # (B, T)
        from megatron_code.attention import MaskInfo

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


def validate_job(config: str, world: int, overrides: list[str]) -> str:
    """Every check, or a ConfigError naming the first that fails; returns a report."""
    from launch.planner import GIB
    from megatron_code.flops import memory_per_rank
    from megatron_code.train_config import PRECISION_DTYPES, load_train_config, resolve_precision

    cfg = load_train_config(config, overrides)
    resolve_precision(cfg, torch.cuda.is_available())
    if world % cfg.tp:
        raise ConfigError(f"world size ({world}) must be a multiple of tp ({cfg.tp})")
    seq, notes = _data_window(cfg)
    if seq > cfg.model.max_position_embeddings:
        raise ConfigError(f"the data's seq_len ({seq}) exceeds model.max_position_embeddings "
                          f"({cfg.model.max_position_embeddings})")
    try:
        rows = [_rank_dry_run(cfg, r, world, seq) for r in _ranks_to_check(world, cfg.tp)]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    dp = world // cfg.tp
    mem = memory_per_rank(cfg.model, cfg.tp, dp, cfg.zero_stage if dp > 1 else 0, cfg.micro_batch_size, seq,
                          PRECISION_DTYPES[cfg.precision.dtype], cfg.activation_checkpointing,
                          cfg.model.sequence_parallel and cfg.tp > 1)
    lines = [f"{config}: valid for {world} ranks = TP {cfg.tp} x DP {dp}; global batch "
             f"{cfg.data.global_batch_size} = micro-batch {cfg.micro_batch_size} x accumulation "
             f"{rows[0]['accumulation']} x DP {dp}; sequence {seq}; ZeRO stage {rows[0]['zero_stage']}",
             f"tensor-parallel groups: [0..{cfg.tp - 1}], [{cfg.tp}..{2 * cfg.tp - 1}], ... ({dp} groups); "
             f"data-parallel groups: [0, {cfg.tp}, {2 * cfg.tp}, ...] ({cfg.tp} groups)"]
    lines += [f"  rank {r['rank']:>5} (tp {r['tp_rank']}, dp {r['dp_rank']}): {r['parameters']:,} parameters, forward "
              "and backward shapes OK" for r in rows]
    lines.append(f"predicted memory per rank: {mem.total / GIB:.1f} GiB (parameters {mem.parameters / GIB:.1f}, "
                 f"gradients {mem.gradients / GIB:.1f}, optimizer {mem.optimizer / GIB:.1f}, activations "
                 f"{mem.activations / GIB:.1f}, logits {mem.transient / GIB:.1f})")
    return "\n".join(lines + notes)
