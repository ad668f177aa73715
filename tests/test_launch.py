"""`codegeex launch`: local torchrun and the deepspeed launcher train the same losses, two torchrun "nodes" on one
machine rendezvous and survive a killed rank, hostfiles and sbatch scripts are checked and rendered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from common.config import ConfigError
from launch.cli import build_parser, main
from launch.launch_cli import cmd_slurm
from launch.launchers import read_hostfile
from tests.dist import free_port
from tests.model_utils import synthetic_store
from tests.train_utils import last_step, metrics, values, write_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("launch") / "store", windows=96, seq_len=32)


def codegeex(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "launch.cli", *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.parametrize("text, error", [
    ("host1 slots=2\nhost2 slots=x\n", "hf:2: slots=x must be a positive integer"),
    ("host1 slots=2\nhost1 slots=2\n", "hf:2: host host1 is listed twice"),
    ("host1 2\n", "hf:1: 'host1 2' is not 'HOST slots=N'"),
    ("# only a comment\n", "lists no hosts"),
    ("a slots=2\nb slots=4\n", "every host needs the same slots"),
    ("a slots=0\n", "hf:1: slots=0 must be a positive integer"),
])
def test_hostfile_errors_name_file_and_line(tmp_path, text, error):
    (tmp_path / "hf").write_text(text)
    with pytest.raises(ConfigError, match=error.replace("(", r"\(")):
        read_hostfile(tmp_path / "hf")
    assert [h.slots for h in read_hostfile(_hostfile(tmp_path, "n1 slots=8  # first\n\nn2 slots=8\n"))] == [8, 8]


def _hostfile(tmp_path: Path, text: str) -> Path:
    (tmp_path / "good").write_text(text)
    return tmp_path / "good"


def test_slurm_dry_run_renders_multi_node_chain_and_array(store, tmp_path, capsys):
    cfg = write_config(values(store, str(tmp_path / "run")), tmp_path / "c.yaml")
    assert main(["launch", "slurm", "--dry-run", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                 "--time", "2-00:00:00", "--account", "proj", "--chain", "3", cfg, "optim.lr=2e-4"]) == 0
    out = capsys.readouterr().out
    assert out.count("#!/bin/bash") == 3 and "submitted" not in out
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --time=2-00:00:00", "#SBATCH --signal=USR1@120", "#SBATCH --requeue",
                 "--nnodes 4 --nproc-per-node 8 --rdzv-backend c10d", "scontrol requeue", "CUDA_DEVICE_MAX_CONNECTIONS"):
        assert line in out, line
    resolved = (tmp_path / "run" / "launch" / "config.yaml").read_text()
    assert "lr: 0.0002" in resolved  # the override is in the file the ranks read
    assert main(["launch", "slurm", "--dry-run", "--array", "3", "--", "data", "build", "--input", "x",
                 "--output", str(tmp_path / "st")]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-2" in out and "--num-shards 3 --shard-index $SLURM_ARRAY_TASK_ID" in out
    assert f"data merge {tmp_path / 'st'}" in out
    for argv, error in ((["--array", "2", "--", "data", "build", "--input", "x"], "needs --output"),
                        (["--array", "2", "--", "train", "--config", "x"], "runs 'data build ...'"),
                        (["--time", "soon", cfg], "--time 'soon'"), ([], "needs CONFIG")):
        with pytest.raises(ConfigError, match=error):
            cmd_slurm(build_parser().parse_args(["launch", "slurm", "--dry-run", *argv]))


@pytest.mark.slow
@pytest.mark.distributed
def test_local_torchrun_and_deepspeed_launcher_train_the_same(store, tmp_path):
    local, ds = tmp_path / "local", tmp_path / "ds"
    cfg_local = write_config(values(store, str(local), tp=2, micro_batch_size=4), tmp_path / "l.yaml")
    cfg_ds = write_config(values(store, str(ds), micro_batch_size=2), tmp_path / "d.yaml")  # DP=2
    hostfile = _hostfile(tmp_path, "localhost slots=2\n")
    assert codegeex(["launch", "local", "--nproc", "2", cfg_local], tmp_path / "local.log").wait(300) == 0
    port = str(free_port())
    assert codegeex(["launch", "deepspeed", "--hostfile", str(hostfile), "--master-port", port, cfg_ds],
                    tmp_path / "ds.log").wait(300) == 0, (tmp_path / "ds.log").read_text()[-3000:]
    a, b = metrics(str(local)), metrics(str(ds))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)
    for run, launcher in ((local, "local"), (ds, "deepspeed")):
        (record,) = (run / "launch").glob(f"*-{launcher}.json")
        data = json.loads(record.read_text())
        assert data["commands"][-3:] == ["train", "--config", str(run / "launch" / "config.yaml")]
        assert data["argv"][:3] == ["codegeex", "launch", launcher] and data["environment"]["PATH"]
        assert json.loads((run / "status.json").read_text())["state"] == "completed"


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_on_one_machine_rendezvous_and_survive_a_killed_rank(store, tmp_path):
    run = tmp_path / "two"
    cfg = write_config(values(store, str(run), tp=2, micro_batch_size=4, train_steps=40, checkpoint__interval=5),
                       tmp_path / "two.yaml")
    rdzv = f"127.0.0.1:{free_port()}"
    nodes = [codegeex(["launch", "torchrun", "--nnodes", "2", "--node-rank", str(r), "--rdzv", rdzv,
                       "--max-restarts", "1", cfg], tmp_path / f"node{r}.log") for r in (0, 1)]
    deadline = time.time() + 240
    while last_step(run) < 12:
        assert time.time() < deadline and all(n.poll() is None for n in nodes), (tmp_path / "node1.log").read_text()
        time.sleep(0.2)
    workers = [c for c in psutil.Process(nodes[1].pid).children(recursive=True)
               if c.name().startswith("python") and "train" in c.cmdline()
               and "torch.distributed.run" not in c.cmdline()]
    assert len(workers) == 1  # node 1's only rank
    os.kill(workers[0].pid, 9)
    assert [n.wait(300) for n in nodes] == [0, 0], (tmp_path / "node0.log").read_text()[-3000:]
    steps = [r["step"] for r in metrics(str(run))]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[-1] == 40 and steps[restart] - 1 in (5, 10, 15)  # from the last checkpoint before the kill
    # global rank 0 (which logs) may sit on either node after the new rendezvous round
    assert "resumed from" in (tmp_path / "node0.log").read_text() + (tmp_path / "node1.log").read_text()
