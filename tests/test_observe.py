"""Observability of training runs (megatron_code/observe.py, megatron_code/flight.py), on real gloo ranks: W&B offline
runs read back from their files, profiler traces, per-rank step times with an injected straggler, no host sync added
to a step, and a hung rank whose flight records name every rank's step and phase before every rank exits."""

from __future__ import annotations

import copy
import gzip
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from common.config import ConfigError, load_config
from tests.model_utils import synthetic_store
from tests.train_utils import metrics, values, wait_for_step, write_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("observe") / "store", windows=48, seq_len=32)


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a ``.wandb`` file (LevelDB's log format behind W&B's 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending, out = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            out.append(pb.Record.FromString(pending))  # type: ignore[attr-defined]
    return out


def wandb_history(run: Path) -> tuple[dict[str, Any], dict[int, dict[str, float]]]:
    """(the run's config, its history by step) from an offline run folder."""
    (file,) = run.glob("run-*.wandb")
    config: dict[str, Any] = {}
    history: dict[int, dict[str, float]] = {}
    for r in wandb_records(file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history[int(row["_step"])] = row
    return config, history


def _observed_runs(first: dict[str, Any], resumed: dict[str, Any]) -> dict[str, Any]:
    """On each rank: ``first`` with the host-sync counter and the collective audit over the whole run, then
    ``resumed`` (the same run directory, more steps); the trainer's log records and rank 0's metrics."""
    import torch.distributed as dist

    from megatron_code.train_config import TrainConfig
    from megatron_code.training import train
    from tests.device_audit import CollectiveDeviceAudit, HostSyncCounter

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("codegeex.train").addHandler(handler)
    with CollectiveDeviceAudit() as audit, HostSyncCounter() as syncs:
        train(load_config(TrainConfig, values=copy.deepcopy(first)), ["test"])
    train(load_config(TrainConfig, values=copy.deepcopy(resumed)), ["test"])
    return {"observe_syncs": [(k, w) for k, w in syncs.events if "observe.py" in w], "messages": messages,
            "violations": [str(c) for c in audit.violations], "gathers": sum("observe.py" in c.where for c in audit.records),
            "metrics": metrics(first["run_dir"]) if dist.get_rank() == 0 else None}


@pytest.mark.distributed
@pytest.mark.slow
def test_wandb_offline_profiler_and_per_rank_step_times_on_two_ranks(store, tmp_path):
    from tests.dist import run_ranks

    run = tmp_path / "run"
    common = dict(train_steps=6, micro_batch_size=1, log__interval=2, log__wandb={"mode": "offline"},
                  profile={"steps": [2, 3], "ranks": [0, 1], "memory_snapshot_steps": [2]})
    first = values(store, str(run), faults__hang_at_step=3, faults__hang_ranks=[1], faults__hang_seconds=2.0, **common)
    resumed = values(store, str(run), **{**common, "train_steps": 8})
    ranks = run_ranks(_observed_runs, 2, first, resumed)

    for rank, got in enumerate(ranks):
        # the step-time gather: one all-gather and one host read per logging step (2, 4, 6), none on other steps
        assert [k for k, _ in got["observe_syncs"]] == ["tolist"] * 3, (rank, got["observe_syncs"])
        assert got["gathers"] == 3 and not got["violations"], got["violations"]
        assert any("memory_snapshot_steps [2]: skipped on rank" in m and "no CUDA" in m for m in got["messages"])
        trace = run / "profile" / f"rank-{rank}.steps-2-3.pt.trace.json.gz"
        events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
        assert {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")} == {
            "ProfilerStep#2", "ProfilerStep#3"}
        assert any(e.get("name", "").startswith("aten::") for e in events)  # operators inside the steps
    assert not list((run / "profile").glob("*.pickle"))

    rows = {r["step"]: r for r in ranks[0]["metrics"]}
    assert sorted(rows) == list(range(1, 9))
    for step, row in rows.items():
        if step % 2:
            assert "step_time_max_s" not in row and "slowest_rank" not in row, row
            continue
        assert 0 < row["step_time_min_s"] <= row["step_time_median_s"] <= row["step_time_max_s"], row
        assert row["slowest_rank"] in (0, 1) and row["step_time_max_s"] <= 1.5 * row["step_time_s"], row
    # rank 1 slept 2 s at step 3: over steps 3-4 it is 1 s per step slower than rank 0, and it is named
    assert rows[4]["slowest_rank"] == 1 and rows[4]["step_time_max_s"] - rows[4]["step_time_min_s"] > 0.6, rows[4]
    assert any(m.startswith("step 4: rank 1 is a straggler") for m in ranks[0]["messages"])

    run_id = (run / "wandb-run-id").read_text().strip()
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert [p.name.rsplit("-", 1)[1] for p in offline] == [run_id, run_id]  # the resumed run continues the same id
    config, history = wandb_history(offline[0])
    assert config["train_steps"] == 6 and config["log"]["wandb"]["mode"] == "offline"
    assert sorted(history) == list(range(1, 7))
    for step, row in history.items():
        assert row["loss"] == pytest.approx(rows[step]["loss"])
        assert ("slowest_rank" in row) == (step % 2 == 0) and ("step_time_max_s" in row) == (step % 2 == 0)
    assert sorted(wandb_history(offline[1])[1]) == [7, 8]


def _rank_env(rank: int, port: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}


@pytest.mark.distributed
@pytest.mark.slow
def test_a_hung_rank_leaves_flight_records_and_every_rank_exits(store, tmp_path):
    from megatron_code.flight import WATCHDOG_EXIT_CODE
    from tests.dist import free_port

    run = tmp_path / "hang"
    timeout_s = 6.0
    cfg = write_config(values(store, str(run), train_steps=4, micro_batch_size=1, faults__hang_at_step=2,
                              faults__hang_ranks=[1], faults__hang_seconds=600,
                              faults__collective_timeout_minutes=timeout_s / 60), tmp_path / "hang.yaml")
    port = free_port()
    logs = [open(tmp_path / f"rank-{r}.log", "w") for r in (0, 1)]  # noqa: SIM115 (closed below)
    procs = [subprocess.Popen([sys.executable, "-m", "launch.cli", "train", "--config", cfg], env=_rank_env(r, port),
                              stdout=logs[r], stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        wait_for_step(run, 1, procs[0])
        hung = time.monotonic()  # step 2 starts now: rank 1 sleeps, rank 0 waits in its first collective
        codes = [p.wait(timeout=120) for p in procs]
        took = time.monotonic() - hung
    finally:
        for p, f in zip(procs, logs):
            if p.poll() is None:
                p.kill()
                p.wait()
            f.close()
    out = [(tmp_path / f"rank-{r}.log").read_text() for r in (0, 1)]
    assert codes[0] not in (0, WATCHDOG_EXIT_CODE) and "Timed out" in out[0], out[0][-3000:]
    assert codes[1] == WATCHDOG_EXIT_CODE and "still stuck at 1.5 x the collective timeout" in out[1], out[1][-3000:]
    assert took < 1.5 * timeout_s + 30, took  # ended by the timeouts, not left hanging

    records = [json.loads((run / "flight" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["step"], r["phase"]) for r in records] == [(0, 2, "forward"), (1, 2, "data")]
    main0, main1 = ("".join(r["stacks"]["MainThread"]) for r in records)
    assert "train_step" in main0 and "all_reduce" in main0, main0  # waiting in the step's first collective
    assert "time.sleep(f.hang_seconds)" in main1, main1  # the drill: stuck before its batch
    assert records[1]["stalled_s"] >= 1.5 * timeout_s and records[0]["stalled_s"] >= timeout_s / 2
    # rank 0's last operations: step 1's two micro-batches (accumulation 2), its update and log, step 2 begun
    phases = [(e["step"], e["phase"]) for e in records[0]["recent"] if e["step"] >= 1]
    assert phases == [(1, "data"), *[(1, "forward"), (1, "backward")] * 2, (1, "optimizer"), (1, "log"),
                      (2, "data"), (2, "forward")], phases
    assert records[0]["collective_timeout_s"] == pytest.approx(timeout_s) and records[0]["nccl_trace"] is None


def test_observability_config_errors_name_the_values(monkeypatch):
    from megatron_code.train_config import TrainConfig

    def load(**tree: Any) -> Any:
        return load_config(TrainConfig, values={"train_steps": 5, **tree})

    with pytest.raises(ConfigError, match=r"last \(12\) is past train_steps \(5\)"):
        load(profile={"steps": [10, 12]})
    with pytest.raises(ConfigError, match=r"first \(4\) must be at least 1 and at most last \(3\)"):
        load(profile={"steps": [4, 3]})
    with pytest.raises(ConfigError, match=r"memory_snapshot_steps \[9\] outside the run's steps 1..5"):
        load(profile={"memory_snapshot_steps": [2, 9]})
    assert load(profile={"steps": [2, 5]}, log={"wandb": {"mode": "offline"}}).profile.steps == [2, 5]
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb gives: no importable module
    with pytest.raises(ConfigError, match=r"log.wandb.mode is offline but the wandb package is not installed: "
                                          r"`.venv/bin/pip install wandb`"):
        load(log={"wandb": {"mode": "offline"}})
    assert load(log={"wandb": {"mode": "disabled"}}).log.wandb.mode == "disabled"
