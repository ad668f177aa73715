"""DeepSpeed wiring: the ``mpu`` adapter, the engine's config, parameter groups and the LR schedule.

DeepSpeed's ``mpu=`` argument expects Megatron's old accessor names (``get_model_parallel_rank`` ...), which
megatron-core renamed; :class:`MPUAdapter` answers them from our :class:`ParallelContext`, so ZeRO shards only across
data-parallel ranks and the gradient norm counts tensor-parallel replicas once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from megatron_code.parallel import ParallelContext
from megatron_code.train_config import TrainConfig


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
        "zero_optimization": {"stage": cfg.zero_stage},
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
