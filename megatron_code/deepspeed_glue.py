"""DeepSpeed wiring: the ``mpu`` adapter, the engine's config, parameter groups and the LR schedule.

DeepSpeed's ``mpu=`` argument expects Megatron's old accessor names (``get_model_parallel_rank`` ...), which
megatron-core renamed; :class:`MPUAdapter` answers them from our :class:`ParallelContext`, so ZeRO shards only across
data-parallel ranks and the gradient norm counts tensor-parallel replicas once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from megatron_code.parallel import ParallelContext
from megatron_code.train_config import TrainConfig

log = logging.getLogger(__name__)


class MPUAdapter:
    """The model-parallel unit DeepSpeed asks about groups."""

    def __init__(self, pc: ParallelContext) -> None:
        self.pc = pc

    def get_model_parallel_rank(self) -> int:
        return self.pc.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.pc.tp_size

    def get_model_parallel_group(self) -> Any:
        return self.pc.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.pc.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.pc.dp_size

    def get_data_parallel_group(self) -> Any:
        return self.pc.dp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


def deepspeed_config(cfg: TrainConfig, dp: int) -> dict[str, Any]:
    p = cfg.precision
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.accumulation(dp),
        "train_batch_size": cfg.data.global_batch_size,
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.optim.lr, "betas": [cfg.optim.beta1, cfg.optim.beta2], "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay, "torch_adam": not cfg.optim.fused}},
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": effective_zero_stage(cfg.zero_stage, dp)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if p.dtype == "bf16":
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
    elif p.dtype == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": p.initial_scale_power,
                      "loss_scale_window": p.loss_scale_window, "hysteresis": p.hysteresis,
                      "min_loss_scale": p.min_loss_scale}
    return ds


def effective_zero_stage(stage: int, dp: int) -> int:
    """ZeRO shards over data-parallel ranks: with one there is nothing to shard, and on a CPU its bookkeeping
    (flattening gradients into partitions every step) costs more than the optimizer itself, so it is skipped."""
    if dp == 1 and stage > 0:
        log.info("zero_stage %d has nothing to shard with 1 data-parallel rank; running DeepSpeed without ZeRO", stage)
        return 0
    return stage


def guarded(optimizer_class: type) -> type:
    """``optimizer_class`` that skips a step whose gradients are not all finite and says so in ``overflow`` (which
    DeepSpeed reads to count skipped steps). Needed without ZeRO, where DeepSpeed checks only fp16 gradients."""

    class Guarded(optimizer_class):
        overflow = False

        def step(self, closure: Any = None) -> Any:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            self.overflow = not all(bool(torch.isfinite(g).all()) for g in grads)
            return None if self.overflow else super().step(closure)

    Guarded.__name__ = f"Guarded{optimizer_class.__name__}"
    return Guarded


def client_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer handed to DeepSpeed when it runs without ZeRO: fused or torch AdamW, guarded against NaN/Inf."""
    o = cfg.optim
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    if o.fused:
        from deepspeed.ops.adam import FusedAdam

        return guarded(FusedAdam)(groups, adam_w_mode=True, **kwargs)
    return guarded(torch.optim.AdamW)(groups, **kwargs)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and embeddings; none on biases and LayerNorm parameters."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        (no_decay if name.endswith(".bias") or "layernorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak LR at a step: linear warmup, cosine decay to min_lr, then min_lr."""
    o = cfg.optim
    decay = o.decay_steps or max(1, cfg.train_steps - o.warmup_steps)
    floor = o.min_lr / o.lr if o.lr > 0 else 0.0

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / decay)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def make_scheduler(cfg: TrainConfig) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
