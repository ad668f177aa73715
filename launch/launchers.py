"""Launcher command lines: torchrun on one machine or many, and the deepspeed launcher with a hostfile.

Workers always run ``python -m launch.cli train --config RUN_DIR/launch/config.yaml``: the configuration resolved at
launch time, so every node and every restart trains the same thing. The environment the launcher adds:

- ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: rank 0 hosts a fresh TCP store in each rendezvous round, so workers of
  a restarted round never meet the dead round's keys (with torchrun's shared store they can hang).
- ``OMP_NUM_THREADS``: the machine's cores divided among its local ranks, unless already set.
"""

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


def worker_environment(nproc_per_node: int, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc_per_node))))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), with an error naming the value."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--rdzv {text!r} must be HOST:PORT with a port in 1-65535")
    return host, int(port)


def torchrun_command(config: Path, *, nproc_per_node: int, nnodes: int = 1, node_rank: int | None = None,
                     rdzv: str = "127.0.0.1:0", run_id: str = "codegeex", max_restarts: int = 0,
                     python: str = sys.executable, monitor_interval: float = 1.0) -> list[str]:
    """torchrun with the c10d rendezvous. ``node_rank`` 0 hosts the rendezvous store; others dial it."""
    if nproc_per_node < 1 or nnodes < 1:
        raise ConfigError(f"--nproc ({nproc_per_node}) and --nnodes ({nnodes}) must be at least 1")
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise ConfigError(f"--node-rank ({node_rank}) must be in [0, --nnodes ({nnodes}))")
    cmd = [python, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv, "--rdzv-id", run_id,
           "--max-restarts", str(max_restarts), "--monitor-interval", str(monitor_interval)]
    if node_rank is not None and nnodes > 1:
        cmd += ["--rdzv-conf", f"is_host={int(node_rank == 0)}", "--node-rank", str(node_rank)]
    return cmd + TRAIN_MODULE + ["--config", str(config)]


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


def deepspeed_command(config: Path, hostfile: Path, *, master_addr: str | None = None, master_port: int = 29500,
                      python: str = sys.executable) -> list[str]:
    """The deepspeed launcher. A hostfile of several hosts goes through its runner (pdsh over passwordless ssh, as
    DeepSpeed requires); one naming only this machine runs its per-node launcher directly, without ssh."""
    hosts = read_hostfile(hostfile)
    if len(hosts) == 1 and is_this_machine(hosts[0].name):
        world = base64.urlsafe_b64encode(json.dumps({hosts[0].name: list(range(hosts[0].slots))}).encode()).decode()
        cmd = [python, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}", "--node_rank=0",
               f"--master_addr={master_addr or '127.0.0.1'}", f"--master_port={master_port}"]
    else:
        cmd = [python, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--master_port",
               str(master_port), "--master_addr", master_addr or hosts[0].name]
    # LOCAL_RANK comes in the environment; a --local_rank flag would land before the `train` subcommand
    return cmd + ["--no_local_rank", "--module", *TRAIN_MODULE[1:], "--config", str(config)]
