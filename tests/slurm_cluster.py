"""A real single-node SLURM (munged, slurmctld, slurmd from Debian's packages) on loopback, for tests.

A requeued job may start again only once its old credential expires: ``cred_expire`` is cut from 120 s to 10.

Started as root with its configuration, state and logs in a temporary directory; the daemons it started are stopped
afterwards (a munged that was already running is left alone).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


def slurm_conf(root: Path, host: str, cpus: int) -> str:
    return f"""ClusterName=codegeex-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=3600
SlurmctldPort=16817
SlurmdPort=16818
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def _munge_running() -> bool:
    return subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0


@contextmanager
def slurm_cluster(root: Path) -> Iterator[dict[str, str]]:
    """Yields the environment (``SLURM_CONF``) under which sbatch/scontrol talk to the test cluster."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    from tests.conftest import missing as unavailable

    if missing:
        unavailable(f"SLURM is not installed ({', '.join(missing)} missing): `make test` installs slurm-wlm and munge")
    if os.geteuid() != 0:
        unavailable("starting slurmctld/slurmd needs root")
    for d in ("state", "spool", "log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, socket.gethostname(), os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started_munge = False
    if not _munge_running():
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "munged"], check=True)
        started_munge = True
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
    subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env)
    try:
        _wait_idle(env)
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, check=False)
        deadline = time.time() + 60
        while time.time() < deadline and subprocess.run(["squeue", "-h", "-t", "R,CG"], capture_output=True,
                                                          text=True, env=env).stdout.strip():
            time.sleep(0.5)
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            pid = root / pid_file
            if pid.exists():
                subprocess.run(["kill", pid.read_text().strip()], check=False)
        if started_munge:
            subprocess.run(["pkill", "-x", "munged"], check=False)


def _wait_idle(env: dict[str, str], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env)
        if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed"):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the test SLURM node did not become idle: {out.stdout} {out.stderr}")


def array_states(job: str, env: dict[str, str]) -> list[dict[str, str]]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, env=env)
    return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.stdout.splitlines()]


def wait_job(job: str, env: dict[str, str], timeout: float = 300) -> list[dict[str, str]]:
    """Wait until every record of the job (array tasks included) is in a final state; returns them."""
    deadline = time.time() + timeout
    records: list[dict[str, str]] = []
    while time.time() < deadline:
        records = array_states(job, env)
        if records and all(r.get("JobState") in TERMINAL for r in records):
            return records
        time.sleep(1)
    states = [(r.get("JobId"), r.get("JobState"), r.get("Reason"), r.get("Dependency")) for r in records]
    log = Path(env.get("SLURM_CONF", "")).parent / "log" / "slurmctld.log"
    tail = log.read_text()[-3000:] if log.is_file() else "(no slurmctld log)"
    raise AssertionError(f"job {job} not finished within {timeout} s: {states}\nslurmctld log tail:\n{tail}")
