"""Observability of a training run, behind a few hook calls in :func:`megatron_code.training.train`.

- Weights & Biases (``log.wandb``): rank 0 logs every metrics.jsonl line and the resolved config once; offline mode
  needs no network; a resumed run continues the same W&B run (its id in ``RUN_DIR/wandb-run-id``).
- A torch.profiler window (``profile.steps: [first, last]``) on ``profile.ranks``: one Chrome trace per rank.
- CUDA allocator snapshots (``profile.memory_snapshot_steps``): the allocator's history during a step, dumped after it.
- Per-rank step times (``log.rank_step_times``): measured with ``perf_counter`` on every rank (the step already ends
  in a host read), gathered in one all-gather on logging steps only, so no step gets a host sync it did not have.
- The flight recorder (``faults.flight_recorder``; :mod:`megatron_code.flight`): the step and phase of each rank.

Per-rank step time: every step ends in collectives that make all ranks finish together, so a rank's wall time per
step is everyone's. What differs is how long each rank works before it joins the step: its host time outside
``train_step`` (data, logging, checkpoints, and any stall); the rank that arrives last waits for nobody, so the
shortest ``train_step`` is the step's own cost. A rank's step time is therefore its host time plus that shortest
``train_step`` time: the slowest rank's equals the measured step, the others' what they would need alone. A rank slow
inside the step (a slower GPU) delays every rank's collectives equally and shows as a slower step everywhere, not as a
straggler: profile it (``profile.ranks``) and compare kernel times.
"""

from __future__ import annotations

import logging
import secrets
import statistics
import string
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook

from common.config import ConfigError, to_dict
from common.io import write_text_atomic
from megatron_code.flight import FlightRecorder, flight_dir, prepare_process_group
from megatron_code.parallel import ParallelContext
from megatron_code.train_config import TrainConfig

__all__ = ["Observer", "prepare_process_group"]

log = logging.getLogger("codegeex.train")

STEP_PHASES = ("data", "forward", "backward", "optimizer")  # the phases model and optimizer hooks may move between


class StepTimes:
    """Each rank's host time and ``train_step`` time summed since the last logging step (see the module docstring)."""

    def __init__(self, pc: ParallelContext, straggler_ratio: float) -> None:
        self.pc, self.ratio = pc, straggler_ratio
        self.host = self.step = 0.0
        self.steps = 0
        self.last: float | None = None  # when the previous train_step returned
        self.entered = 0.0

    def begin(self) -> None:
        if self.last is None:
            self.last = time.perf_counter()

    def entering(self) -> None:
        self.entered = time.perf_counter()
        self.host += self.entered - (self.last if self.last is not None else self.entered)

    def returned(self) -> None:
        self.last = time.perf_counter()
        self.step += self.last - self.entered
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        """Leave out host time the run spent on itself (a trace export), so it does not look like a straggler."""
        if self.last is not None:
            self.last += seconds

    def gather(self, step: int) -> dict[str, Any]:
        """Every rank's mean (host, step) seconds since the last call, in one all-gather; rank 0's figures."""
        n = max(self.steps, 1)
        mine = torch.tensor([self.host / n, self.step / n], dtype=torch.float64, device=self.pc.device)  # (2,)
        self.host = self.step = 0.0
        self.steps = 0
        if self.pc.world_size > 1:
            parts = [torch.empty_like(mine) for _ in range(self.pc.world_size)]
            dist.all_gather(parts, mine)
            table = torch.stack(parts).tolist()  # (world, 2): the one host read, on logging steps only
        else:
            table = [mine.tolist()]
        shortest = min(s for _, s in table)
        times = [h + shortest for h, _ in table]
        median = statistics.median(times)
        slowest = max(range(len(times)), key=times.__getitem__)
        if self.pc.rank == 0 and self.ratio > 0 and median > 0 and times[slowest] > self.ratio * median:
            log.warning("step %d: rank %d is a straggler: %.3f s per step against a median of %.3f s (%.2fx, above "
                        "log.straggler_ratio %.2f)", step, slowest, times[slowest], median, times[slowest] / median,
                        self.ratio)
        return {"step_time_min_s": min(times), "step_time_median_s": median, "step_time_max_s": times[slowest],
                "slowest_rank": slowest}


class WandbRun:
    """Rank 0's W&B run: the resolved config at init, one ``log`` per step."""

    def __init__(self, cfg: TrainConfig, start: int) -> None:
        import wandb

        wc, run_dir = cfg.log.wandb, Path(cfg.run_dir)
        id_file = run_dir / "wandb-run-id"
        run_dir.mkdir(parents=True, exist_ok=True)
        resumed = start > 0 and id_file.is_file()
        run_id = id_file.read_text().strip() if resumed else ''.join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        write_text_atomic(id_file, run_id + "\n")
        where = Path(wc.dir or run_dir)
        where.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=wc.project, entity=wc.entity or None, name=wc.name or run_dir.resolve().name,
                              id=run_id, resume="allow", mode=wc.mode, dir=str(where), config=to_dict(cfg),
                              tags=wc.tags or None, settings=wandb.Settings(console="off", quiet=True))
        log.info("W&B run %s (%s, %s) under %s%s", run_id, wc.mode, wc.project, where / "wandb",
                 f", continued from step {start}" if resumed else "")

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class ProfileWindow:
    """torch.profiler over ``profile.steps`` and CUDA memory snapshots of ``profile.memory_snapshot_steps``, on this
    rank if it is one of ``profile.ranks``."""

    def __init__(self, cfg: TrainConfig, pc: ParallelContext) -> None:
        p = cfg.profile
        self.dir = Path(p.dir or Path(cfg.run_dir) / "profile")
        self.rank, self.record_shapes, self.entries = pc.rank, p.record_shapes, p.memory_snapshot_entries
        mine = pc.rank in p.ranks
        self.window = tuple(p.steps) if mine and p.steps else None
        self.snapshots = set(p.memory_snapshot_steps) if mine else set()
        if self.snapshots and not torch.cuda.is_available():
            log.warning("profile.memory_snapshot_steps %s: skipped on rank %d, which has no CUDA (snapshots are of "
                        "CUDA's allocator)", sorted(self.snapshots), pc.rank)
            self.snapshots = set()
        self.prof: Any = None

    def begin(self, step: int) -> None:
        if step in self.snapshots:
            torch.cuda.memory._record_memory_history(max_entries=self.entries)
        if self.window and step == self.window[0]:
            from torch.profiler import ProfilerAction, ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            # a schedule (record every step until stop) is what makes the profiler annotate its steps
            self.prof = profile(activities=activities, record_shapes=self.record_shapes,
                                schedule=lambda _: ProfilerAction.RECORD)
            self.prof.step_num = step  # its step annotations then read ProfilerStep#<training step>
            self.prof.start()

    def end(self, step: int) -> float:
        """After ``step``: the next profiler step, or the trace written; a snapshot dumped. Returns the seconds spent
        writing files."""
        started = time.perf_counter()
        if self.prof is not None and self.window is not None:
            if step < self.window[1]:
                self.prof.step()
                return 0.0
            self.prof.stop()
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / f"rank-{self.rank}.steps-{self.window[0]}-{self.window[1]}.pt.trace.json.gz"
            self.prof.export_chrome_trace(str(path))
            self.prof = None
            log.info("profile of steps %d-%d: %s", *self.window, path)
        if step in self.snapshots:
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / f"memory-rank-{self.rank}-step-{step}.pickle"
            torch.cuda.memory._dump_snapshot(str(path))
            torch.cuda.memory._record_memory_history(enabled=None)
            log.info("CUDA memory snapshot of step %d: %s", step, path)
        return time.perf_counter() - started


class Observer:
    """What :func:`megatron_code.training.train` calls: ``begin(step)``, ``entering()`` and ``returned()`` around
    ``train_step``, ``phase(name)``, ``step_times(step)`` on logging steps, ``write(step, values)`` after the metrics
    line, ``close()`` after the loop. Create it in the function whose loop it watches (the flight recorder's anchor)."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, pc: ParallelContext, start: int) -> None:
        outside = [r for r in cfg.profile.ranks if r >= pc.world_size]
        if outside:
            raise ConfigError(f"profile.ranks {outside} are not ranks of this world of {pc.world_size}")
        self.cfg, self.pc, self.step = cfg, pc, start
        self.times = StepTimes(pc, cfg.log.straggler_ratio) if cfg.log.rank_step_times else None
        self.profile = ProfileWindow(cfg, pc)
        self.flight = None
        if cfg.faults.flight_recorder:
            self.flight = FlightRecorder(flight_dir(cfg) / f"rank-{pc.rank}.json", pc.rank, pc.world_size,
                                         cfg.faults.collective_timeout_minutes * 60, sys._getframe(1))
            self.hooks = [model.register_forward_pre_hook(self._forward), model.register_forward_hook(self._output),
                          register_optimizer_step_pre_hook(self._optimizer)]
        self.wandb = WandbRun(cfg, start) if pc.rank == 0 and cfg.log.wandb.mode != "disabled" else None

    def phase(self, name: str) -> None:
        if self.flight is not None:
            self.flight.set(self.step, name)

    def begin(self, step: int) -> None:
        self.step = step
        self.phase("data")
        if self.times is not None:
            self.times.begin()
        self.profile.begin(step)
        f = self.cfg.faults
        if step == f.hang_at_step and self.pc.rank in f.hang_ranks:
            log.warning("faults.hang_at_step: rank %d sleeps %.1f s before its batch of step %d", self.pc.rank,
                        f.hang_seconds, step)
            time.sleep(f.hang_seconds)

    def entering(self) -> None:
        """The batch is ready; ``train_step`` starts (its first collective comes before the first forward)."""
        self.phase("forward")
        if self.times is not None:
            self.times.entering()

    def returned(self) -> None:
        if self.times is not None:
            self.times.returned()
        self.phase("log")

    def step_times(self, step: int) -> dict[str, Any]:
        """On logging steps, on every rank (a collective): the per-rank step-time fields of the metrics line."""
        return self.times.gather(step) if self.times is not None else {}

    def write(self, step: int, values: dict[str, Any]) -> None:
        """After the step's metrics line: the same values to W&B; the profiler's step; a memory snapshot."""
        if self.wandb is not None:
            self.wandb.log(step, values)
        spent = self.profile.end(step)
        if self.times is not None:
            self.times.exclude(spent)

    def close(self) -> None:
        if self.flight is not None:
            for hook in self.hooks:
                hook.remove()
            self.flight.close()
        if self.wandb is not None:
            self.wandb.close()

    # hooks: cheap attribute writes only, never a host sync
    def _forward(self, module: Any, args: Any) -> None:
        assert self.flight is not None
        self.flight.beat()
        if self.flight.phase in STEP_PHASES:
            self.flight.set(self.step, "forward")

    def _output(self, module: Any, args: Any, output: Any) -> None:
        first = next((t for t in (output if isinstance(output, tuple | list) else (output,))
                      if isinstance(t, torch.Tensor) and t.requires_grad), None)
        if first is not None:
            first.register_hook(self._backward)

    def _backward(self, grad: torch.Tensor) -> None:
        assert self.flight is not None
        if self.flight.phase in STEP_PHASES:
            self.flight.set(self.step, "backward")

    def _optimizer(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        assert self.flight is not None
        self.flight.beat()
        if self.flight.phase in STEP_PHASES:
            self.flight.set(self.step, "optimizer")
