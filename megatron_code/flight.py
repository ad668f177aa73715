"""Each rank's last operations, written down when it stops making progress (a collective that does not return).

On GPUs, NCCL's own flight recorder (a ring of the last collectives, with their sequence numbers and states) is
switched on by environment variables that must be set before the process group exists, and is dumped by the NCCL
watchdog to ``RUN_DIR/flight/nccl-rank-R`` on a timeout (read it with ``python -m torch.distributed.flight_recorder.
fr_trace RUN_DIR/flight/ --prefix nccl-rank-``). On every backend, :class:`FlightRecorder` keeps the rank's step and
phase (data, forward, backward, optimizer, log, validation, checkpoint), told by the trainer and by model and
optimizer hooks, and a watchdog thread that, when neither changes for half the collective timeout, writes
``RUN_DIR/flight/rank-R.json`` (step, phase, the recent phases with their times, every thread's Python stack). The
process group's timeout then ends a rank waiting in a collective with an error; a rank stuck outside one (in its data,
say) is ended by the watchdog at 1.5 times the timeout, with :data:`WATCHDOG_EXIT_CODE`, after writing its record
again.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from common.io import write_text_atomic
from megatron_code.train_config import TrainConfig

log = logging.getLogger("codegeex.train")

WATCHDOG_EXIT_CODE = 124  # as coreutils' timeout: the rank was ended for making no progress
NCCL_PREFIX = "nccl-rank-"


def flight_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.run_dir) / "flight"


def _setdefault(names: tuple[str, ...], value: str) -> None:
    """Set the first of ``names`` (torch's current name, then older ones it still reads) unless any is set."""
    if not any(n in os.environ for n in names):
        os.environ[names[0]] = value


def prepare_process_group(cfg: TrainConfig) -> None:
    """Before the process group is created: NCCL's flight recorder on (a CUDA machine), dumped on a timeout into
    ``RUN_DIR/flight/``. Variables the user set are kept."""
    if not (cfg.faults.flight_recorder and torch.cuda.is_available()):
        return
    flight_dir(cfg).mkdir(parents=True, exist_ok=True)
    _setdefault(("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"), "2000")
    _setdefault(("TORCH_NCCL_DUMP_ON_TIMEOUT",), "1")
    _setdefault(("TORCH_NCCL_ENABLE_MONITORING",), "1")
    _setdefault(("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"), str(flight_dir(cfg) / NCCL_PREFIX))


_ACTIVE: list[FlightRecorder] = []  # the recorder of this process's training loop, while it runs


def progress() -> None:
    """Progress made outside the loop's phases (a checkpoint's files and parameters): the watchdog waits on."""
    for recorder in _ACTIVE:
        recorder.beat()


class FlightRecorder:
    """The rank's step and phase, and a watchdog thread over them (see the module docstring).

    ``anchor``: the frame of the loop being watched (the trainer's); once it has left its thread's stack (the loop
    ended, also by an exception) the watchdog stops by itself, so a failed run never ends its process later."""

    def __init__(self, path: Path, rank: int, world: int, timeout_s: float, anchor: FrameType) -> None:
        self.path, self.rank, self.world, self.timeout = path, rank, world, timeout_s
        self.step, self.phase, self.beats = 0, "init", 0
        self.recent: deque[tuple[float, int, str]] = deque(maxlen=32)  # (wall time, step, phase)
        dump = os.environ.get("TORCH_FR_DUMP_TEMP_FILE") or os.environ.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
        self.nccl_trace = f"{dump}{rank}" if dump and torch.cuda.is_available() else None  # where NCCL dumps its ring
        self._anchor, self._owner = anchor, threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"codegeex-flight-rank-{rank}", daemon=True)
        self._thread.start()
        _ACTIVE[:] = [self]

    def set(self, step: int, phase: str) -> None:
        """The rank is now at ``phase`` of ``step`` (cheap: no lock, no I/O; the watchdog reads it)."""
        if phase != self.phase or step != self.step:
            self.step, self.phase = step, phase
            self.recent.append((time.time(), step, phase))

    def beat(self) -> None:
        """Progress within a phase (a forward pass, say)."""
        self.beats += 1

    def close(self) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self._stop.set()
        self._thread.join(timeout=5)

    def _state(self) -> tuple[int, str, int]:
        return self.step, self.phase, self.beats

    def _anchored(self) -> bool:
        frame: FrameType | None = sys._current_frames().get(self._owner)
        while frame is not None:
            if frame is self._anchor:
                return True
            frame = frame.f_back
        return False

    def _watch(self) -> None:
        poll = min(max(self.timeout / 20, 0.05), 10.0)
        seen, since, writes = self._state(), time.monotonic(), 0  # writes: 0 none, 1 at 0.5x, 2 at 1x, 3 at 1.5x
        while not self._stop.wait(poll):
            if not self._anchored():
                return  # the loop is over (an exception passed through it): nothing left to watch
            state = self._state()
            if state != seen:
                if writes:
                    log.warning("rank %d: progress again after %.0f s at step %d (%s); %s removed", self.rank,
                                time.monotonic() - since, seen[0], seen[1], self.path)
                    self.path.unlink(missing_ok=True)
                seen, since, writes = state, time.monotonic(), 0
                continue
            stalled = time.monotonic() - since
            due = 1 + int(stalled >= self.timeout) + int(stalled >= 1.5 * self.timeout)
            if stalled < self.timeout / 2 or due <= writes:
                continue
            self.write(stalled)
            writes = due
            log.error("rank %d: no progress for %.0f s at step %d, phase %s (collective timeout %.0f s): %s written",
                      self.rank, stalled, seen[0], seen[1], self.timeout, self.path)
            if due == 3:
                log.error("rank %d: still stuck at 1.5 x the collective timeout: exiting with code %d", self.rank,
                          WATCHDOG_EXIT_CODE)
                logging.shutdown()
                sys.stderr.flush()
                os._exit(WATCHDOG_EXIT_CODE)

    def record(self, stalled: float) -> dict[str, Any]:
        """What ``rank-R.json`` holds."""
        names = {t.ident: t.name for t in threading.enumerate()}
        stacks = {names.get(tid, str(tid)): traceback.format_stack(frame)
                  for tid, frame in sys._current_frames().items() if tid != threading.get_ident()}

        def at(t: float) -> str:
            return datetime.datetime.fromtimestamp(t).isoformat(timespec="milliseconds")

        return {"rank": self.rank, "world_size": self.world, "host": socket.gethostname(), "pid": os.getpid(),
                "step": self.step, "phase": self.phase, "stalled_s": round(stalled, 3),
                "collective_timeout_s": self.timeout, "written_at": at(time.time()),
                "recent": [{"at": at(t), "step": s, "phase": p} for t, s, p in self.recent.copy()],
                "nccl_trace": self.nccl_trace,
                "stacks": stacks}

    def write(self, stalled: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.record(stalled), indent=1) + "\n")
