"""`codegeex launch`: local torchrun and the deepspeed launcher train the same losses, two torchrun "nodes" on one
machine rendezvous and survive a killed rank, hostfiles and sbatch scripts are checked and rendered."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import launch.launchers
from common.config import ConfigError
from launch.cli import build_parser, main
from launch.launch_cli import cmd_slurm
from launch.launchers import read_hostfile, worker_environment
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
    cfg = write_config(values(store, str(tmp_path / "run"), data__global_batch_size=64), tmp_path / "c.yaml")
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


def test_flags_anywhere_on_the_line(store, tmp_path, capsys):
    """The README's order (CONFIG first, SLURM flags after it) and overrides after flags, as argparse alone refuses
    them; an unknown flag is still an error."""
    cfg = write_config(values(store, str(tmp_path / "run"), data__global_batch_size=64), tmp_path / "c.yaml")
    assert main(["launch", "slurm", cfg, "--nodes", "4", "--gpus-per-node", "8", "--time", "2-00:00:00", "--dry-run",
                 "optim.lr=2e-4"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=4" in out and "#SBATCH --time=2-00:00:00" in out and "submitted" not in out
    assert "lr: 0.0002" in (tmp_path / "run" / "launch" / "config.yaml").read_text()
    local = tmp_path / "local"
    assert main(["launch", "local", cfg, f"run_dir={local}", "--nproc", "2", "--dry-run", "optim.lr=3e-4"]) == 0
    assert "--nproc-per-node 2" in capsys.readouterr().out
    assert "lr: 0.0003" in (local / "launch" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="unknown option"):
        cmd_slurm(build_parser().parse_args(["launch", "slurm", cfg, "--nodez", "2"]))
    with pytest.raises(SystemExit):
        main(["launch", "local", cfg, "--nproc", "2", "--bogus"])


def test_slurm_logs_cpus_sbatch_options_and_containers(store, tmp_path, capsys):
    cfg = write_config(values(store, str(tmp_path / "run")), tmp_path / "c.yaml")
    elsewhere = tmp_path / "ops"
    assert main(["launch", "slurm", cfg, "--dry-run", "--run-dir", str(elsewhere), "--sbatch-arg=--qos=high",
                 "--sbatch-arg=--exclusive", "--sbatch-arg=--mem=0", "--container-image", "nvcr.io/nvidia/pytorch:25.01",
                 "--container-mounts", "/data:/data"]) == 0
    out = capsys.readouterr().out
    assert f"#SBATCH --output={elsewhere}/logs/%x-%j.out" in out and (elsewhere / "logs").is_dir()
    for line in ("#SBATCH --qos=high", "#SBATCH --exclusive", "#SBATCH --mem=0",
                 "srun --container-image=nvcr.io/nvidia/pytorch:25.01 --container-mounts=/data:/data --kill-on-bad-exit"):
        assert line in out, line
    assert main(["launch", "slurm", "--dry-run", "--array", "4", "--", "data", "build", "--input", "x", "--workers",
                 "32", "--output", str(tmp_path / "st")]) == 0
    out = capsys.readouterr().out
    assert out.count("#SBATCH --cpus-per-task=32") == 2  # the parts and the merge
    for argv, error in ((["--sbatch-arg", "qos=high", cfg], "must be one sbatch option"),
                        (["--container-mounts", "/a:/b", cfg], "needs --container-image")):
        with pytest.raises(ConfigError, match=error):
            cmd_slurm(build_parser().parse_args(["launch", "slurm", "--dry-run", *argv]))


GPU_VARIABLES = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
                 "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
ENV_EXTENSIONS = str(Path(sys.prefix) / "torch_extensions")


@pytest.fixture
def clean_env(monkeypatch):
    """None of the variables the launchers default, so each test sees the defaults (or sets its own)."""
    for key in (*GPU_VARIABLES, "TORCH_EXTENSIONS_DIR", "DS_ENV_FILE"):
        monkeypatch.setenv(key, "x")  # so that teardown restores (or removes) what main() sets in os.environ
        monkeypatch.delenv(key)
    return monkeypatch


def test_worker_environment_gpu_variables_and_extensions_dir():
    base = {"PATH": "/usr/bin"}
    on, off = worker_environment(4, base, gpus=True), worker_environment(4, base, gpus=False)
    assert {k: on.get(k) for k in GPU_VARIABLES} == GPU_VARIABLES
    assert not set(GPU_VARIABLES) & set(off)
    assert on["TORCH_EXTENSIONS_DIR"] == off["TORCH_EXTENSIONS_DIR"] == ENV_EXTENSIONS
    assert base == {"PATH": "/usr/bin"}  # a copy, not the caller's dict
    user = worker_environment(4, {**base, "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128",
                                  "CUDA_DEVICE_MAX_CONNECTIONS": "8", "TORCH_EXTENSIONS_DIR": "/mine"}, gpus=True)
    assert (user["PYTORCH_CUDA_ALLOC_CONF"], user["CUDA_DEVICE_MAX_CONNECTIONS"], user["TORCH_EXTENSIONS_DIR"],
            user["TORCH_NCCL_AVOID_RECORD_STREAMS"]) == ("max_split_size_mb:128", "8", "/mine", "1")


@pytest.mark.parametrize("gpus", [True, False])
def test_local_launch_exports_gpu_variables_only_on_gpus(store, tmp_path, capsys, clean_env, gpus):
    clean_env.setattr(launch.launchers, "gpus_here", lambda: gpus)
    cfg = write_config(values(store, str(tmp_path / "run")), tmp_path / "c.yaml")
    assert main(["launch", "local", "--dry-run", "--nproc", "2", cfg]) == 0
    assert "torch.distributed.run" in capsys.readouterr().out
    (record,) = (tmp_path / "run" / "launch").glob("*-local.json")
    env = json.loads(record.read_text())["environment"]
    assert {k: env[k] for k in GPU_VARIABLES if k in env} == (GPU_VARIABLES if gpus else {})
    assert env["TORCH_EXTENSIONS_DIR"] == ENV_EXTENSIONS


def test_train_entry_defaults_torch_extensions_dir(clean_env):
    import megatron_code.train_cli

    seen: list[str | None] = []
    clean_env.setattr(megatron_code.train_cli, "cmd_train",
                      lambda args: seen.append(os.environ.get("TORCH_EXTENSIONS_DIR")) or 0)
    assert main(["train", "--config", "unused.yaml"]) == 0
    clean_env.setenv("TORCH_EXTENSIONS_DIR", "/mine")
    assert main(["train", "--config", "unused.yaml"]) == 0
    assert seen == [ENV_EXTENSIONS, "/mine"]
    # a rank on a GPU machine sets the GPU variables itself (however it was started), keeping the user's
    assert not [k for k in GPU_VARIABLES if k in os.environ]
    import torch

    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setenv("TORCH_NCCL_AVOID_RECORD_STREAMS", "0")
    assert main(["train", "--config", "unused.yaml"]) == 0
    assert {k: os.environ[k] for k in GPU_VARIABLES} == {**GPU_VARIABLES, "TORCH_NCCL_AVOID_RECORD_STREAMS": "0"}


def test_slurm_script_exports_gpu_variables_with_submit_time_values_winning(store, tmp_path, capsys):
    cfg = write_config(values(store, str(tmp_path / "run"), data__global_batch_size=64), tmp_path / "c.yaml")
    assert main(["launch", "slurm", "--dry-run", "--gpus-per-node", "8", cfg]) == 0
    gpu = capsys.readouterr().out
    expected = [f"export {k}=${{{k}:-{v}}}" for k, v in GPU_VARIABLES.items()]
    expected.append(f"export TORCH_EXTENSIONS_DIR=${{TORCH_EXTENSIONS_DIR:-{ENV_EXTENSIONS}}}")
    for line in expected:
        assert line in gpu.splitlines(), line
    assert main(["launch", "slurm", "--dry-run", "--nproc-per-node", "2", cfg]) == 0
    cpu = capsys.readouterr().out
    assert not [k for k in GPU_VARIABLES if k in cpu]
    assert expected[-1] in cpu.splitlines()
    # the script's exports as bash runs them: a value exported at submit time wins, the others are the defaults
    exports = "\n".join(line for line in gpu.splitlines() if line.startswith("export "))
    env = {"PATH": os.environ["PATH"], "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64", "SLURM_CPUS_PER_TASK": "16"}
    out = subprocess.run(["bash", "-uc", exports + "\nenv"], env=env, capture_output=True, text=True, check=True).stdout
    got = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert {k: got[k] for k in GPU_VARIABLES} == {**GPU_VARIABLES, "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}
    assert (got["TORCH_EXTENSIONS_DIR"], got["OMP_NUM_THREADS"]) == (ENV_EXTENSIONS, "2")


def test_deepspeed_runner_carries_the_environment_to_remote_nodes(store, tmp_path, capsys, clean_env):
    """The command `launch deepspeed` runs, run for real against a fake ssh and pdsh: the remote command pdsh gets
    exports the variables DeepSpeed's runner would not forward by itself, the user's .deepspeed_env lines winning."""
    clean_env.setattr(launch.launchers, "gpus_here", lambda: True)
    bin_dir, home, work = tmp_path / "bin", tmp_path / "home", tmp_path / "work"
    for d in (bin_dir, home, work):
        d.mkdir()
    (bin_dir / "ssh").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "pdsh").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "pdsh.args"}\n')
    for tool in ("ssh", "pdsh"):
        (bin_dir / tool).chmod(0o755)
    (home / ".deepspeed_env").write_text("FROM_HOME=1\nPYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:64\n")
    (work / ".deepspeed_env").write_text("FROM_WORKDIR=2\n")
    clean_env.setenv("HOME", str(home))
    clean_env.chdir(work)
    clean_env.setenv("TORCH_NCCL_AVOID_RECORD_STREAMS", "0")  # the user's value, not one DeepSpeed forwards
    run = tmp_path / "run"
    cfg = write_config(values(store, str(run), data__global_batch_size=8), tmp_path / "d.yaml")  # DP 4
    hostfile = _hostfile(tmp_path, "node-a slots=2\nnode-b slots=2\n")
    assert main(["launch", "deepspeed", "--dry-run", "--hostfile", str(hostfile), cfg]) == 0
    cmd = shlex.split(capsys.readouterr().out)
    assert cmd[1:4] == ["-m", "deepspeed.launcher.runner", "--hostfile"]
    (record,) = (run / "launch").glob("*-deepspeed.json")
    env = json.loads(record.read_text())["environment"]
    assert env["DS_ENV_FILE"] == str(run / "launch" / "deepspeed_env")
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    done = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    args = (tmp_path / "pdsh.args").read_text().splitlines()
    assert args[args.index("-w") + 1] == "node-a,node-b"
    remote = next(a for a in args if a.startswith("export "))
    for export in ("CUDA_DEVICE_MAX_CONNECTIONS=1", "TORCH_NCCL_AVOID_RECORD_STREAMS=0",
                   "PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:64", f"TORCH_EXTENSIONS_DIR={ENV_EXTENSIONS}",
                   "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", "FROM_HOME=1", "FROM_WORKDIR=2"):
        assert f"export {export};" in remote, (export, remote)
    assert "deepspeed.launcher.launch" in args and args[-3:] == ["train", "--config", str(run / "launch" / "config.yaml")]


@pytest.mark.slow
@pytest.mark.distributed
def test_local_torchrun_and_deepspeed_launcher_train_the_same(store, tmp_path):
    local, ds = tmp_path / "local", tmp_path / "ds"
    cfg_local = write_config(values(store, str(local), tp=2, micro_batch_size=4), tmp_path / "l.yaml")
    cfg_ds = write_config(values(store, str(ds), micro_batch_size=2), tmp_path / "d.yaml")  # DP=2
    hostfile = _hostfile(tmp_path, "localhost slots=2\n")
    assert codegeex(["launch", "local", "--nproc", "2", cfg_local], tmp_path / "local.log").wait(300) == 0
    # DeepSpeed's warning while importing (on CPUs), made on both ranks: shown once, from rank 0, in our format
    accelerator = [line for line in (tmp_path / "local.log").read_text().splitlines() if "Setting accelerator" in line]
    assert all("[rank 0] WARNING DeepSpeed: " in line for line in accelerator) and len(accelerator) <= 1, accelerator
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
    assert [r["step"] for r in metrics(str(run))] == list(range(1, 41))  # one line per step, the crash's cut
    # global rank 0 (which logs) may sit on either node after the new rendezvous round
    logs = (tmp_path / "node0.log").read_text() + (tmp_path / "node1.log").read_text()
    resumed = re.search(r"resumed from \S+ at step (\d+)", logs)
    assert resumed and int(resumed[1]) in (5, 10, 15), logs[-2000:]  # from the last checkpoint before the kill
