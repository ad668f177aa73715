"""``codegeex launch {local,torchrun,deepspeed,slurm}``: write the job down in its run directory, then start it."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from common.config import ConfigError

log = logging.getLogger("codegeex.launch")


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="launcher", metavar="LAUNCHER", required=True)

    p = sub.add_parser("local", help="torchrun on this machine (gloo on CPU, NCCL on GPUs)")
    _job(p)
    p.add_argument("--nproc", type=int, default=1, help="ranks on this machine")
    p.add_argument("--max-restarts", type=int, default=0, help="elastic restarts after a rank fails")
    p.set_defaults(func=cmd_torchrun, launcher_name="local")

    p = sub.add_parser("torchrun", help="one node of a multi-node job (c10d rendezvous)")
    _job(p)
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--node-rank", type=int, required=True, help="0 hosts the rendezvous")
    p.add_argument("--rdzv", required=True, metavar="HOST:PORT", help="the rendezvous endpoint (node 0's address)")
    p.add_argument("--nproc", type=int, default=1, help="ranks on this node")
    p.add_argument("--max-restarts", type=int, default=0, help="elastic restarts after a rank fails")
    p.add_argument("--run-id", default="", help="rendezvous id, the same on every node (default: from run_dir)")
    p.set_defaults(func=cmd_torchrun, launcher_name="torchrun")

    p = sub.add_parser("deepspeed", help="the deepspeed launcher over a hostfile ('host slots=N' per line)")
    _job(p)
    p.add_argument("--hostfile", required=True)
    p.add_argument("--master-port", type=int, default=29500)
    p.set_defaults(func=cmd_deepspeed)

    p = sub.add_parser("slurm", help="render an sbatch script and submit it (training, or --array for data builds)",
                       description="codegeex launch slurm CONFIG [key=value ...] | --array N -- data build ... | "
                                   "-- eval generate ...")
    p.add_argument("job", nargs=argparse.REMAINDER, help="CONFIG [key=value ...], or with --array: -- data build ...")
    _slurm_flags(p)
    p.set_defaults(func=cmd_slurm)


def _slurm_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU ranks")
    p.add_argument("--nproc-per-node", type=int, default=0, help="ranks per node (default: GPUs per node, or 1)")
    p.add_argument("--cpus-per-task", type=int, default=0)
    p.add_argument("--partition", default="")
    p.add_argument("--time", default="", help="time limit (MINUTES, HH:MM:SS, D-HH:MM:SS)")
    p.add_argument("--account", default="")
    p.add_argument("--job-name", default="codegeex")
    p.add_argument("--signal-seconds", type=int, default=120, help="SIGUSR1 this long before the time limit")
    p.add_argument("--chain", type=int, default=1, help="submit this many jobs, each resuming after the previous")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun's elastic restarts inside a job")
    p.add_argument("--array", type=int, default=0, metavar="N", help="data build in N array tasks, then the merge")
    p.add_argument("--run-dir", default="", help="where scripts and logs go (default: the config's run_dir)")
    p.add_argument("--dry-run", action="store_true", help="print the script(s); submit nothing")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                   help="any sbatch option, as one word, repeatable: --sbatch-arg=--qos=high --sbatch-arg=--exclusive")
    p.add_argument("--container-image", default="", help="pyxis/enroot image for every step (srun --container-image)")
    p.add_argument("--container-mounts", default="", help="pyxis/enroot mounts, SRC:DST[,...]")
    _check_flags(p)


def _check_flags(p: argparse.ArgumentParser) -> None:
    """What launch-time validation (launch.validate.check_job) needs beyond the world the launcher knows."""
    p.add_argument("--gpu", default="", metavar="KIND", help="the ranks' device kind (h100-80gb, a100-40gb, h200, ...): "
                   "a predicted memory per rank above its own is refused")
    p.add_argument("--force", action="store_true", help="launch even when the predicted memory per rank exceeds --gpu's")


def _job(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training YAML (or, after --, a command every rank runs: eval generate ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--dry-run", action="store_true", help="write the run directory's record, print the command")
    _check_flags(p)


def _resolve(config: str, overrides: list[str], world: Any, args: argparse.Namespace) -> tuple[Any, Path, Path]:
    """Load the training config and check the job against ``world`` (a launch.job_checks.World: what the launcher
    knows) with launch.validate.check_job, every problem at once, before anything is written or started; then write
    the resolved copy the ranks will read."""
    from common.devices import find_device
    from launch.runs import write_resolved_config
    from launch.validate import check_job
    from megatron_code.train_config import load_train_config

    cfg = load_train_config(config, overrides)
    _check_run_lock(Path(cfg.run_dir).resolve(), args)  # the cheapest refusal first
    device = find_device(args.gpu) if args.gpu else None
    for line in check_job(cfg, world, name=config, device=device, force=args.force).splitlines():
        log.info("%s", line)
    run_dir = Path(cfg.run_dir).resolve()
    return cfg, run_dir, write_resolved_config(run_dir, cfg)


def _check_run_lock(run_dir: Path, args: argparse.Namespace) -> None:
    """Before anything is written into ``run_dir`` (its config.yaml is what a live job's restarted ranks read):
    refuse it when a live job holds it (RunLockHeld, naming the holder), warn of a stale holder (the new job's rank 0
    takes it over). Not for SLURM submissions (a job queued behind the live one is no second live job), nor on torchrun
    nodes other than 0 (node 0 checks)."""
    from megatron_code.run_lock import check_run_dir

    if getattr(args, "func", None) is cmd_slurm or getattr(args, "node_rank", 0) != 0 or not run_dir.is_dir():
        return  # a run directory not yet there (or not a directory: the job checks name it) holds no lock
    stale = check_run_dir(run_dir)
    if stale is not None:
        log.warning("%s: the lock of a job that is gone (%s); this job takes it over", run_dir / ".lock",
                    stale.describe())


def _start(run_dir: Path, name: str, cmd: list[str], env: dict[str, str], dry_run: bool) -> int:
    """Record the launch, then run ``cmd`` until it ends; SIGTERM/SIGINT stop it with a checkpoint, a second signal
    at once (``launch.launchers.supervise``)."""
    from launch.launchers import supervise, supervision
    from launch.runs import record_launch

    how = supervision(cmd)
    record = record_launch(run_dir, name, ["codegeex", *sys.argv[1:]], cmd, env)
    log.info("run directory %s (launch record %s)", run_dir, record.name)
    log.info("%s", shlex.join(cmd))
    if dry_run:
        sys.stdout.write(shlex.join(cmd) + "\n")
        return 0
    return supervise(cmd, env, status=run_dir / "status.json" if how.trains else None,
                     ranks_are_children=how.ranks_are_children)


def _job_target(args: argparse.Namespace, world: Any) -> tuple[Path, Path | None, list[str] | None]:
    """(run directory, resolved training config or None, codegeex command or None) of a local/torchrun job: a
    training CONFIG with overrides, or ``-- eval generate ... --output FILE`` (recorded beside FILE)."""
    from launch.launchers import codegeex_command, output_of

    command = codegeex_command([args.config, *args.overrides])
    if command is not None:
        output = Path(str(output_of(command))).resolve()
        return output.parent, None, [f"@{argument_file(output.parent, command)}"]
    _, run_dir, config = _resolve(args.config, args.overrides, world, args)
    return run_dir, config, None


def argument_file(run_dir: Path, command: list[str]) -> Path:
    """Write ``command`` (a codegeex command line) as the JSON list every rank reads with ``codegeex @FILE``."""
    path = run_dir / "launch" / f"command-{os.getpid()}-{time.time_ns()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(command) + "\n")
    return path


def cmd_torchrun(args: argparse.Namespace) -> int:
    from launch.job_checks import World
    from launch.launchers import gpus_here, parse_endpoint, torchrun_command, worker_environment

    if args.launcher_name == "local":
        world = World.of(1, args.nproc, gpus_here(), f"--nproc {args.nproc}", "")
    else:
        world = World.of(args.nnodes, args.nproc, gpus_here(), f"--nnodes {args.nnodes} x --nproc {args.nproc}",
                         f"--nproc {args.nproc}")
    run_dir, config, command = _job_target(args, world)
    if args.launcher_name == "local":
        cmd = torchrun_command(config, nproc_per_node=args.nproc, max_restarts=args.max_restarts,
                               run_id=f"local-{os.getpid()}", command=command)
    else:
        parse_endpoint(args.rdzv)
        cmd = torchrun_command(config, nproc_per_node=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                               rdzv=args.rdzv, run_id=args.run_id or run_dir.name, max_restarts=args.max_restarts,
                               command=command)
    env = worker_environment(args.nproc, gpus=gpus_here())  # torchrun starts its workers on this machine
    return _start(run_dir, args.launcher_name, cmd, env, args.dry_run)


def cmd_deepspeed(args: argparse.Namespace) -> int:
    from launch.job_checks import World
    from launch.launchers import (
        carry_to_remote_workers,
        deepspeed_command,
        gpus_here,
        read_hostfile,
        through_runner,
        worker_environment,
    )

    hosts = read_hostfile(args.hostfile)  # before anything is written
    slots = hosts[0].slots
    world = World.of(len(hosts), slots, gpus_here() or bool(getattr(args, "gpu", None)), f"{len(hosts)} hosts x {slots} slots in {args.hostfile}",
                     f"slots={slots} in {args.hostfile}")
    cfg, run_dir, config = _resolve(args.config, args.overrides, world, args)
    cmd = deepspeed_command(config, Path(args.hostfile), master_port=args.master_port)
    # GPUs or not as on this machine, as DeepSpeed's runner itself decides (its accelerator picks what it forwards)
    env = worker_environment(hosts[0].slots, gpus=gpus_here())
    if through_runner(hosts):  # remote nodes get only what the runner forwards: a .deepspeed_env of our own
        env = carry_to_remote_workers(env, run_dir / "launch" / "deepspeed_env")
    return _start(run_dir, "deepspeed", cmd, env, args.dry_run)


def _flags_after_config(args: argparse.Namespace) -> list[str]:
    """``launch slurm CONFIG --nodes 4 ... key=value``: the SLURM flags that follow CONFIG are read into ``args``
    (as if written before it); returns CONFIG and its overrides. After ``--`` nothing is read: it is the command."""
    job = list(args.job)
    if "--" in job:
        job, rest = job[:job.index("--")], job[job.index("--"):]
    else:
        rest = []
    flags = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    _slurm_flags(flags)
    try:
        parsed, positional = flags.parse_known_args(job)
    except argparse.ArgumentError as exc:
        raise ConfigError(f"codegeex launch slurm: {exc}") from None
    unknown = [a for a in positional if a.startswith("-")]
    if unknown:
        raise ConfigError(f"codegeex launch slurm: unknown option(s) {' '.join(unknown)}")
    defaults = vars(flags.parse_args([]))
    for key, value in vars(parsed).items():
        if value != defaults[key]:
            setattr(args, key, value)
    return positional + rest


def cmd_slurm(args: argparse.Namespace) -> int:
    from launch.slurm import SlurmOptions

    job = args.job[1:] if args.job[:1] == ["--"] else _flags_after_config(args)
    if not job:
        raise ConfigError("codegeex launch slurm needs CONFIG (training) or, with --array N, '-- data build ...'")
    opts = SlurmOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, nproc_per_node=args.nproc_per_node,
                        cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time,
                        account=args.account, job_name=args.job_name, signal_seconds=args.signal_seconds,
                        max_restarts=args.max_restarts, sbatch_args=list(args.sbatch_arg),
                        container_image=args.container_image, container_mounts=args.container_mounts)
    opts.validate()
    if args.array:
        return _slurm_array(args, opts, job)
    if job[:1] == ["eval"]:
        return _slurm_command(args, opts, job)
    return _slurm_training(args, opts, job)


def _slurm_command(args: argparse.Namespace, opts: Any, job: list[str]) -> int:
    from launch.launchers import codegeex_command, output_of
    from launch.slurm import command_script

    command = codegeex_command(job)
    if command is None:
        raise ConfigError(f"codegeex launch slurm: {' '.join(job[:2])!r} is neither a training CONFIG nor a command "
                          "that runs on many ranks")
    output = Path(str(output_of(command))).resolve()
    run_dir = Path(args.run_dir).resolve() if args.run_dir else output.parent
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    text = command_script(opts, command=[f"@{argument_file(run_dir, command)}"], log_dir=run_dir / "logs",
                          python=sys.executable, workdir=Path.cwd())
    _write_and_submit(run_dir, [("generate.sbatch", text, "")], args)
    return 0


def _write_and_submit(run_dir: Path, scripts: list[tuple[str, str, str]], args: argparse.Namespace) -> list[str]:
    """``scripts``: (file name, text, dependency kind on the previous job or '')."""
    from launch.runs import record_launch
    from launch.slurm import sbatch

    paths = []
    for name, text, _ in scripts:
        path = run_dir / "launch" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        paths.append(path)
        if args.dry_run:
            sys.stdout.write(f"# ---- {path}\n{text}")
    ids: list[str] = []
    if not args.dry_run:
        for path, (_, _, dep) in zip(paths, scripts, strict=True):
            ids.append(sbatch(path, f"{dep}:{ids[-1]}" if dep and ids else ""))
    record_launch(run_dir, "slurm", ["codegeex", *sys.argv[1:]], [f"sbatch {p}" for p in paths],
                  job_ids=ids, scripts=[str(p) for p in paths])
    if ids:
        sys.stdout.write(f"submitted job(s) {' '.join(ids)}; logs: {run_dir / 'logs'}\n")
    return ids


def _slurm_training(args: argparse.Namespace, opts: Any, job: list[str]) -> int:
    from launch.job_checks import World, plural
    from launch.slurm import training_script

    per_node, gpus = opts.ranks_per_node, opts.gpus_per_node > 0
    given = f"--nproc-per-node {per_node}" if opts.nproc_per_node else f"--gpus-per-node {per_node}"
    world = World.of(opts.nodes, per_node, gpus, f"{plural(opts.nodes, 'node')} x {plural(per_node, 'GPU' if gpus else 'rank')}", given)
    cfg, run_dir, config = _resolve(job[0], job[1:], world, args)
    if args.run_dir:
        run_dir = Path(args.run_dir).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    text = training_script(opts, config=config, run_dir=Path(cfg.run_dir).resolve(), log_dir=run_dir / "logs",
                           python=sys.executable, workdir=Path.cwd())
    if args.chain < 1:
        raise ConfigError(f"--chain ({args.chain}) must be at least 1")
    # the follow-ups start after the previous job ends however it ended, and resume (or exit at once if completed)
    scripts = [("train.sbatch", text, "")] + [(f"train-{i}.sbatch", text, "afterany") for i in range(1, args.chain)]
    _write_and_submit(run_dir, scripts, args)
    return 0


def _slurm_array(args: argparse.Namespace, opts: Any, job: list[str]) -> int:
    from launch.slurm import array_script, single_script

    if job[:2] != ["data", "build"]:
        raise ConfigError(f"--array runs 'data build ...' in parts; got {' '.join(job[:2])!r}")
    if "--output" not in job or job.index("--output") + 1 >= len(job):
        raise ConfigError("--array: the data build needs --output STORE (the merge step writes there)")
    if "--num-shards" in job or "--shard-index" in job:
        raise ConfigError("--array sets --num-shards and --shard-index itself; leave them out")
    output = Path(job[job.index("--output") + 1]).resolve()
    run_dir = Path(args.run_dir).resolve() if args.run_dir else output.with_name(output.name + "-slurm")
    base = [sys.executable, "-m", "launch.cli"]
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    workers = job[job.index("--workers") + 1] if "--workers" in job[:-1] else ""
    if not opts.cpus_per_task and workers.isdigit():  # each array task's build runs --workers processes
        opts.cpus_per_task = int(workers)
    parts = array_script(opts, tasks=args.array, command=base + job, log_dir=logs, workdir=Path.cwd())
    opts.job_name = f"{opts.job_name}-merge"
    merge = single_script(opts, command=base + ["data", "merge", str(output)], log_dir=logs, workdir=Path.cwd())
    _write_and_submit(run_dir, [("data-parts.sbatch", parts, ""), ("data-merge.sbatch", merge, "afterok")], args)
    return 0
