"""DeepSpeed wiring: the ``mpu`` adapter, the engine's config, parameter groups and the LR schedule.

DeepSpeed's ``mpu=`` argument expects Megatron's old accessor names (``get_model_parallel_rank`` ...), which
megatron-core renamed; :class:`MPUAdapter` answers them from our :class:`ParallelContext`, so ZeRO shards only across
data-parallel ranks and the gradient norm counts tensor-parallel replicas once.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
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


def prepare_deepspeed() -> None:
    """Before the engine exists: nothing compiled silently at run time.

    DeepSpeed's CPU accelerator builds a shared-memory all-reduce (``deepspeed_shm_comm``) when its communication
    starts; only its inference all-reduce uses it, so it is marked unavailable and never built. Any other op DeepSpeed
    would compile just in time is announced in the log before the build starts, into the environment's own
    extensions directory (``TORCH_EXTENSIONS_DIR``, defaulted to ``sys.prefix/torch_extensions``)."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.builder import OpBuilder

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if getattr(OpBuilder.jit_load, "announced", False):
        return
    original = OpBuilder.jit_load

    def jit_load(self: Any, verbose: bool = True) -> Any:
        log.warning("DeepSpeed is compiling its %s op into %s (minutes, once per environment)", self.name,
                    os.environ["TORCH_EXTENSIONS_DIR"])
        return original(self, verbose)

    jit_load.announced = True  # type: ignore[attr-defined]
    OpBuilder.jit_load = jit_load


def deepspeed_config(cfg: TrainConfig, dp: int, cuda: bool | None = None) -> dict[str, Any]:
    """The engine's configuration. ``cfg.precision.dtype`` must be resolved (:func:`resolve_precision`)."""
    p, z = cfg.precision, cfg.zero
    cuda = torch.cuda.is_available() if cuda is None else cuda
    stage = effective_zero_stage(cfg.zero_stage, dp, p.dtype)
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(reduce_bucket_size=z.reduce_bucket_size, allgather_bucket_size=z.allgather_bucket_size,
                    contiguous_gradients=z.contiguous_gradients and stage >= 2,
                    overlap_comm=z.overlap_comm and cuda and stage >= 2)  # overlap uses CUDA streams
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.accumulation(dp),
        "train_batch_size": cfg.data.global_batch_size,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our torch AdamW is one ZeRO supports; it is handed in as a client
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if p.dtype == "bf16":
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
        if stage >= 1:  # ZeRO-1 then sums micro-batch gradients in fp32 (DeepSpeed's bf16 optimizer)
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
        if stage >= 2 and cfg.accumulation(dp) > 1:
            log.warning("bf16 with ZeRO-%d sums the %d micro-batches' gradients in bf16 (DeepSpeed's ZeRO-2/3 do not "
                        "accumulate in fp32); zero_stage=1 sums them in fp32", stage, cfg.accumulation(dp))
    elif p.dtype == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": p.initial_scale_power,
                      "loss_scale_window": p.loss_scale_window, "hysteresis": p.hysteresis,
                      "min_loss_scale": p.min_loss_scale}
    return ds


def effective_zero_stage(stage: int, dp: int, dtype: str = "fp32") -> int:
    """ZeRO shards over data-parallel ranks: with one there is nothing to shard, and on a CPU its bookkeeping
    (flattening gradients into partitions every step) costs more than the optimizer itself, so fp32 runs skip it.
    In bf16 and fp16 the stage is kept: ZeRO's optimizers hold the fp32 master weights and Adam's state."""
    if dp == 1 and stage > 0 and dtype == "fp32":
        log.info("zero_stage %d has nothing to shard with 1 data-parallel rank; running DeepSpeed without ZeRO", stage)
        return 0
    return stage


def guarded(optimizer_class: type) -> type:
    """``optimizer_class`` that skips the step the trainer marked (``guard_skip``: its gradients are not all finite, known
    from the step's gradient norm) and says so in ``overflow``, which DeepSpeed reads to count skipped steps and to
    hold the LR schedule. Needed without ZeRO, where DeepSpeed checks only fp16 gradients. It never reads a device
    value itself."""

    class Guarded(optimizer_class):
        overflow = False
        guard_skip = False

        def step(self, closure: Any = None) -> Any:
            self.overflow = self.guard_skip
            return None if self.guard_skip else super().step(closure)

    Guarded.__name__ = f"Guarded{optimizer_class.__name__}"
    return Guarded


def client_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]], guard: bool) -> torch.optim.Optimizer:
    """torch's AdamW (fused kernels on CUDA and CPU with ``optim.fused``; nothing compiled at run time), handed to
    DeepSpeed for every ZeRO stage; ``guard``: without ZeRO in fp32, guarded against NaN/Inf steps."""
    o = cfg.optim
    cls = guarded(torch.optim.AdamW) if guard else torch.optim.AdamW
    return cls(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
               fused=o.fused or None, foreach=None if o.fused else True)


def grad_norm(params: list[nn.Parameter], pc: ParallelContext) -> torch.Tensor:
    """The global L2 norm of the gradients, (1,) fp32 on their device, with no host sync: tensor-parallel slices
    summed over the group, replicated parameters counted once (by TP rank 0). Non-finite iff a gradient is."""
    split = [p.grad for p in params if p.grad is not None and getattr(p, "tensor_model_parallel", False)]
    replicated = [p.grad for p in params if p.grad is not None and not getattr(p, "tensor_model_parallel", False)]
    grads = split + (replicated if pc.tp_rank == 0 else [])
    squares = torch.zeros(1, dtype=torch.float32, device=pc.device)
    if grads:
        squares = squares + torch.stack(torch._foreach_norm([g.float() for g in grads])).square().sum()
    if pc.tp_size > 1:
        torch.distributed.all_reduce(squares, group=pc.tp_group)
    return squares.sqrt()


def clip_with(params: list[nn.Parameter], norm: torch.Tensor, max_norm: float) -> None:
    """Scale the gradients by min(1, max_norm / (norm + 1e-6)) on the device (DeepSpeed's and torch's rule)."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads and max_norm > 0:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0).reshape(()))


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
