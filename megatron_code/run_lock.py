"""One live training job per run directory (``RUN_DIR/.lock``), and how a job stops when told (:class:`StopSignal`:
after a step with a checkpoint, or, told twice, at once with ``status.json`` marked killed).

The trainer's rank 0 takes the lock at the start of :func:`megatron_code.training.train` (before anything is built
or loaded) and releases it when training ends; ``codegeex launch`` checks it before starting anything
(:func:`check_run_dir`). The file holds one JSON object naming the holder (:class:`Holder`): host, pid and that
process's start time (so a reused pid is not taken for the holder), SLURM job id, torchrun run id and restart round,
the ``codegeex launch`` process that started it, when it started, and a heartbeat the holder refreshes every
:data:`HEARTBEAT_S` seconds.

The holder keeps an ``flock`` on the open file: the kernel drops it with the holder's last descriptor, however the
process ends, so on one host a dead holder never blocks. A record left behind by a holder that was killed is judged:

- another process holds the ``flock``: live;
- the holder is on this host: live while its pid runs with the recorded start time, otherwise stale;
- the holder is on another host (where an ``flock`` over NFS may not be visible): stale when it is this job's own
  earlier round (the same SLURM job after a requeue, or the same torchrun run at a later restart round), live while
  its heartbeat is younger than :data:`STALE_S`, stale after.

A live holder refuses the new job with :class:`RunLockHeld`, naming it; a stale record is taken over with a
warning. Releasing removes the file (a waiting opener notices by the inode and opens the new one).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import psutil

from common.io import write_text_atomic

log = logging.getLogger("codegeex.train")

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0  # how often the holder refreshes its heartbeat
STALE_S = 300.0  # a holder on another host whose heartbeat is older than this is taken for dead


class RunLockHeld(ValueError):
    """The run directory belongs to another live job. (A ValueError, so ``codegeex`` reports it as one error line
    and exits 1 rather than printing a traceback.)"""


@dataclass
class Holder:
    """Who holds a run directory, as ``RUN_DIR/.lock`` records it."""

    host: str  # socket.gethostname() of the holder
    pid: int  # the holder's process (the trainer's rank 0)
    pid_started: float  # that process's start time (psutil, epoch seconds): a reused pid is not the holder
    slurm_job: str  # SLURM_JOB_ID, or ""
    torchrun_run: str  # TORCHELASTIC_RUN_ID (torchrun's --rdzv-id), or ""
    restart: int  # TORCHELASTIC_RESTART_COUNT: torchrun's restart round
    launcher_pid: int  # the `codegeex launch` process that started the job (0: started otherwise)
    started: float  # when the lock was taken (epoch seconds)
    heartbeat: float  # when the holder last refreshed it (epoch seconds)

    @classmethod
    def here(cls, now: float | None = None) -> Holder:
        """This process, as it would hold the lock."""
        now = time.time() if now is None else now
        env = os.environ
        return cls(host=socket.gethostname(), pid=os.getpid(), pid_started=psutil.Process().create_time(),
                   slurm_job=env.get("SLURM_JOB_ID", ""), torchrun_run=env.get("TORCHELASTIC_RUN_ID", ""),
                   restart=_int(env.get("TORCHELASTIC_RESTART_COUNT")),
                   launcher_pid=_int(env.get("CODEGEEX_LAUNCHER_PID")), started=now, heartbeat=now)

    def job(self) -> str:
        """The job, in words: its SLURM job id, its torchrun run, or that it has none."""
        if self.slurm_job:
            return f"SLURM job {self.slurm_job}"
        if self.torchrun_run:
            return f"torchrun run {self.torchrun_run} (restart {self.restart})"
        return "no job id"

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        started = datetime.datetime.fromtimestamp(self.started).astimezone().isoformat(timespec="seconds")
        launcher = f", started by `codegeex launch` pid {self.launcher_pid}" if self.launcher_pid else ""
        return (f"host {self.host}, pid {self.pid}, {self.job()}{launcher}, since {started}, heartbeat "
                f"{max(0.0, now - self.heartbeat):.0f} s ago")

    def is_earlier_round_of(self, me: Holder) -> bool:
        """Whether this holder is ``me``'s own job in an earlier round: the same SLURM job (requeued), or the same
        torchrun run at an earlier restart round."""
        if self.slurm_job and self.slurm_job == me.slurm_job:
            return True
        return bool(self.torchrun_run) and self.torchrun_run == me.torchrun_run and self.restart < me.restart

    def encode(self) -> bytes:
        return (json.dumps(asdict(self)) + "\n").encode()


def _int(text: str | None) -> int:
    return int(text) if text and text.isdigit() else 0


def decode(data: bytes) -> Holder | None:
    """A holder from the file's bytes; None for an empty or unreadable record. Trailing bytes are ignored (a holder
    rewriting a shorter record in place truncates after writing)."""
    try:
        obj, _ = json.JSONDecoder().raw_decode(data.decode("utf-8", errors="replace").lstrip())
        return Holder(**{f.name: obj[f.name] for f in fields(Holder)})
    except (ValueError, KeyError, TypeError):
        return None


def read_holder(path: Path) -> Holder | None:
    """The record at ``path`` (None: no file, or empty); a record being rewritten is read again."""
    for _ in range(3):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if not data.strip():
            return None
        holder = decode(data)
        if holder is not None:
            return holder
        time.sleep(0.05)
    log.warning("%s: unreadable record %r, taken for stale", path, data[:200])
    return None


def pid_alive(pid: int, started: float) -> bool:
    """Whether ``pid`` runs on this host and is the process that started at ``started`` (not a zombie)."""
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def why_live(holder: Holder, me: Holder, now: float) -> str | None:
    """Why ``holder`` (whose ``flock`` is not seen) still counts as alive for ``me``, or None when it is stale."""
    if holder.host == me.host:
        if pid_alive(holder.pid, holder.pid_started):
            return "its process is running"
        return None
    if holder.is_earlier_round_of(me):
        return None
    age = now - holder.heartbeat
    if age < STALE_S:
        return f"it is on another host and its heartbeat is {age:.0f} s old (stale after {STALE_S:.0f} s)"
    return None


def refusal(run_dir: Path, holder: Holder | None, why: str, now: float | None = None) -> RunLockHeld:
    who = holder.describe(now) if holder is not None else "a process that has not yet written its record"
    stop = (f"; stop it with SIGTERM to pid {holder.launcher_pid or holder.pid} on {holder.host}"
            if holder is not None else "")
    return RunLockHeld(f"run directory {run_dir} is in use by a live job ({why}): {who}{stop}. If that job is "
                       f"gone, remove {run_dir / LOCK_NAME}")


def check_run_dir(run_dir: Path) -> Holder | None:
    """``codegeex launch``'s check before it starts a job: raise :class:`RunLockHeld` when a live job holds
    ``run_dir``; return a stale holder (which the new job's rank 0 will take over), or None. Takes no lock."""
    path = run_dir / LOCK_NAME
    holder = read_holder(path)
    if holder is None:
        return None
    me, now = Holder.here(), time.time()
    why = why_live(holder, me, now)
    if why is not None:
        raise refusal(run_dir, holder, why, now)
    return holder


class RunLock:
    """Rank 0's hold on ``RUN_DIR/.lock`` for the length of a training run (a context manager)."""

    def __init__(self, run_dir: Path, hold: bool = True) -> None:
        """``hold``: False on the ranks other than 0 (then entering and leaving do nothing)."""
        self.hold = hold
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd = -1
        self.holder: Holder | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        return self.acquire() if self.hold else self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunLockHeld` naming the live holder; a stale holder is replaced with a
        warning. Starts the heartbeat."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    # a filesystem without locks (Lustre without -o flock, some FUSE mounts): the record decides
                    log.warning("%s: the filesystem refuses flock; judging the holder by its record only", self.path)
                else:
                    os.close(fd)
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                        raise
                    raise refusal(self.run_dir, read_holder(self.path), "it holds the file's lock") from None
            if not self._same_file(fd):  # the holder released (removed the file) meanwhile: open the new one
                os.close(fd)
                continue
            try:
                self._take(fd)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise RunLockHeld(f"{self.path}: could not take the lock (the file kept being replaced)")

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _take(self, fd: int) -> None:
        old = decode(os.pread(fd, 1 << 16, 0))
        me, now = Holder.here(), time.time()
        if old is not None:
            why = why_live(old, me, now)
            if why is not None:
                raise refusal(self.run_dir, old, why, now)
            log.warning("%s: the lock of a job that is gone (%s) is taken over", self.path, old.describe(now))
        self.holder = me
        self._write(fd, me)

    @staticmethod
    def _write(fd: int, holder: Holder) -> None:
        data = holder.encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))

    def _beat(self) -> None:
        while not self._done.wait(HEARTBEAT_S):
            self.refresh()

    def refresh(self) -> None:
        """Write a new heartbeat (the heartbeat thread calls this every :data:`HEARTBEAT_S` seconds)."""
        if self.fd < 0 or self.holder is None:
            return
        current = decode(os.pread(self.fd, 1 << 16, 0))
        if current is not None and (current.host, current.pid) != (self.holder.host, self.holder.pid):
            log.error("%s: taken over by %s while this job holds it", self.path, current.describe())
            return
        self.holder.heartbeat = time.time()
        with contextlib.suppress(OSError):
            self._write(self.fd, self.holder)

    def release(self) -> None:
        """Stop the heartbeat, remove the file (unless another job took it over) and drop the lock."""
        if self.fd < 0:
            return
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = decode(os.pread(self.fd, 1 << 16, 0))
        ours = self.holder is not None and current is not None and (current.host, current.pid) == (
            self.holder.host, self.holder.pid)
        if ours and self._same_file(self.fd):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        os.close(self.fd)
        self.fd = -1


def launch_rank() -> int:
    """This process's global rank as its launcher gave it (torchrun and DeepSpeed: RANK; srun alone: SLURM_PROCID;
    neither: 0), readable before torch.distributed is initialised."""
    return _int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def mark_killed(status: Path, signum: int) -> bool:
    """``status.json`` of a job killed without a checkpoint of the step in flight: a ``running`` (or missing) state
    becomes ``killed``, with the signal's name; a state the run ended with (``stopped``, ``completed``) is kept.
    Returns whether it wrote."""
    try:
        data: dict[str, Any] = json.loads(status.read_text())
    except (OSError, ValueError):
        data = {}
    if data.get("state", "running") != "running":
        return False
    data.update(state="killed", signal=signal.Signals(signum).name)
    write_text_atomic(status, json.dumps(data) + "\n")
    return True


class StopSignal:
    """Remembers SIGTERM, SIGINT (Ctrl-C: no KeyboardInterrupt mid-step) and SIGUSR1; ranks agree on it once per
    step, inside the step's one host read (:func:`train_step`), then save and exit 0. A second SIGTERM or SIGINT,
    ``REPEAT_S`` or more after the first (sooner, it is the same request delivered twice: by SLURM to every process
    and again by torchrun's agent), exits at once without a checkpoint of the step in flight, with code 128 + N;
    rank 0 (``status`` given) first marks ``status.json`` killed. A context manager: leaving it restores the
    previous handlers."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    REPEAT_S = 1.0

    def __init__(self, status: Path | None = None) -> None:
        self.received = 0  # the first signal's number; 0 until one comes
        self.status = status
        self._first_at = 0.0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if not self.received:
            self.received, self._first_at = signum, now
        elif signum != signal.SIGUSR1 and now - self._first_at >= self.REPEAT_S:
            if self.status is not None:
                with contextlib.suppress(OSError):
                    mark_killed(self.status, signum)
            os.write(2, f"signal {signum} again: exiting now, without a checkpoint of the step in flight\n".encode())
            os._exit(128 + signum)

    def __enter__(self) -> StopSignal:
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
