"""Launcher command lines: torchrun on one machine or many, and the deepspeed launcher with a hostfile.

Workers always run ``python -m launch.cli train --config RUN_DIR/launch/config.yaml``: the configuration resolved at
launch time, so every node and every restart trains the same thing. The environment the launcher adds (a value the
user already set wins, except for the first):

- ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: rank 0 hosts a fresh TCP store in each rendezvous round, so workers of
  a restarted round never meet the dead round's keys (with torchrun's shared store they can hang).
- ``OMP_NUM_THREADS``: the machine's cores divided among its local ranks.
- ``TORCH_EXTENSIONS_DIR=<sys.prefix>/torch_extensions``: a JIT-built op (if DeepSpeed ever needs one) lands in the
  running environment, not in a ~/.cache shared with other environments (and their stale build locks).
- on GPUs only (see ``GPU_ENVIRONMENT``):

  - ``CUDA_DEVICE_MAX_CONNECTIONS=1``: one hardware queue, so the tensor-parallel and sequence-parallel communication
    kernels are scheduled ahead of the compute they overlap;
  - ``TORCH_NCCL_AVOID_RECORD_STREAMS=1``: the memory of tensors NCCL used on other streams is freed at once instead
    of through ``record_stream`` (which holds it until the caching allocator sees the stream's work finished);
  - ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``: less fragmentation with varying sequence and batch shapes.

DeepSpeed's runner forwards to remote nodes only variables with certain prefixes (``PYTHON``, ``NCCL``, ...) and those
in its ``.deepspeed_env`` file, so for a hostfile of several hosts the launcher writes the variables above (with the
user's own ``.deepspeed_env`` lines after them) into ``RUN_DIR/launch/deepspeed_env`` and points ``DS_ENV_FILE`` at it.

Stopping (:func:`supervise`): ``codegeex launch`` starts the launcher command in a session of its own, so a
terminal's Ctrl-C (and a ``timeout`` or supervisor signalling the process group) reaches only ``codegeex launch``.
On SIGTERM or SIGINT it sends the same signal to every rank itself (the launcher command's own children), not to
torchrun, whose agent would SIGKILL the ranks 30 s later, checkpoint or not: the ranks finish the step, save, exit 0
(``status.json`` = stopped), the launcher command sees every rank succeed and exits 0, and so does ``codegeex
launch``. A second signal, more than ``REPEAT_S`` after the first, stops at once: the launcher command is killed (so
it restarts nothing), the ranks get the signal again (rank 0 marks ``status.json`` killed, each exits 128 + N), and
whatever is left ``KILL_GRACE_S`` later is killed; the exit code is 128 + N. Ranks that appear after a stop (an
elastic restart, because a rank failed while stopping) also stop everything at once. The launcher command dies with
``codegeex launch`` even when that is SIGKILLed (its parent-death signal is SIGTERM, which torchrun passes on).
With DeepSpeed's runner (a hostfile of several hosts) the ranks run under pdsh on each host, out of reach: the
signal goes to the runner, which ends them without a checkpoint."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from common.config import ConfigError
from megatron_code.run_lock import mark_killed

log = logging.getLogger("codegeex.launch")

TRAIN_MODULE = ["-m", "launch.cli", "train"]


# on GPUs, unless already set; why each one: the module docstring
GPU_ENVIRONMENT = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
}
# what worker_environment adds that DeepSpeed's runner would not forward to remote nodes by its prefixes
REMOTE_ENVIRONMENT = ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR",
                      *GPU_ENVIRONMENT)


def extensions_dir() -> str:
    """Where JIT-built torch/DeepSpeed ops go: the running environment's own directory (as the Makefile sets it)."""
    return str(Path(sys.prefix) / "torch_extensions")


def gpus_here() -> bool:
    """Whether this machine's workers run on GPUs (the launchers that start them here ask this)."""
    import torch

    return bool(torch.cuda.is_available())


def worker_environment(nproc_per_node: int, base: dict[str, str] | None = None, *, gpus: bool) -> dict[str, str]:
    """The workers' environment: ``base`` (default ``os.environ``) plus the module docstring's variables."""
    env = dict(os.environ if base is None else base)
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc_per_node))))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    if gpus:
        for key, value in GPU_ENVIRONMENT.items():
            env.setdefault(key, value)
    return env


def deepspeed_env_files(env: dict[str, str], cwd: Path) -> list[Path]:
    """The ``.deepspeed_env`` files DeepSpeed's runner would read (home, then its working directory; the name from
    ``DS_ENV_FILE``), without duplicates."""
    name = env.get("DS_ENV_FILE", ".deepspeed_env")
    files: list[Path] = []
    for folder in (Path(os.path.expanduser("~")), cwd):
        path = folder / name
        if path.is_file() and path.resolve() not in [f.resolve() for f in files]:
            files.append(path)
    return files


def carry_to_remote_workers(env: dict[str, str], path: Path, cwd: Path | None = None) -> dict[str, str]:
    """Write ``REMOTE_ENVIRONMENT``'s values from ``env`` to ``path`` in ``.deepspeed_env`` form, then the lines of the
    user's own ``.deepspeed_env`` files (later lines win in DeepSpeed's runner, so theirs do), and return ``env`` with
    ``DS_ENV_FILE`` pointing at ``path``: DeepSpeed's runner reads it and exports each line on every node."""
    lines = [f"{key}={env[key]}" for key in REMOTE_ENVIRONMENT if key in env]
    for user_file in deepspeed_env_files(env, Path.cwd() if cwd is None else cwd):
        lines += [line for line in user_file.read_text().splitlines() if "=" in line]  # the runner fails on others
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return {**env, "DS_ENV_FILE": str(path.resolve())}


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), with an error naming the value."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--rdzv {text!r} must be HOST:PORT with a port in 1-65535")
    return host, int(port)


def torchrun_command(config: Path | None, *, nproc_per_node: int, nnodes: int = 1, node_rank: int | None = None,
                     rdzv: str = "127.0.0.1:0", run_id: str = "codegeex", max_restarts: int = 0,
                     python: str = sys.executable, monitor_interval: float = 1.0,
                     command: list[str] | None = None) -> list[str]:
    """torchrun with the c10d rendezvous. ``node_rank`` 0 hosts the rendezvous store; others dial it. Workers train
    ``config``, or run the codegeex ``command`` (e.g. ``eval generate ...``) instead."""
    if nproc_per_node < 1 or nnodes < 1:
        raise ConfigError(f"--nproc ({nproc_per_node}) and --nnodes ({nnodes}) must be at least 1")
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise ConfigError(f"--node-rank ({node_rank}) must be in [0, --nnodes ({nnodes}))")
    cmd = [python, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv, "--rdzv-id", run_id,
           "--max-restarts", str(max_restarts), "--monitor-interval", str(monitor_interval)]
    if node_rank is not None and nnodes > 1:
        cmd += ["--rdzv-conf", f"is_host={int(node_rank == 0)}", "--node-rank", str(node_rank)]
    if command is not None:
        return cmd + ["-m", "launch.cli", *command]
    return cmd + TRAIN_MODULE + ["--config", str(config)]


MULTI_RANK_COMMANDS = (("eval", "generate"),)  # codegeex commands a launcher runs on every rank, besides training


def codegeex_command(job: list[str]) -> list[str] | None:
    """The codegeex command a launcher was given after ``--`` (``eval generate ...``), or None for a training
    config; any other command is refused, naming the ones that run on many ranks."""
    if not job or job[0].endswith((".yaml", ".yml")) or "/" in job[0] or job[0] not in {c[0] for c in MULTI_RANK_COMMANDS}:
        return None
    if tuple(job[:2]) not in MULTI_RANK_COMMANDS:
        raise ConfigError(f"'{' '.join(job[:2])}' does not run on many ranks; a launcher runs a training CONFIG or "
                          + ", ".join(f"'-- {' '.join(c)} ...'" for c in MULTI_RANK_COMMANDS))
    if output_of(job) is None:
        raise ConfigError(f"'{' '.join(job[:2])}' needs --output (its run record goes beside it)")
    return job


def output_of(command: list[str]) -> str | None:
    """The value of a command's ``--output`` (``--output FILE`` or ``--output=FILE``), or None."""
    for i, arg in enumerate(command):
        if arg == "--output" and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith("--output="):
            return arg.split("=", 1)[1]
    return None


@dataclass
class Host:
    name: str
    slots: int


HOSTFILE_LINE = re.compile(r"^(?P<host>[A-Za-z0-9._:-]+)\s+slots\s*=\s*(?P<slots>\S+)\s*$")


def read_hostfile(path: str | Path) -> list[Host]:
    """DeepSpeed's hostfile: one ``host slots=N`` per line, ``#`` comments. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"hostfile {path} does not exist")
    hosts: list[Host] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = HOSTFILE_LINE.match(line)
        if not match:
            raise ConfigError(f"{path}:{number}: {raw.strip()!r} is not 'HOST slots=N'")
        slots = match["slots"]
        if not slots.isdigit() or int(slots) < 1:
            raise ConfigError(f"{path}:{number}: slots={slots} must be a positive integer")
        if any(h.name == match["host"] for h in hosts):
            raise ConfigError(f"{path}:{number}: host {match['host']} is listed twice")
        hosts.append(Host(match["host"], int(slots)))
    if not hosts:
        raise ConfigError(f"hostfile {path} lists no hosts")
    if len({h.slots for h in hosts}) > 1:
        raise ConfigError(f"hostfile {path}: every host needs the same slots (tensor-parallel groups stay inside a "
                          f"node), got {', '.join(f'{h.name}={h.slots}' for h in hosts)}")
    return hosts


def is_this_machine(host: str) -> bool:
    return host in {"localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn()}


def through_runner(hosts: list[Host]) -> bool:
    """Whether the deepspeed launcher goes through DeepSpeed's runner (remote nodes) rather than its per-node launcher."""
    return not (len(hosts) == 1 and is_this_machine(hosts[0].name))


def deepspeed_command(config: Path, hostfile: Path, *, master_addr: str | None = None, master_port: int = 29500,
                      python: str = sys.executable) -> list[str]:
    """The deepspeed launcher. A hostfile of several hosts goes through its runner (pdsh over passwordless ssh, as
    DeepSpeed requires; ``carry_to_remote_workers`` gives it the environment); one naming only this machine runs its
    per-node launcher directly, without ssh."""
    hosts = read_hostfile(hostfile)
    if not through_runner(hosts):
        world = base64.urlsafe_b64encode(json.dumps({hosts[0].name: list(range(hosts[0].slots))}).encode()).decode()
        cmd = [python, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}", "--node_rank=0",
               f"--master_addr={master_addr or '127.0.0.1'}", f"--master_port={master_port}"]
    else:
        cmd = [python, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--master_port",
               str(master_port), "--master_addr", master_addr or hosts[0].name]
    # LOCAL_RANK comes in the environment; a --local_rank flag would land before the `train` subcommand
    return cmd + ["--no_local_rank", "--module", *TRAIN_MODULE[1:], "--config", str(config)]


# SIGHUP (the terminal or ssh session gone) and SIGUSR1 (SLURM's --signal) stop the job the same way: the ranks
# are sent SIGTERM, which every rank (training or eval) handles
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
_FORWARD_AS: dict[int, int] = {signal.SIGHUP: signal.SIGTERM, signal.SIGUSR1: signal.SIGTERM}
REPEAT_S = 1.0  # a second signal sooner than this is the same request delivered twice (one to stop, not to kill)
KILL_GRACE_S = 3.0  # after a second signal: how long the ranks get to exit by themselves before SIGKILL
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


@dataclass
class Supervision:
    """How ``codegeex launch`` watches and stops the launcher command it starts (:func:`supervision` reads it off
    the command line these functions build)."""

    ranks_are_children: bool  # the command's own children are the ranks (torchrun, DeepSpeed's per-node launcher)
    trains: bool  # the ranks train (status.json, the run lock), rather than run a command such as eval generate
    first_node: bool  # a single-node job, or node 0 of several: it checks the run directory's lock


def supervision(cmd: list[str]) -> Supervision:
    node_rank = cmd[cmd.index("--node-rank") + 1] if "--node-rank" in cmd else "0"
    return Supervision(ranks_are_children="deepspeed.launcher.runner" not in cmd,
                       trains=cmd[-3:-1] == [TRAIN_MODULE[-1], "--config"], first_node=node_rank == "0")


def _prctl() -> Callable[[int, int], int] | None:
    """Linux's prctl(2), or None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


def supervise(cmd: list[str], env: dict[str, str], *, status: Path | None = None, ranks_are_children: bool = True,
              poll_s: float = 0.2) -> int:
    """Run the launcher command ``cmd`` and stop it as the module docstring says; returns its exit code (128 + N
    when it, or ``codegeex launch``, ended by signal N). ``status``: the run's status.json (training jobs)."""
    received: list[tuple[int, float]] = []
    previous = {s: signal.signal(s, lambda signum, _: received.append((signum, time.monotonic())))
                for s in STOP_SIGNALS}
    prctl = _prctl()
    try:
        if prctl is not None:
            prctl(PR_SET_CHILD_SUBREAPER, 1)  # ranks orphaned by a killed agent become ours to reap
        proc = subprocess.Popen(cmd, env={**env, "CODEGEEX_LAUNCHER_PID": str(os.getpid())}, start_new_session=True,
                                preexec_fn=(lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)) if prctl else None)
        try:
            return _watch(proc, received, status, ranks_are_children, poll_s)
        except BaseException:
            _kill_all(proc, signal.SIGKILL, status)
            raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _watch(proc: subprocess.Popen[bytes], received: list[tuple[int, float]], status: Path | None,
           ranks_are_children: bool, poll_s: float) -> int:
    first: tuple[int, float] | None = None
    signalled: set[int] = set()
    seen = 0
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            rc = proc.wait(timeout=poll_s)
            if first is not None:
                log.info("stopped by %s: the launcher exited %d%s", signal.Signals(first[0]).name, rc,
                         " (every rank saved and exited)" if rc == 0 else "")
            return rc if rc >= 0 else 128 - rc
        for signum, at in received[seen:]:
            seen += 1
            name = signal.Signals(signum).name
            if first is None:
                first = (signum, at)
                signalled = _forward(proc, _FORWARD_AS.get(signum, signum), ranks_are_children)
                log.warning("%s: every rank stops after its current step and saves; send it again (after %.0f s) to "
                            "stop at once, without a checkpoint", name, REPEAT_S)
            elif at - first[1] >= REPEAT_S:
                log.warning("%s again: stopping at once, without a checkpoint of the step in flight", name)
                return _kill_all(proc, signum, status)
        if first is not None and ranks_are_children and _ranks(proc) - signalled:
            log.warning("ranks started after the stop (a restart, after a rank failed while stopping): stopping at "
                        "once")
            return _kill_all(proc, first[0], status)


def _ranks(proc: subprocess.Popen[bytes]) -> set[int]:
    """The pids of the launcher command's live children: its ranks."""
    pids = set()
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(proc.pid).children():
            with contextlib.suppress(psutil.Error):
                if child.status() != psutil.STATUS_ZOMBIE:
                    pids.add(child.pid)
    return pids


def _forward(proc: subprocess.Popen[bytes], signum: int, ranks_are_children: bool) -> set[int]:
    """Send ``signum`` to every rank (to the launcher command itself when its ranks are not its children, or when
    it has none yet: nothing to save); returns the pids signalled."""
    targets = (_ranks(proc) if ranks_are_children else set()) or {proc.pid}
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    return targets


def _kill_all(proc: subprocess.Popen[bytes], signum: int, status: Path | None) -> int:
    """Stop at once: kill the launcher command (it restarts nothing now), pass ``signum`` to the ranks (rank 0 marks
    status.json), SIGKILL what is left after ``KILL_GRACE_S``, reap, and mark status.json killed if it still says
    running. Returns 128 + ``signum``."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
        ranks = psutil.Process(proc.pid).children()
    except psutil.Error:
        tree, ranks = [], []
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for rank in ranks:
        with contextlib.suppress(psutil.Error):
            rank.send_signal(signum)
    if _wait_gone(tree, KILL_GRACE_S):
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
        _wait_gone(tree, 10.0)
    if status is not None and mark_killed(status, signum):
        log.warning("%s: killed (no rank marked it)", status)
    return 128 + signum


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` for ``procs`` to end, reaping those that are ours (orphans come to this subreaper);
    returns the ones still running."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(p.pid, os.WNOHANG)
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)
