"""Stopping when told, and one live job per run directory: `codegeex launch` and its ranks under real signals, the
run lock between real processes and files."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch.launchers import deepspeed_command, supervision, torchrun_command
from megatron_code.run_lock import STALE_S, Holder, RunLock, RunLockHeld, check_run_dir, read_holder
from tests.dist import free_port
from tests.model_utils import synthetic_store
from tests.train_utils import metrics, values, wait_for_step, write_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("stop") / "store", windows=96, seq_len=32)


def codegeex(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch.cli", *args], env=ENV, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def ranks_of(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.pid).children(recursive=True)
            if "train" in p.cmdline() and "torch.distributed.run" not in p.cmdline()]


def gone(procs: list[psutil.Process]) -> bool:
    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return not any(running(p) for p in procs)


@pytest.mark.slow
@pytest.mark.distributed
def test_signals_stop_every_rank_and_a_second_job_is_refused(store, tmp_path, caplog):
    """Ctrl-C to `launch local`: both ranks save the step and exit 0, no traceback, no elastic restart; a second
    launch meanwhile is refused before it writes anything; the next launch (torchrun) resumes, and two SIGTERMs a
    second apart stop it at once although a rank cannot finish its step; its stale lock is then taken over."""
    run = tmp_path / "run"
    cfg = write_config(values(store, str(run), train_steps=100000), tmp_path / "c.yaml")
    first = codegeex(["launch", "local", "--nproc", "2", "--max-restarts", "1", cfg], tmp_path / "a.log")
    wait_for_step(run, 3, first)
    ranks = ranks_of(first)
    holder = read_holder(run / ".lock")
    assert len(ranks) == 2 and holder is not None and holder.pid in [r.pid for r in ranks]
    assert (holder.host, holder.launcher_pid) == (socket.gethostname(), first.pid)

    written = {p: p.read_bytes() for p in (run / "launch").iterdir()}
    second = codegeex(["launch", "local", "--nproc", "2", cfg, "optim.lr=1e-3"], tmp_path / "b.log")
    assert second.wait(120) == 1
    refused = (tmp_path / "b.log").read_text()
    assert f"in use by a live job (its process is running): host {socket.gethostname()}, pid {holder.pid}, " \
           f"torchrun run local-{first.pid}" in refused and f"SIGTERM to pid {first.pid}" in refused, refused[-2000:]
    assert {p: p.read_bytes() for p in (run / "launch").iterdir()} == written  # A's config.yaml untouched

    first.send_signal(signal.SIGINT)
    assert first.wait(120) == 0
    assert gone(ranks) and not (run / ".lock").exists()
    log = (tmp_path / "a.log").read_text()
    assert "Traceback" not in log and "resumed from" not in log, log[-3000:]  # a clean stop restarts nothing
    status = json.loads((run / "status.json").read_text())
    saved = status["step"]
    assert status["state"] == "stopped" and saved >= 3
    assert json.loads((run / "checkpoints" / f"step-{saved:08d}" / "trainer.json").read_text())["step"] == saved
    assert [r["step"] for r in metrics(str(run))] == list(range(1, saved + 1))

    third = codegeex(["launch", "torchrun", "--nnodes", "1", "--node-rank", "0", "--rdzv", f"127.0.0.1:{free_port()}",
                      "--nproc", "2", "--max-restarts", "1", cfg], tmp_path / "c.log")
    wait_for_step(run, saved + 2, third)
    assert f"resumed from {run / 'checkpoints'}/step-{saved:08d} at step {saved}" in (tmp_path / "c.log").read_text()
    ranks = ranks_of(third)
    holder = read_holder(run / ".lock")
    assert holder is not None
    (rank0,) = [r for r in ranks if r.pid == holder.pid]
    rank0.suspend()  # a rank that cannot finish its step (a hung collective, a slow file system)
    third.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    third.send_signal(signal.SIGTERM)
    began = time.monotonic()
    assert third.wait(30) == 128 + signal.SIGTERM
    assert time.monotonic() - began < 10 and gone(ranks)
    assert json.loads((run / "status.json").read_text())["state"] == "killed"

    stale = check_run_dir(run)  # what the next launch sees: the killed rank 0's record, not a live job
    assert stale is not None and stale.pid == rank0.pid
    with caplog.at_level(logging.WARNING, logger="codegeex.train"), RunLock(run):
        assert read_holder(run / ".lock").pid == os.getpid()  # type: ignore[union-attr]
    assert f"pid {rank0.pid}" in caplog.text and "taken over" in caplog.text
    assert not (run / ".lock").exists()


STOP_TWICE = """
import os, signal, sys, time
from pathlib import Path
from megatron_code.run_lock import StopSignal

status = Path(sys.argv[1])
with StopSignal(status) as stop:
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)  # the same request delivered twice (SLURM, then torchrun's agent)
    time.sleep(0.2)
    print("remembered", signal.Signals(stop.received).name, flush=True)
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)  # asked again: now
    time.sleep(10)
print("not reached")
"""


def test_a_second_signal_in_a_rank_exits_at_once_and_marks_the_status(tmp_path):
    status = tmp_path / "status.json"
    status.write_text(json.dumps({"state": "running", "step": 4}) + "\n")
    done = subprocess.run([sys.executable, "-c", STOP_TWICE, str(status)], env=ENV, capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout) == (128 + signal.SIGTERM, "remembered SIGINT\n"), done.stderr
    assert "Traceback" not in done.stderr and "without a checkpoint" in done.stderr
    assert json.loads(status.read_text()) == {"state": "killed", "step": 4, "signal": "SIGTERM"}


HOLD = """
import sys, time
from pathlib import Path
from megatron_code.run_lock import RunLock

RunLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_run_lock_judges_holders_on_this_host_and_others(tmp_path, monkeypatch):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env={**ENV, "SLURM_JOB_ID": "4242"},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        for attempt in (lambda: RunLock(run).acquire(), lambda: check_run_dir(run)):
            with pytest.raises(RunLockHeld, match=f"host {socket.gethostname()}, pid {holder.pid}, SLURM job 4242"):
                attempt()
    finally:
        holder.kill()
        holder.wait()
    assert check_run_dir(run) is not None  # killed: its record stays, judged stale (the pid is gone)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    me, now = Holder.here(), time.time()
    reused = {**vars(me), "pid_started": me.pid_started - 100}  # a live pid, but not the process that locked
    other = {**vars(me), "host": "node-b", "pid": 1, "slurm_job": "77", "heartbeat": now - 20}
    for record, live, job in ((reused, False, ""), (other, True, ""), (other, False, "77"),  # 77: requeued, itself
                              ({**other, "heartbeat": now - STALE_S - 1}, False, "")):
        (run / ".lock").write_text(json.dumps(record))
        monkeypatch.setenv("SLURM_JOB_ID", job)
        if live:
            with pytest.raises(RunLockHeld, match="host node-b, pid 1, SLURM job 77, .* heartbeat 20 s ago"):
                RunLock(run).acquire()
        else:
            with RunLock(run) as lock:
                assert lock.holder is not None and read_holder(run / ".lock") == lock.holder
            assert not (run / ".lock").exists()


def test_supervision_is_read_off_the_launcher_commands(tmp_path):
    config = tmp_path / "launch" / "config.yaml"
    local = torchrun_command(config, nproc_per_node=2)
    node1 = torchrun_command(config, nproc_per_node=2, nnodes=2, node_rank=1, rdzv="n0:29400")
    generate = torchrun_command(None, nproc_per_node=2, command=["@args.json"])
    (tmp_path / "one").write_text("localhost slots=2\n")
    (tmp_path / "two").write_text("a slots=2\nb slots=2\n")
    per_node, runner = (deepspeed_command(config, tmp_path / name) for name in ("one", "two"))
    got = [(s.ranks_are_children, s.trains, s.first_node) for s in map(supervision, (local, node1, generate,
                                                                                   per_node, runner))]
    assert got == [(True, True, True), (True, True, False), (True, False, True), (True, True, True),
                   (False, True, True)]
