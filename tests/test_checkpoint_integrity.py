"""Checkpoint integrity: a rank killed with SIGKILL at every phase of a save leaves a resumable run; every file's
digest is verified on resume, init_from, conversion and generation; a corrupt checkpoint is named, and an automatic
resume falls back to the newest intact one."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.model_utils import synthetic_store
from tests.train_utils import metrics, values

STEP = "step-{:08d}".format


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("integrity") / "store", windows=48, seq_len=32)


def _engine_and_state(store: str, work: str) -> tuple[Any, Any, dict[str, Any]]:
    """A tiny engine on one gloo rank, after one step, and the trainer state a save records."""
    from common.config import load_config
    from megatron_code.objectives import make_objective, prepare_batch
    from megatron_code.train_config import TrainConfig
    from megatron_code.training import ResumePlan, build, train_step

    cfg = load_config(TrainConfig, values=values(store, f"{work}/run", micro_batch_size=4))
    pc, model, engine, sampler = build(cfg, ResumePlan())
    objective = make_objective(cfg, [(store, sampler.sources[0].store.manifest)])
    train_step(engine, pc, [prepare_batch(sampler.next_batch(), pc.device, objective)])
    state = {"sampler": sampler.state_dict(), "skipped_steps": 0, "config": {}, "git_revision": "", "command": []}
    return engine, model, state


def _in_child(fn: Any) -> int:
    """``fn()`` in a forked child with its own process group (forked before any exists: gloo's threads do not
    survive a fork); returns the signal that ended it, or minus its exit code."""
    from tests.dist import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)


def _kill_every_phase(store: str, work: str) -> dict[str, int]:
    """Checkpoints of steps 2 and 4 are saved once; then, for each save phase, a forked process builds the engine
    again and saves into its own copy of them, killed (SIGKILL) at that phase: ``new-PHASE`` saving step 6 beside
    them, ``resave-PHASE`` saving step 4 again. Returns each child's signal."""
    import torch

    from megatron_code.train_checkpoint import save_training_checkpoint
    from megatron_code.train_config import SAVE_PHASES

    torch.set_num_threads(1)  # no OpenMP pool to lose in the forks
    root = Path(work) / "base"

    def base() -> None:
        engine, model, state = _engine_and_state(store, work)
        for step in (2, 4):
            save_training_checkpoint(root, step, engine, model, copy.deepcopy(state), keep=3)

    killed = {"base": _in_child(base)}
    for kind, step in (("new", 6), ("resave", 4)):
        for phase in SAVE_PHASES:
            target = Path(work) / f"{kind}-{phase}"
            shutil.copytree(root, target)

            def save(target: Path = target, step: int = step, phase: str = phase) -> None:
                engine, model, state = _engine_and_state(store, work)
                save_training_checkpoint(target, step, engine, model, state, keep=3, kill=phase)

            killed[target.name] = _in_child(save)
    return killed


def _intact(path: Path) -> bool:
    from common.contracts import load_checkpoint_files
    from common.integrity import verify

    return not verify(path, load_checkpoint_files(path).files)


@pytest.mark.distributed
def test_a_rank_killed_at_every_phase_of_a_save_leaves_an_intact_resumable_checkpoint(store, tmp_path):
    from megatron_code.train_checkpoint import resume_candidates
    from megatron_code.train_config import SAVE_PHASES
    from tests.dist import run_ranks
    from tests.test_training import run_configs

    killed = run_ranks(_kill_every_phase, 1, store, str(tmp_path))[0]
    assert killed.pop("base") == -3  # saved steps 2 and 4, exited
    assert set(killed.values()) == {signal.SIGKILL}, killed  # every child died at its phase, none finished
    committed = SAVE_PHASES.index("latest")  # from here on `latest` names the new checkpoint
    for kind, step, before in (("new", 6, 4), ("resave", 4, 4)):
        for i, phase in enumerate(SAVE_PHASES):
            root = tmp_path / f"{kind}-{phase}"
            best = resume_candidates(root)[0]
            assert _intact(best), (root, best)
            want = step if i > committed else before
            assert int(best.name.rsplit("-", 1)[1]) == want, (phase, best)
            assert (best.name == f".old-{STEP(4)}") == (kind == "resave" and phase == "replace"), (phase, best)
            leftovers = {p.name for p in root.iterdir()} - {"latest", STEP(2), STEP(4), STEP(6)}
            assert leftovers <= {f".tmp-{STEP(step)}", f".old-{STEP(4)}"}, (phase, leftovers)
    # the worst instant, a re-save killed between its two renames (`latest` names a missing directory): the run
    # resumes from the copy renamed aside and goes on
    root = tmp_path / "resave-replace"
    assert not (root / STEP(4)).exists() and (root / "latest").read_text().strip() == STEP(4)
    run = tmp_path / "resumed"
    m = run_configs([values(store, str(run), micro_batch_size=4, train_steps=6, checkpoint__dir=str(root),
                            checkpoint__interval=100)])[0]
    assert [r["step"] for r in m] == [5, 6]
    assert resume_candidates(root)[0] == root / STEP(6) and _intact(root / STEP(6))
    assert not (root / f".old-{STEP(4)}").exists()


def _flip(path: Path, count: int = 256) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_files_are_named_and_auto_resume_falls_back(store, tmp_path, caplog):
    from common.integrity import CorruptCheckpointError
    from megatron_code.checkpoint import full_state, load_model
    from megatron_code.parallel import single_context
    from tests.test_training import run_configs

    run = tmp_path / "run"
    first = run_configs([values(store, str(run), train_steps=4, checkpoint__interval=2)])[0]
    ckpts = run / "checkpoints"
    states = ckpts / STEP(4) / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    _flip(states)  # 256 bytes of DeepSpeed's model states
    with pytest.raises(CorruptCheckpointError, match="mp_rank_00_model_states.pt: checksum"):
        run_configs([values(store, str(run), train_steps=6, checkpoint__resume=str(ckpts / STEP(4)))])
    with caplog.at_level(logging.WARNING, logger="codegeex"):
        resumed = run_configs([values(store, str(run), train_steps=6, checkpoint__interval=2)])[0]
    assert f"checkpoint {ckpts / STEP(4)} is corrupt" in caplog.text and "mp_rank_00_model_states.pt" in caplog.text
    assert f"resuming from {ckpts / STEP(2)}, the newest intact checkpoint" in caplog.text
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # steps 3-4 done again, their lines replaced
    assert [r["loss"] for r in resumed[:4]] == [r["loss"] for r in first]  # bit for bit from step 2
    assert _intact(ckpts / STEP(4)) and _intact(ckpts / STEP(6))  # the corrupt one re-saved

    model_dir = ckpts / STEP(6) / "model"
    shard = model_dir / "model-tp00-of-01.safetensors"
    _flip(shard)
    for load in (lambda: load_model(model_dir, single_context()), lambda: full_state(model_dir)):
        with pytest.raises(CorruptCheckpointError, match="model-tp00-of-01.safetensors: checksum .* does not match"):
            load()
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated
    with pytest.raises(CorruptCheckpointError, match="bytes, the manifest records"):
        full_state(model_dir)
    with pytest.raises(CorruptCheckpointError, match="model-tp00-of-01.safetensors"):  # stage 2 from it
        run_configs([values(store, str(tmp_path / "stage2"), train_steps=1, init_from=str(model_dir))])
    assert metrics(str(run))[-1]["step"] == 6


def test_cli_commands_refuse_a_corrupt_checkpoint_naming_the_file(tmp_path, caplog):
    """`model convert` and `eval generate` exit non-zero naming the file (no `⁇ ⁇ ⁇` samples with exit code 0)."""
    from launch.cli import main
    from megatron_code.checkpoint import save_checkpoint
    from megatron_code.model import CodeGeeXModel
    from megatron_code.parallel import single_context
    from tests.model_utils import tiny_config

    ckpt = tmp_path / "ck"
    save_checkpoint(ckpt, CodeGeeXModel(tiny_config(), single_context()))
    out: dict[str, Any] = {}
    assert main(["model", "convert", str(ckpt), "--to", "native", "--tp", "2", "--output", str(tmp_path / "tp2")]) == 0
    out["converted"] = sorted(p.name for p in (tmp_path / "tp2").iterdir())
    assert out["converted"] == ["manifest.json", "model-tp00-of-02.safetensors", "model-tp01-of-02.safetensors"]
    _flip(tmp_path / "tp2" / "model-tp01-of-02.safetensors", 16)
    with caplog.at_level(logging.ERROR, logger="codegeex"):
        code = main(["model", "convert", str(tmp_path / "tp2"), "--to", "native", "--output", str(tmp_path / "tp1")])
    assert code == 1 and "model-tp01-of-02.safetensors: checksum" in caplog.text
    assert not (tmp_path / "tp1").exists()
