"""`codegeex launch slurm` against a real single-node SLURM: a training job preempted with SIGUSR1 that requeues
and finishes from its checkpoint, and a 2-task data-build array followed by its merge."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from common.contracts import load_store_manifest
from launch.cli import main
from tests.model_utils import synthetic_store
from tests.slurm_cluster import slurm_cluster, wait_job
from tests.train_utils import last_step, metrics, values, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env


def submit(argv: list[str], capsys, monkeypatch, env: dict[str, str]) -> list[str]:
    monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])
    assert main(["launch", "slurm", *argv]) == 0
    out = capsys.readouterr().out
    match = re.search(r"submitted job\(s\) ([\d ]+);", out)
    assert match, out
    return match.group(1).split()


def test_training_job_is_preempted_requeued_and_finishes(cluster, tmp_path, capsys, monkeypatch):
    store = synthetic_store(tmp_path / "store", windows=96, seq_len=32)
    run = tmp_path / "run"
    cfg = write_config(values(store, str(run), train_steps=40, tp=2, checkpoint__interval=4), tmp_path / "t.yaml")
    (job,) = submit(["--nproc-per-node", "2", "--time", "10", "--job-name", "tiny", cfg], capsys, monkeypatch, cluster)
    script = (run / "launch" / "train.sbatch").read_text()
    assert "#SBATCH --signal=USR1@120" in script and "#SBATCH --requeue" in script
    deadline = time.time() + 240
    while last_step(run) < 6:
        assert time.time() < deadline, "no step 6 within 240 s"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, env=cluster)
    (record,) = wait_job(job, cluster, timeout=300)
    log = "".join(p.read_text() for p in (run / "logs").glob("*.out"))
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log
    assert int(record["Restarts"]) >= 1, log
    assert "requeueing" in log and "resumed from" in log
    # the signal's step was checkpointed, so the requeued job goes on from it: no step lost, none repeated
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))  # type: ignore[union-attr]
    assert resumed >= 6 and f"saved at step {resumed}, exiting" in log
    assert [r["step"] for r in metrics(str(run))] == list(range(1, 41))
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    records = sorted((run / "launch").glob("*-slurm.json"))
    assert json.loads(records[-1].read_text())["job_ids"] == [job]


def test_data_array_job_then_merge_equals_a_local_build(cluster, tmp_path, capsys, monkeypatch, corpus,
                                                       tokenizer_model):
    inputs, _ = corpus
    out = tmp_path / "array-store"
    build = ["data", "build", "--input", *inputs, "--tokenizer", tokenizer_model, "--seq-len", "64",
             "--workers", "1"]
    parts, merge = submit(["--array", "2", "--", *build, "--output", str(out)], capsys, monkeypatch, cluster)
    records = wait_job(merge, cluster, timeout=300) + wait_job(parts, cluster, timeout=10)
    logs = "".join(p.read_text() for p in (tmp_path / "array-store-slurm" / "logs").glob("*.out"))
    assert len(records) == 3, records
    assert all(r["JobState"] == "COMPLETED" and r["ExitCode"] == "0:0" for r in records), logs
    assert "part 0 of 2" in logs and "part 1 of 2" in logs
    assert main([*build, "--output", str(tmp_path / "local-store")]) == 0
    sharded = load_store_manifest(out)
    local = load_store_manifest(tmp_path / "local-store")
    assert [s.sha256 for s in sharded.shards] == [s.sha256 for s in local.shards]
    assert sharded.total_windows == local.total_windows > 0
    assert Path(tmp_path / "array-store-slurm" / "launch" / "data-merge.sbatch").exists()
