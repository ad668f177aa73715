"""The training loop: DeepSpeed ZeRO over data-parallel ranks x megatron-core tensor parallelism.

Every step: each data-parallel rank reads its slice of the global batch from the sampler (tensor-parallel ranks of a
group read the same), runs ``accumulation`` micro-batches through the engine, and DeepSpeed steps (skipping, and
counting, a step whose gradients hold NaN or Inf). Signals (SIGTERM, SIGUSR1) are agreed across ranks and end the
run after the current step with a checkpoint and exit code 0.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import torch.distributed as dist

from common.config import to_dict
from common.devices import peak_tflops_for_cuda_name
from common.logs import progress
from common.revision import git_revision
from data_pipeline.sampler import DataSampler, SamplerConfig, SamplerState, SourceConfig
from megatron_code.deepspeed_glue import (
    MPUAdapter,
    client_optimizer,
    deepspeed_config,
    make_scheduler,
    parameter_groups,
)
from megatron_code.flops import flops_per_token
from megatron_code.model import CodeGeeXModel
from megatron_code.objectives import (
    ModelInputs,
    Objective,
    lm_loss,
    make_objective,
    prepare_batch,
    vocab_parallel_cross_entropy,
)
from megatron_code.parallel import ParallelContext, build_parallel_context, ensure_process_group
from megatron_code.stage2 import fill_separated_ids, init_from_checkpoint
from megatron_code.train_checkpoint import find_latest, load_training_checkpoint, save_training_checkpoint
from megatron_code.train_config import TrainConfig

log = logging.getLogger("codegeex.train")


class Metrics:
    """Rank 0 writes JSONL (always) and TensorBoard (if enabled) under the run directory."""

    def __init__(self, cfg: TrainConfig, rank: int) -> None:
        self.enabled = rank == 0
        self.tb: Any = None
        if not self.enabled:
            return
        run = Path(cfg.run_dir)
        run.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run / "metrics.jsonl", "a")  # noqa: SIM115 (kept open for the run)
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run / "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


class StopSignal:
    """Remembers SIGTERM/SIGUSR1; ranks agree on it once per step."""

    def __init__(self) -> None:
        self.received = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def agreed(self) -> bool:
        if dist.get_world_size() == 1:
            return self.received > 0
        flag = torch.tensor([float(self.received)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def _peak_tflops(cfg: TrainConfig) -> float:
    if cfg.log.peak_tflops > 0:
        return cfg.log.peak_tflops
    if torch.cuda.is_available():
        return peak_tflops_for_cuda_name(torch.cuda.get_device_name())
    return 0.0


def build(cfg: TrainConfig) -> tuple[ParallelContext, CodeGeeXModel, Any, DataSampler]:
    """Process groups, model, DeepSpeed engine and sampler; every check before any work."""
    import deepspeed

    ensure_process_group(datetime.timedelta(minutes=cfg.faults.collective_timeout_minutes))
    pc = build_parallel_context(cfg.tp)
    cfg.model.check_tensor_parallel(pc.tp_size)
    ds_config = deepspeed_config(cfg, pc.dp_size)  # checks global batch = micro x accumulation x DP
    sampler = DataSampler(cfg.data, pc.dp_rank, pc.dp_size)
    fill_separated_ids(cfg.model, sampler.sources[0].store.manifest)
    torch.manual_seed(cfg.seed)
    model = CodeGeeXModel(cfg.model, pc)
    if cfg.init_from and (cfg.checkpoint.resume == "none" or (cfg.checkpoint.resume == "auto"
                                                              and find_latest(cfg.checkpoint_dir) is None)):
        init_from_checkpoint(model, cfg.init_from)  # stage 2: a fresh optimizer and schedule over these weights
        log.info("weights from %s (embedding separation: %s)", cfg.init_from, cfg.model.embedding_separation)
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    if torch.cuda.is_available():
        model = model.cuda()
    groups = parameter_groups(model, cfg.optim.weight_decay)
    optimizer = None
    if ds_config["zero_optimization"]["stage"] == 0:  # no ZeRO: our optimizer, which skips non-finite steps itself
        optimizer = client_optimizer(cfg, groups)
        del ds_config["optimizer"]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer, config=ds_config,
                                           mpu=MPUAdapter(pc), lr_scheduler=make_scheduler(cfg), dist_init_required=False)
    if pc.dp_size == 1:
        engine.enable_backward_allreduce = False  # one data-parallel rank: nothing to average, skip the bucket copies
    if optimizer is not None:
        record_clipped_norm(engine)
    return pc, model, engine, sampler


def record_clipped_norm(engine: Any) -> None:
    """Without ZeRO, DeepSpeed clips fp32 gradients but drops the norm it computed (``get_global_grad_norm`` stays
    None); keep it, so the logged grad-norm is the global one (tensor-parallel replicas counted once) at any DP."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip() -> None:
        engine._global_grad_norm = float(clip_grad_norm_(parameters=engine.module.parameters(),
                                                         max_norm=engine.gradient_clipping(), mpu=engine.mpu))

    engine.clip_fp32_gradients = clip


def _micro_batches(batch: dict[str, np.ndarray], n: int) -> list[dict[str, np.ndarray]]:
    size = len(batch["tokens"]) // n
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(n)]


def write_status(cfg: TrainConfig, pc: ParallelContext, state: str, step: int) -> None:
    """``RUN_DIR/status.json``: running, stopped (by a signal, with a checkpoint: resume it) or completed. Batch
    scripts read it to decide whether to requeue."""
    if pc.rank == 0:
        path = Path(cfg.run_dir) / "status.json"
        path.write_text(json.dumps({"state": state, "step": step, "train_steps": cfg.train_steps,
                                    "checkpoints": str(cfg.checkpoint_dir)}) + "\n")


def train_step(engine: Any, pc: ParallelContext, micros: list[ModelInputs],
               nan: bool = False) -> tuple[torch.Tensor, bool]:
    """One optimizer step over this rank's micro-batches; returns (mean loss over the global batch, skipped)."""
    accumulation = len(micros)
    # every token of the global batch weighs the same, however it is split into micro-batches and ranks
    total = torch.stack([m.loss_mask.sum() for m in micros]).sum().reshape(1).cpu()
    if pc.dp_size > 1:
        dist.all_reduce(total, group=pc.dp_group)
    summed = torch.zeros(1)
    for inp in micros:
        logits, _ = engine(inp.tokens, inp.position_ids, inp.mask, text=inp.text)
        token_sum = (vocab_parallel_cross_entropy(logits, inp.labels, pc) * inp.loss_mask).sum()
        if nan:
            token_sum = token_sum * float("nan")
        # DeepSpeed divides by the accumulation steps and averages over data-parallel ranks
        engine.backward(token_sum * (accumulation * pc.dp_size) / total.clamp(min=1).to(token_sum.device))
        engine.step()
        summed += token_sum.detach().float().cpu()
    if pc.dp_size > 1:
        dist.all_reduce(summed, group=pc.dp_group)
    mean = summed / total.clamp(min=1)
    skipped = not getattr(engine, "_step_applied", True) or not bool(torch.isfinite(mean).item())
    return mean, skipped


def validation_loss(cfg: TrainConfig, engine: Any, pc: ParallelContext, device: torch.device,
                    objective: Objective) -> float:
    """Mean loss over the same held-out batches every time."""
    vcfg = SamplerConfig(sources=[SourceConfig(path=cfg.validation.path)], seed=0,
                         global_batch_size=cfg.data.global_batch_size, verify_checksums=False)
    sampler = DataSampler(vcfg, pc.dp_rank, pc.dp_size)
    engine.eval()
    total = torch.zeros(2)
    with torch.no_grad():
        for _ in range(cfg.validation.batches):
            inp = prepare_batch(sampler.next_batch(), device, objective)
            logits, _ = engine(inp.tokens, inp.position_ids, inp.mask, text=inp.text)
            loss, count = lm_loss(logits, inp, pc)
            total += torch.tensor([float(loss) * float(count), float(count)])
    dist.all_reduce(total, group=pc.dp_group)
    engine.train()
    return float(total[0] / total[1].clamp(min=1))


class Throughput:
    """Tokens/s, step time, TFLOP/s per device, peak memory and MFU over the steps since the last report."""

    def __init__(self, tokens_per_step: int, flops_token: float, world_size: int, peak_tflops: float) -> None:
        self.tokens_per_step, self.flops_token = tokens_per_step, flops_token
        self.world_size, self.peak = world_size, peak_tflops
        self.since, self.steps = time.perf_counter(), 0  # steps: counted by the loop

    def report(self) -> dict[str, float]:
        """The figures since the last report (``mfu`` only when the device's peak is known); starts a new period."""
        elapsed = time.perf_counter() - self.since
        tps = self.tokens_per_step * self.steps / elapsed
        tflops = tps * self.flops_token / self.world_size / 1e12
        memory = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else psutil.Process().memory_info().rss
        out = {"tokens_per_s": tps, "step_time_s": elapsed / self.steps, "tflops_per_device": tflops,
               "memory_gb": memory / 2**30}
        if self.peak:
            out["mfu"] = tflops / self.peak
        self.since, self.steps = time.perf_counter(), 0
        return out


def resume_point(cfg: TrainConfig, engine: Any, sampler: DataSampler) -> tuple[int, int]:
    """Restore the checkpoint the run continues from (``checkpoint.resume``) into the engine and sampler; returns
    (its step, the steps skipped so far), (0, 0) when the run starts fresh."""
    resume = None if cfg.checkpoint.resume == "none" else (
        find_latest(cfg.checkpoint_dir) if cfg.checkpoint.resume == "auto" else Path(cfg.checkpoint.resume))
    if resume is None:
        return 0, 0
    state = load_training_checkpoint(resume, engine)
    sampler.state = SamplerState.from_dict(state["sampler"])
    log.info("resumed from %s at step %d", resume, state["step"])
    return state["step"], state["skipped_steps"]


def step_values(engine: Any, mean: torch.Tensor, skipped_total: int) -> dict[str, Any]:
    """A step's metrics: loss, learning rate, gradient norm, loss scale, skipped steps so far."""
    scale = getattr(engine.optimizer, "cur_scale", getattr(engine.optimizer, "loss_scale", 1.0))
    return {"loss": float(mean.item()), "lr": float(engine.get_lr()[0]),
            "grad_norm": float(engine.get_global_grad_norm() or 0.0), "loss_scale": float(scale or 1.0),
            "skipped_steps": skipped_total}


def log_step(step: int, train_steps: int, last: dict[str, Any]) -> None:
    """One line of a step's metrics and throughput (``last``: :func:`step_values` and :meth:`Throughput.report`)."""
    mfu = f", MFU {last['mfu']:.1%}" if "mfu" in last else ""
    log.info("step %d/%d loss %.4f lr %.3g grad-norm %.3f scale %g skipped %d | %.0f tokens/s, %.2f TFLOP/s/device%s",
             step, train_steps, last["loss"], last["lr"], last["grad_norm"], last["loss_scale"], last["skipped_steps"],
             last["tokens_per_s"], last["tflops_per_device"], mfu)


def train(cfg: TrainConfig, command: list[str]) -> dict[str, Any]:
    """Run (or resume) training; returns the last step's metrics."""
    pc, model, engine, sampler = build(cfg)
    objective = make_objective(cfg, [(sc.path, s.store.manifest) for s, sc in zip(sampler.sources, cfg.data.sources)])
    device = next(model.parameters()).device
    accumulation = cfg.accumulation(pc.dp_size)
    start, skipped_total = resume_point(cfg, engine, sampler)
    metrics = Metrics(cfg, pc.rank)
    stop = StopSignal()
    if pc.rank == 0:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "config.json").write_text(json.dumps(to_dict(cfg), indent=1) + "\n")
    write_status(cfg, pc, "running", start)
    speed = Throughput(cfg.data.global_batch_size * (sampler.window - 1), flops_per_token(cfg.model, sampler.window - 1),
                       pc.world_size, _peak_tflops(cfg))
    consecutive, stopped_at = 0, cfg.train_steps
    last: dict[str, Any] = {}
    bar = progress(total=cfg.train_steps, initial=start, desc="train", unit="step", disable=pc.rank != 0)
    for step in range(start + 1, cfg.train_steps + 1):
        micros = [prepare_batch(m, device, objective) for m in _micro_batches(sampler.next_batch(), accumulation)]
        mean, skipped = train_step(engine, pc, micros, nan=step in cfg.faults.inject_nan_steps)
        skipped_total += int(skipped)
        consecutive = consecutive + 1 if skipped else 0
        if consecutive >= cfg.faults.max_consecutive_skipped:
            raise RuntimeError(f"stopping: {consecutive} steps in a row skipped for NaN/Inf loss or gradients "
                               f"(faults.max_consecutive_skipped = {cfg.faults.max_consecutive_skipped}); last at step {step}")
        speed.steps += 1
        last = step_values(engine, mean, skipped_total)
        if step % cfg.log.interval == 0 or step == cfg.train_steps:
            last.update(speed.report())
            log_step(step, cfg.train_steps, last)
        if cfg.validation.path and step % cfg.validation.interval == 0:
            last["validation_loss"] = validation_loss(cfg, engine, pc, device, objective)
            log.info("step %d validation loss %.4f", step, last["validation_loss"])
        metrics.write(step, last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}")
        stopping = stop.agreed()
        if step % cfg.checkpoint.interval == 0 or step == cfg.train_steps or stopping:
            state = {"sampler": sampler.state_dict(), "skipped_steps": skipped_total, "config": to_dict(cfg),
                     "git_revision": git_revision(), "command": command}
            path = save_training_checkpoint(cfg.checkpoint_dir, step, engine, model, state, cfg.checkpoint.keep,
                                            sampler.sources[0].store.manifest, objective.name)
            log.info("checkpoint %s", path)
        if stopping:
            log.info("signal %d received: saved at step %d, exiting", stop.received or signal.SIGTERM, step)
            stopped_at = step
            break
        if cfg.faults.exit_after_step and step == cfg.faults.exit_after_step:
            sys.stderr.flush()
            os._exit(17)  # a crash drill: no cleanup, no checkpoint
    bar.close()
    metrics.close()
    write_status(cfg, pc, "stopped" if stopped_at < cfg.train_steps else "completed", stopped_at)
    return last
