"""sbatch scripts for training (one torchrun per node, preemption with requeue, an auto-resume chain) and for the
data pipeline's sharded preprocessing (an array job, then the merge as a dependent job).

Preemption: ``#SBATCH --signal=USR1@S`` (or ``scancel --signal=USR1 JOB``) reaches every process of the step.
torchrun itself is started with SIGUSR1 ignored, so its agent neither dies nor SIGKILLs workers 30 s later; the
trainer's own handler (the disposition is reset when a handler is installed) finishes the step, checkpoints, writes
``status.json`` = stopped and exits 0. The batch script then requeues the job, which resumes from the checkpoint.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from common.config import ConfigError
from launch.launchers import GPU_ENVIRONMENT, extensions_dir

TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


@dataclass
class SlurmOptions:
    """What the allocation looks like; ``gpus_per_node`` 0 means CPU ranks (``nproc_per_node`` of them)."""

    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int = 0
    cpus_per_task: int = 0
    partition: str = ""
    time: str = ""
    account: str = ""
    job_name: str = "codegeex"
    signal_seconds: int = 120
    requeue: bool = True
    max_restarts: int = 0
    rdzv_port: int = 29400
    env: dict[str, str] = field(default_factory=dict)
    sbatch_args: list[str] = field(default_factory=list)  # passed through as `#SBATCH ARG` lines (--qos=high, ...)
    container_image: str = ""  # pyxis/enroot: srun --container-image
    container_mounts: str = ""  # pyxis/enroot: srun --container-mounts (SRC:DST[,...])

    def validate(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"--nodes ({self.nodes}) must be at least 1")
        if self.gpus_per_node < 0 or self.nproc_per_node < 0:
            raise ConfigError(f"--gpus-per-node ({self.gpus_per_node}) and --nproc-per-node ({self.nproc_per_node}) "
                              "must not be negative")
        if self.time and not TIME.match(self.time):
            raise ConfigError(f"--time {self.time!r} must be MINUTES, HH:MM:SS or D-HH:MM:SS")
        for arg in self.sbatch_args:
            if not arg.startswith("-") or "\n" in arg:
                raise ConfigError(f"--sbatch-arg {arg!r} must be one sbatch option, e.g. --qos=high or --exclusive")
        if self.container_mounts and not self.container_image:
            raise ConfigError("--container-mounts needs --container-image")

    def srun(self) -> str:
        """``srun`` with the container flags, when there is a container."""
        flags = [f"--container-image={shlex.quote(self.container_image)}"] if self.container_image else []
        flags += [f"--container-mounts={shlex.quote(self.container_mounts)}"] if self.container_mounts else []
        return " ".join(["srun", *flags])

    @property
    def ranks_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1


def _header(opts: SlurmOptions, log_dir: Path, extra: list[str]) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={opts.job_name}", f"#SBATCH --nodes={opts.nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --output={log_dir}/%x-%j.out", "#SBATCH --open-mode=append"]
    if opts.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={opts.gpus_per_node}")
    if opts.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={opts.cpus_per_task}")
    for flag, value in (("partition", opts.partition), ("time", opts.time), ("account", opts.account)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    return lines + [f"#SBATCH {e}" for e in extra] + [f"#SBATCH {a}" for a in opts.sbatch_args]


def _environment(opts: SlurmOptions) -> list[str]:
    threads = "${SLURM_CPUS_PER_TASK:-$(nproc)}"
    env = {"OMP_NUM_THREADS": f"$(( {threads} / {opts.ranks_per_node} > 0 ? {threads} / {opts.ranks_per_node} : 1 ))",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
           "NCCL_DEBUG": "${NCCL_DEBUG:-WARN}", "PYTHONUNBUFFERED": "1"}
    # a value exported at submit time (sbatch passes the environment on) wins over these defaults
    env["TORCH_EXTENSIONS_DIR"] = f"${{TORCH_EXTENSIONS_DIR:-{shlex.quote(extensions_dir())}}}"
    if opts.gpus_per_node:  # why each one: launch/launchers.py
        env.update({key: f"${{{key}:-{value}}}" for key, value in GPU_ENVIRONMENT.items()})
    env.update(opts.env)
    return [f"export {k}={v}" for k, v in env.items()]


def training_script(opts: SlurmOptions, *, config: Path, run_dir: Path, python: str, workdir: Path,
                    log_dir: Path | None = None) -> str:
    """One torchrun per node, rendezvous on the allocation's first node; requeue when stopped by a signal. Logs go
    to ``log_dir`` (default RUN_DIR/logs)."""
    opts.validate()
    extra = [f"--signal=USR1@{opts.signal_seconds}"] + (["--requeue"] if opts.requeue else [])
    torchrun = [python, "-m", "torch.distributed.run", "--nnodes", str(opts.nodes),
                "--nproc-per-node", str(opts.ranks_per_node), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", "${RDZV_HOST}:${RDZV_PORT}", "--rdzv-id", "${SLURM_JOB_ID}",
                "--max-restarts", str(opts.max_restarts), "-m", "launch.cli", "train", "--config", str(config)]
    status = shlex.quote(str(run_dir / "status.json"))
    body = [
        "set -uo pipefail", f"cd {shlex.quote(str(workdir))}", *_environment(opts),
        "RDZV_HOST=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)",
        f"RDZV_PORT=$(( {opts.rdzv_port} + SLURM_JOB_ID % 1000 ))",
        "export RDZV_HOST RDZV_PORT",
        f"STATUS={status}",
        'echo "codegeex: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, '
        'rendezvous $RDZV_HOST:$RDZV_PORT"',
        'if grep -qs \'"state": "completed"\' "$STATUS"; then echo "codegeex: already completed"; exit 0; fi',
        # SIGUSR1 ignored by the agent (inherited through exec), handled by the trainer
        f"{opts.srun()} --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c "
        + shlex.quote('trap "" USR1; exec ' + " ".join(torchrun)),
        "rc=$?",
        # requeued only after a clean stop: a job that failed (even after an earlier stop) is not requeued forever
        'if [ "$rc" -eq 0 ] && grep -qs \'"state": "stopped"\' "$STATUS"; then',
        '  echo "codegeex: stopped by a signal with a checkpoint; requeueing"',
        '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi",
        'echo "codegeex: torchrun exited $rc"',
        "exit $rc",
    ]
    return "\n".join(_header(opts, log_dir or run_dir / "logs", extra) + [""] + body) + "\n"


def command_script(opts: SlurmOptions, *, command: list[str], log_dir: Path, python: str, workdir: Path) -> str:
    """One torchrun per node running the codegeex ``command`` on every rank (``eval generate ...``: tensor x data
    parallel generation; a rerun resumes, so the job is requeued when preempted)."""
    opts.validate()
    extra = ["--requeue"] if opts.requeue else []
    torchrun = [python, "-m", "torch.distributed.run", "--nnodes", str(opts.nodes),
                "--nproc-per-node", str(opts.ranks_per_node), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", "${RDZV_HOST}:${RDZV_PORT}", "--rdzv-id", "${SLURM_JOB_ID}",
                "--max-restarts", str(opts.max_restarts), "-m", "launch.cli", *map(shlex.quote, command)]
    body = ["set -uo pipefail", f"cd {shlex.quote(str(workdir))}", *_environment(opts),
            "RDZV_HOST=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)",
            f"RDZV_PORT=$(( {opts.rdzv_port} + SLURM_JOB_ID % 1000 ))", "export RDZV_HOST RDZV_PORT",
            f"{opts.srun()} --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c " + shlex.quote("exec " + " ".join(torchrun))]
    return "\n".join(_header(opts, log_dir, extra) + [""] + body) + "\n"


def _in_container(opts: SlurmOptions) -> str:
    """The prefix that runs a one-task step in the container (``srun --container-image ...``), or ''."""
    return f"{opts.srun()} --ntasks=1 " if opts.container_image else ""


def array_script(opts: SlurmOptions, *, tasks: int, command: list[str], log_dir: Path, workdir: Path) -> str:
    """``tasks`` array tasks, each one part of a sharded ``codegeex data build``."""
    opts.validate()
    shard = " ".join(shlex.quote(c) for c in command)
    body = ["set -euo pipefail", f"cd {shlex.quote(str(workdir))}", *_environment(opts),
            'echo "codegeex: part $SLURM_ARRAY_TASK_ID of ' + str(tasks) + '"',
            f"{_in_container(opts)}{shard} --num-shards {tasks} --shard-index $SLURM_ARRAY_TASK_ID"]
    return "\n".join(_header(opts, log_dir, [f"--array=0-{tasks - 1}"]) + [""] + body) + "\n"


def single_script(opts: SlurmOptions, *, command: list[str], log_dir: Path, workdir: Path) -> str:
    body = ["set -euo pipefail", f"cd {shlex.quote(str(workdir))}", *_environment(opts),
            _in_container(opts) + " ".join(shlex.quote(c) for c in command)]
    return "\n".join(_header(opts, log_dir, []) + [""] + body) + "\n"


def sbatch(script: Path, dependency: str = "") -> str:
    """Submit; returns the job id. sbatch's own error message is passed on."""
    cmd = ["sbatch", "--parsable"] + ([f"--dependency={dependency}"] if dependency else []) + [str(script)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ConfigError("sbatch is not on PATH: run on a SLURM login node (or use --dry-run)") from None
    if out.returncode != 0:
        raise ConfigError(f"sbatch {script} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]
