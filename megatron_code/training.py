"""The training loop: DeepSpeed ZeRO over data-parallel ranks x megatron-core tensor parallelism.

Every step: each data-parallel rank reads its slice of the global batch from the sampler (tensor-parallel ranks of a
group read the same), runs ``accumulation`` micro-batches through the engine, and DeepSpeed steps (skipping, and
counting, a step whose gradients hold NaN or Inf). Signals (SIGTERM, SIGINT, SIGUSR1: :class:`StopSignal`) are
agreed across ranks and end the run after the current step with a checkpoint and exit code 0.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import torch.distributed as dist

from common.config import ConfigError, to_dict
from common.devices import peak_tflops_for_cuda_name
from common.io import write_text_atomic
from common.logs import adopt_library_loggers, progress
from common.revision import git_revision
from data_pipeline.sampler import DataSampler, SamplerConfig, SourceConfig
from megatron_code.checkpoint import load_parameters, load_shard
from megatron_code.deepspeed_glue import (
    MPUAdapter,
    client_optimizer,
    clip_with,
    deepspeed_config,
    grad_norm,
    make_scheduler,
    parameter_groups,
    prepare_deepspeed,
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
from megatron_code.observe import Observer, prepare_process_group
from megatron_code.parallel import ParallelContext, build_parallel_context, ensure_process_group
from megatron_code.run_lock import RunLock, StopSignal, launch_rank
from megatron_code.stage2 import fill_separated_ids, init_from_checkpoint
from megatron_code.train_checkpoint import (
    ResumePlan,
    choose_resume,
    needs_elastic,
    resume_point,
    save_training_checkpoint,
)
from megatron_code.train_config import TrainConfig, resolve_precision

log = logging.getLogger("codegeex.train")


def truncate_metrics(path: Path, step: int) -> int:
    """Keep only the lines of ``path`` for steps up to ``step`` (the resumed checkpoint's), so that a crash and a
    resume leave one line per step; a torn or unreadable line is dropped too. Returns the lines dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step
        except ValueError:
            ok = False
        if ok:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        write_text_atomic(path, "".join(kept))
    return dropped


class Metrics:
    """Rank 0 writes JSONL (always) and TensorBoard (if enabled) under the run directory; on resume the lines past
    the resumed step (a crashed run's) are cut first, so the file holds one line per step."""

    def __init__(self, cfg: TrainConfig, rank: int, start: int = 0) -> None:
        self.enabled = rank == 0
        self.tb: Any = None
        if not self.enabled:
            return
        run = Path(cfg.run_dir)
        run.mkdir(parents=True, exist_ok=True)
        dropped = truncate_metrics(run / "metrics.jsonl", start)
        if dropped:
            log.info("metrics.jsonl: %d line(s) after step %d (a run that did not reach a checkpoint) removed",
                     dropped, start)
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


def _peak_tflops(cfg: TrainConfig) -> float:
    if cfg.log.peak_tflops > 0:
        return cfg.log.peak_tflops
    if torch.cuda.is_available():
        return peak_tflops_for_cuda_name(torch.cuda.get_device_name())
    return 0.0


def check_store_vocab(cfg: TrainConfig, sampler: DataSampler) -> None:
    """Every store's tokenizer must fit the model's (padded) embedding."""
    for source in sampler.sources:
        record = source.store.manifest.tokenizer
        if record.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"store {source.store.path}: its tokenizer {record.path} has {record.vocab_size} entries "
                              f"but model.vocab_size is {cfg.model.vocab_size} (the padded embedding's rows)")


def build(cfg: TrainConfig, plan: ResumePlan | None = None) -> tuple[ParallelContext, CodeGeeXModel, Any, DataSampler]:
    """Process groups, model, DeepSpeed engine and sampler; every check before any work. ``plan``: filled with the
    checkpoint to resume from (verified; :func:`choose_resume`)."""
    import deepspeed

    adopt_library_loggers()  # DeepSpeed's own handler (installed at import) gives way to ours
    prepare_process_group(cfg)  # NCCL's flight recorder is configured before the group exists
    ensure_process_group(datetime.timedelta(minutes=cfg.faults.collective_timeout_minutes))
    pc = build_parallel_context(cfg.tp)
    cfg.model.check_tensor_parallel(pc.tp_size)
    resolve_precision(cfg, pc.device.type == "cuda")
    ds_config = deepspeed_config(cfg, pc.dp_size, pc.device.type == "cuda")  # checks global batch = micro x acc. x DP
    sampler = DataSampler(cfg.data, pc.dp_rank, pc.dp_size)
    check_store_vocab(cfg, sampler)
    fill_separated_ids(cfg.model, sampler.sources[0].store.manifest)
    torch.manual_seed(cfg.seed)
    plan = plan if plan is not None else ResumePlan()
    plan.path = choose_resume(cfg.checkpoint_dir, cfg.checkpoint.resume)
    stage = ds_config["zero_optimization"]["stage"]
    plan.elastic = plan.path is not None and needs_elastic(plan.path, pc, stage, cfg.precision.dtype)
    resuming = plan.path is not None
    # no random draw for weights about to be loaded (a resume, or stage 2's init_from); on the GPU when there is one
    model = CodeGeeXModel(cfg.model, pc, initialize=not (resuming or cfg.init_from))
    if plan.path is not None and plan.elastic:  # DeepSpeed's files do not fit this layout: the model's do, resharded
        load_parameters(model, load_shard(plan.path / "model", pc.tp_rank, pc.tp_size), str(plan.path / "model"))
    if cfg.init_from and not resuming:
        record = sampler.sources[0].store.manifest.tokenizer
        markers = record.marker_ids if cfg.init_marker_rows == "mean" else []
        init_from_checkpoint(model, cfg.init_from, markers, record.vocab_size)  # fresh optimizer and schedule
        log.info("weights from %s (embedding separation: %s)", cfg.init_from, cfg.model.embedding_separation)
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    model = model.to(pc.device)
    groups = parameter_groups(model, cfg.optim.weight_decay)
    optimizer = client_optimizer(cfg, groups, guard=stage == 0 and cfg.precision.dtype == "fp32")
    prepare_deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer, config=ds_config,
                                           mpu=MPUAdapter(pc), lr_scheduler=make_scheduler(cfg), dist_init_required=False)
    if pc.dp_size == 1 and stage == 0:  # ZeRO's optimizers need their reduction hooks even alone
        engine.enable_backward_allreduce = False  # one data-parallel rank: nothing to average, skip the bucket copies
    if getattr(optimizer, "guard_skip", None) is not None:
        engine.clip_fp32_gradients = lambda: None  # the trainer clips with the norm it already has (train_step)
    return pc, model, engine, sampler


def _micro_batches(batch: dict[str, np.ndarray], n: int) -> list[dict[str, np.ndarray]]:
    size = len(batch["tokens"]) // n
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(n)]


def write_status(cfg: TrainConfig, pc: ParallelContext, state: str, step: int) -> None:
    """``RUN_DIR/status.json``: running, stopped (by a signal, with a checkpoint: resume it) or completed (``killed``,
    by a second signal, is written by :mod:`megatron_code.run_lock`). Batch
    scripts read it to decide whether to requeue."""
    if pc.rank == 0:
        path = Path(cfg.run_dir) / "status.json"
        path.write_text(json.dumps({"state": state, "step": step, "train_steps": cfg.train_steps,
                                    "checkpoints": str(cfg.checkpoint_dir)}) + "\n")


@dataclass
class StepResult:
    """What one optimizer step reports, all read from the device at once."""

    loss: float  # mean over the global batch's counted tokens
    skipped: bool  # NaN/Inf loss or gradients: no update
    stop: bool  # some rank received SIGTERM/SIGUSR1
    grad_norm: float | None  # the global gradient norm before clipping, when the trainer computed it (no ZeRO)


def train_step(engine: Any, pc: ParallelContext, micros: list[ModelInputs], stop_flag: float = 0.0,
               nan: bool = False) -> StepResult:
    """One optimizer step over this rank's micro-batches, with one host sync: the loss, the token count, the agreed
    stop signal and (without ZeRO) the gradient norm are read from the device together: before the update without
    ZeRO (whether to skip it depends on the norm), after it with ZeRO (so the device is not drained before the
    optimizer is even launched)."""
    accumulation = len(micros)
    # every token of the global batch weighs the same, however it is split into micro-batches and ranks
    total = torch.stack([m.loss_mask.sum() for m in micros]).sum().reshape(1)  # (1,) on the device
    if pc.dp_size > 1:
        dist.all_reduce(total, group=pc.dp_group)
    weight = (accumulation * pc.dp_size) / total.clamp(min=1)  # DeepSpeed divides by both
    summed = torch.zeros(1, device=pc.device)
    for i, inp in enumerate(micros):
        logits, _ = engine(inp.tokens, inp.position_ids, inp.mask, text=inp.text)
        token_sum = (vocab_parallel_cross_entropy(logits, inp.labels, pc) * inp.loss_mask).sum()  # fp32
        if nan:
            token_sum = token_sum * float("nan")
        engine.backward(token_sum * weight)
        summed += token_sum.detach().float()
        if i < accumulation - 1:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-batch
    if pc.dp_size > 1:
        dist.all_reduce(summed, group=pc.dp_group)
    optimizer = engine.optimizer
    guarded = getattr(optimizer, "guard_skip", None) is not None
    params = [p for g in optimizer.param_groups for p in g["params"]] if guarded else []
    norm = grad_norm(params, pc) if guarded else torch.zeros(1, device=pc.device)  # (1,)
    stop = torch.full((1,), float(stop_flag), device=pc.device)
    if pc.world_size > 1:
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    if not guarded:
        engine.step()  # ZeRO's optimizer checks overflow and clips itself
    loss_sum, count, stopping, norm_value = torch.cat([summed, total, stop, norm]).tolist()  # the one host sync
    mean = loss_sum / max(count, 1.0)
    if guarded:
        optimizer.guard_skip = not math.isfinite(norm_value)
        if not optimizer.guard_skip:
            clip_with(params, norm, engine.gradient_clipping())
        engine._global_grad_norm = norm_value
        engine.step()
    skipped = not getattr(engine, "_step_applied", True) or not math.isfinite(mean)
    return StepResult(mean, skipped, stopping > 0, norm_value if guarded else None)


def validation_loss(cfg: TrainConfig, engine: Any, pc: ParallelContext, device: torch.device,
                    objective: Objective) -> float:
    """Mean loss over the same held-out batches every time (summed on the device, read once)."""
    vcfg = SamplerConfig(sources=[SourceConfig(path=cfg.validation.path)], seed=0,
                         global_batch_size=cfg.data.global_batch_size, verify_checksums=False)
    sampler = DataSampler(vcfg, pc.dp_rank, pc.dp_size)
    engine.eval()
    total = torch.zeros(2, device=pc.device)  # (loss sum, tokens)
    with torch.no_grad():
        for _ in range(cfg.validation.batches):
            inp = prepare_batch(sampler.next_batch(), device, objective)
            logits, _ = engine(inp.tokens, inp.position_ids, inp.mask, text=inp.text)
            loss, count = lm_loss(logits, inp, pc)
            total += torch.stack([loss.float() * count, count.float()])
    dist.all_reduce(total, group=pc.dp_group)
    engine.train()
    loss_sum, count = total.tolist()
    return loss_sum / max(count, 1.0)


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


def step_values(engine: Any, result: StepResult, skipped_total: int, logging_step: bool) -> dict[str, Any]:
    """A step's metrics: loss, learning rate, gradient norm, loss scale, skipped steps so far. With ZeRO the norm is
    DeepSpeed's device tensor: read (a host sync) only on logging steps."""
    scale = getattr(engine.optimizer, "cur_scale", getattr(engine.optimizer, "loss_scale", 1.0))
    values = {"loss": result.loss, "lr": float(engine.get_lr()[0]), "loss_scale": float(scale or 1.0),
              "skipped_steps": skipped_total}
    if result.grad_norm is not None or logging_step:
        norm = result.grad_norm if result.grad_norm is not None else engine.get_global_grad_norm()
        values["grad_norm"] = float(norm) if norm is not None else 0.0
    return values


def log_step(step: int, train_steps: int, last: dict[str, Any]) -> None:
    """One line of a step's metrics and throughput (``last``: :func:`step_values` and :meth:`Throughput.report`)."""
    mfu = f", MFU {last['mfu']:.1%}" if "mfu" in last else ""
    log.info("step %d/%d loss %.4f lr %.3g grad-norm %.3f scale %g skipped %d | %.0f tokens/s, %.2f TFLOP/s/device%s",
             step, train_steps, last["loss"], last["lr"], last["grad_norm"], last["loss_scale"], last["skipped_steps"],
             last["tokens_per_s"], last["tflops_per_device"], mfu)


def train(cfg: TrainConfig, command: list[str]) -> dict[str, Any]:
    """Run (or resume) training; returns the last step's metrics. Rank 0 holds the run directory's lock
    (:class:`RunLock`: a second live job is refused before anything is built) until training ends; SIGTERM, SIGINT
    and SIGUSR1 stop it after a step with a checkpoint (:class:`StopSignal`)."""
    rank0 = launch_rank() == 0
    run, ckpt = Path(cfg.run_dir).resolve(), cfg.checkpoint_dir.resolve()
    outside = ckpt != run and run not in ckpt.parents  # a checkpoint.dir of its own: locked too (jobs sharing it)
    with RunLock(run, hold=rank0), RunLock(ckpt, hold=rank0 and outside), \
            StopSignal(run / "status.json" if rank0 else None) as stop:
        return _train(cfg, command, stop)


def _train(cfg: TrainConfig, command: list[str], stop: StopSignal) -> dict[str, Any]:
    """:func:`train` inside the run lock and the signal handlers."""
    plan = ResumePlan()
    pc, model, engine, sampler = build(cfg, plan)
    objective = make_objective(cfg, [(sc.path, s.store.manifest) for s, sc in zip(sampler.sources, cfg.data.sources)])
    device = pc.device
    accumulation = cfg.accumulation(pc.dp_size)
    start, skipped_total = resume_point(plan, engine, model, sampler)
    metrics = Metrics(cfg, pc.rank, start)
    obs = Observer(cfg, model, pc, start)  # W&B, profiler, per-rank step times, flight recorder (observe.py)
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
        obs.begin(step)
        micros = [prepare_batch(m, device, objective) for m in _micro_batches(sampler.next_batch(), accumulation)]
        obs.entering()
        result = train_step(engine, pc, micros, stop.received, nan=step in cfg.faults.inject_nan_steps)
        obs.returned()
        skipped_total += int(result.skipped)
        consecutive = consecutive + 1 if result.skipped else 0
        if consecutive >= cfg.faults.max_consecutive_skipped:
            raise RuntimeError(f"stopping: {consecutive} steps in a row skipped for NaN/Inf loss or gradients "
                               f"(faults.max_consecutive_skipped = {cfg.faults.max_consecutive_skipped}); last at step {step}")
        speed.steps += 1
        logging_step = step % cfg.log.interval == 0 or step == cfg.train_steps
        last = step_values(engine, result, skipped_total, logging_step)
        if logging_step:
            last.update(speed.report())
            last.update(obs.step_times(step))  # every rank: one all-gather
            log_step(step, cfg.train_steps, last)
        if cfg.validation.path and step % cfg.validation.interval == 0:
            obs.phase("validation")
            last["validation_loss"] = validation_loss(cfg, engine, pc, device, objective)
            log.info("step %d validation loss %.4f", step, last["validation_loss"])
        metrics.write(step, last)
        obs.write(step, last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}")
        stopping = result.stop
        if step % cfg.checkpoint.interval == 0 or step == cfg.train_steps or stopping:
            obs.phase("checkpoint")
            state = {"sampler": sampler.state_dict(), "skipped_steps": skipped_total, "config": to_dict(cfg),
                     "git_revision": git_revision(), "command": command}
            path = save_training_checkpoint(cfg.checkpoint_dir, step, engine, model, state, cfg.checkpoint.keep,
                                            sampler.sources[0].store.manifest, objective.name,
                                            cfg.checkpoint.elastic, cfg.faults.kill_in_save or None)
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
    obs.close()
    write_status(cfg, pc, "stopped" if stopped_at < cfg.train_steps else "completed", stopped_at)
    return last
