"""Launch-time validation (launch.validate.check_job): every `codegeex launch` and `codegeex plan --validate` checks
the world it knows against the config, the files the ranks will open and the memory per rank against `--gpu`,
before anything is written or started, and refuses with exit code 2 and one line per problem."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pytest

import launch.launchers
from common.contracts import load_store_manifest, write_manifest
from launch.cli import main
from tests.model_utils import synthetic_store
from tests.train_utils import values, write_config


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("validation") / "store", windows=8, seq_len=32)


def refused(argv: list[str], caplog) -> list[str]:
    """Run the command (it must exit 2) and return its problem lines."""
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2, caplog.text
    (message,) = [r.getMessage() for r in caplog.records if "configuration error" in r.getMessage()]
    return [line[4:] for line in message.splitlines() if line.startswith("  - ")]


def config(tmp_path: Path, store: str, name: str = "c.yaml", **over) -> str:
    return write_config(values(store, str(tmp_path / "run"), **{"data__global_batch_size": 64, **over}),
                        tmp_path / name)


def test_the_issue_examples_are_refused_before_anything_is_written(store, tmp_path, caplog):
    cfg = config(tmp_path, store)  # 4 heads, micro-batch 2, global batch 64
    assert refused(["launch", "slurm", cfg, "--nodes", "4", "--gpus-per-node", "8", "--dry-run", "tp=8"],
                   caplog) == ["tp (8) must divide model.num_attention_heads (4)"]
    assert refused(["launch", "local", "--nproc", "2", cfg, "--dry-run", "tp=8"], caplog) == [
        "tp (8) must divide model.num_attention_heads (4)", "world size 2 (--nproc 2) must be a multiple of tp (8)"]
    (line,) = refused(["launch", "slurm", cfg, "--nodes", "2", "--gpus-per-node", "3", "--dry-run", "tp=2",
                       "data.global_batch_size=48"], caplog)
    assert line.startswith("--gpus-per-node 3 is not a multiple of tp (2): world size 6 (2 nodes x 3 GPUs) would put "
                           "a tensor-parallel group across two nodes; on GPUs they must stay inside a node"), line
    (line,) = refused(["launch", "slurm", cfg, "--nodes", "3", "--gpus-per-node", "8", "--dry-run", "tp=2"], caplog)
    assert line == ("data.global_batch_size (64) must be a multiple of micro_batch_size (2) x data-parallel size (12) "
                    "= 24 (world size 24 = 3 nodes x 8 GPUs, tp 2)")
    assert not (tmp_path / "run").exists()  # refused before the run directory's record
    # CPU ranks (gloo) may split a TP group across nodes: slow, but it runs (tests do it with two torchrun agents)
    assert main(["launch", "slurm", cfg, "--nodes", "2", "--nproc-per-node", "3", "--dry-run", "tp=2",
                 "data.global_batch_size=48"]) == 0
    assert "valid for 6 ranks (2 nodes x 3 ranks) = TP 2 x DP 3" in caplog.text


def test_every_launcher_checks_its_own_world(store, tmp_path, caplog, monkeypatch):
    cfg = config(tmp_path, store, tp=2, data__global_batch_size=48)
    monkeypatch.setattr(launch.launchers, "gpus_here", lambda: True)  # GPU ranks, as this machine would start them
    (tmp_path / "hosts").write_text("node-a slots=3\nnode-b slots=3\n")
    (line,) = refused(["launch", "deepspeed", "--hostfile", str(tmp_path / "hosts"), cfg, "--dry-run"], caplog)
    assert line.startswith(f"slots=3 in {tmp_path / 'hosts'} is not a multiple of tp (2): world size 6 (2 hosts x 3 "
                           f"slots in {tmp_path / 'hosts'})"), line
    (line,) = refused(["launch", "torchrun", "--nnodes", "2", "--node-rank", "1", "--rdzv", "node0:29400",
                       "--nproc", "3", cfg, "--dry-run"], caplog)
    assert line.startswith("--nproc 3 is not a multiple of tp (2): world size 6 (--nnodes 2 x --nproc 3)"), line


def test_missing_store_tokenizer_and_unwritable_directories_are_all_named(store, tmp_path, caplog):
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(store, broken)
    meta = load_store_manifest(broken)
    write_manifest(broken, dataclasses.replace(meta, tokenizer=dataclasses.replace(meta.tokenizer,
                                                                                   path=str(tmp_path / "tok.model"))))
    (tmp_path / "a-file").write_text("")
    v = values(store, str(tmp_path / "run"), data__global_batch_size=64, checkpoint__dir="/sys/codegeex-checkpoints",
               validation__path=str(broken))
    v["data"]["sources"].append({"path": str(tmp_path / "missing-store")})
    cfg = write_config(v, tmp_path / "files.yaml")
    problems = [
        f"data.sources[1] {tmp_path / 'missing-store'} does not exist: build it with `codegeex data build --output "
        f"{tmp_path / 'missing-store'}`",
        f"validation.path {broken}: its tokenizer {tmp_path / 'tok.model'} (recorded in {broken}/manifest.json) does "
        "not exist: the checkpoints carry it and generation needs it",
        "checkpoint directory /sys/codegeex-checkpoints cannot be created (/sys is not writable): Permission denied"]
    assert refused(["launch", "local", cfg, "--dry-run", "--nproc", "2"], caplog) == problems
    assert not (tmp_path / "run").exists()
    # the same function behind plan --validate; a run directory that cannot be created
    run_dir = tmp_path / "a-file" / "run"
    assert refused(["plan", "--validate", cfg, "--world-size", "2", f"run_dir={run_dir}"], caplog) == [
        *problems, f"run_dir {run_dir} cannot be created: {tmp_path / 'a-file'} is a file, not a directory"]
    (tmp_path / "tok.model").write_bytes(b"\x00")  # present (and readable): that problem goes
    assert refused(["plan", "--validate", cfg, "--world-size", "2"], caplog) == [problems[0], problems[2]]


def test_memory_above_the_device_is_refused_unless_forced(store, tmp_path, caplog, capsys):
    # micro-batch 2**19 of 32 tokens: ~51 GiB of activations, more than an A100-40's memory, less than an H200's
    cfg = config(tmp_path, store, micro_batch_size=2**19, data__global_batch_size=2**19)
    slurm = ["launch", "slurm", cfg, "--nodes", "1", "--gpus-per-node", "1", "--dry-run"]
    (line,) = refused([*slurm, "--gpu", "a100-40gb"], caplog)
    assert line.startswith("predicted memory per rank 58.0 GiB exceeds A100-40's 40 GiB (parameters 0.0, gradients "
                           "0.0, optimizer 0.0, activations 51.0, logits 4.0, reserve 3.0)") and "--force" in line, line
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main([*slurm, "--gpu", "a100-40gb", "--force"]) == 0
    assert "58.0 GiB of A100-40's 40 GiB" in caplog.text and "launched anyway (--force)" in caplog.text
    assert "#SBATCH --gpus-per-node=1" in capsys.readouterr().out
    assert main([*slurm, "--gpu", "H200"]) == 0  # 141 GiB: fits
    # plan --validate: the same prediction and refusal; without --gpu it says the memory was not checked
    (line,) = refused(["plan", "--validate", cfg, "--world-size", "1", "--gpu", "h100-80gb",
                       f"micro_batch_size={2**20}", f"data.global_batch_size={2**20}"], caplog)
    assert line.startswith("predicted memory per rank 113.0 GiB exceeds H100-80's 80 GiB"), line
    assert main(["plan", "--validate", cfg, "--world-size", "1"]) == 0
    out = capsys.readouterr().out
    assert "valid for 1 rank (--world-size 1)" in out and "not checked against a device: give --gpu KIND" in out
    assert main(["plan", "--validate", cfg, "--world-size", "1", "--gpu", "a100-40gb", "--force"]) == 0
    assert "launched anyway (--force)" in capsys.readouterr().out
