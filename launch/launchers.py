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
user's own ``.deepspeed_env`` lines after them) into ``RUN_DIR/launch/deepspeed_env`` and points ``DS_ENV_FILE`` at it."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError

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
