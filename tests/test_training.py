"""The trainer on gloo ranks against single-process references: exact resumption, TP/DP/ZeRO equivalence, golden
loss, NaN handling, signals."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.model_utils import synthetic_store
from tests.train_utils import launch_module, metrics, values, wait_for_step, write_config

GOLDEN = Path(__file__).parent / "golden" / "tiny_loss.json"
TOL = dict(rtol=1e-5, atol=1e-6)


def run_configs(configs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Train each config in turn in this process; rank 0 returns every run's metrics."""
    import torch.distributed as dist

    from common.config import load_config
    from megatron_code.train_config import TrainConfig
    from megatron_code.training import train

    for v in configs:
        train(load_config(TrainConfig, values=copy.deepcopy(v)), ["test"])
    if dist.get_rank() == 0:
        return [metrics(v["run_dir"]) for v in configs]
    return []


def final_weights(run_dir: str, step: int) -> dict[str, torch.Tensor]:
    from megatron_code.checkpoint import full_state

    return full_state(Path(run_dir) / "checkpoints" / f"step-{step:08d}" / "model")[1]


# fp32 runs that differ only in reduction order (TP all-reduces, DP buckets, ZeRO's reduce-scatters, accumulation
# sums) end a few steps apart by about 1 ulp of each weight (measured: at most 1.3e-7, on weights up to 1.01): 1e-5
# relative. The attention's key biases are the exception: their true gradient is zero (a query's scores all move by
# the same q.b_k, which the softmax ignores), so they hold only rounding noise that Adam scales up, as large as the
# biases themselves (measured: |b| and the differences up to 2.6e-6): 1e-5 absolute for them. A lost or doubled
# update moves a weight by the learning rate (>= 3e-4 here).
WEIGHT_TOL = dict(rtol=1e-5, atol=1e-6)
NOISE_TOL = dict(rtol=0.0, atol=1e-5)


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    """Every parameter of two final checkpoints equal, at ``WEIGHT_TOL`` (key biases: ``NOISE_TOL``)."""
    assert set(got) == set(want), what
    for k in want:
        tol = NOISE_TOL if k.endswith("attention.key.bias") else WEIGHT_TOL
        torch.testing.assert_close(got[k], want[k], **tol, msg=lambda m, k=k: f"{what}: {k}: {m}")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("train") / "store", windows=96, seq_len=32)


@pytest.mark.distributed
@pytest.mark.slow
def test_tp2_dp2_resume_is_exact_zero_stages_agree_and_resume_is_elastic(store, tmp_path):
    """TP2xDP2: a resume is bit for bit; ZeRO 2 and 3 agree with ZeRO 1. Its checkpoint of step 3 then resumes on
    TP2xDP1 (no ZeRO: the partitions regathered) for steps 4-5, and that one on TP1xDP2 (ZeRO 1 again, the model
    and the optimizer state resharded) for step 6: losses and final weights as the straight run's, within fp32
    rounding, and the sampler where it stopped (a repeated or skipped sample would change the losses). ZeRO 2 and 3
    also end with ZeRO 1's weights (the last update shows in no loss)."""
    import shutil

    from tests.dist import run_ranks

    base = dict(tp=2, micro_batch_size=1, train_steps=6, checkpoint__interval=3, optim__decay_steps=4)  # fixed schedule
    a = values(store, str(tmp_path / "a"), **base)
    b1 = values(store, str(tmp_path / "b"), **{**base, "train_steps": 3})
    b2 = values(store, str(tmp_path / "b"), **base)
    z2 = values(store, str(tmp_path / "z2"), **{**base, "zero_stage": 2})
    z3 = values(store, str(tmp_path / "z3"), **{**base, "zero_stage": 3})
    ma, _, mb, m2, m3 = run_ranks(run_configs, 4, [a, b1, b2, z2, z3])[0]
    straight = [r["loss"] for r in ma]
    resumed = [r["loss"] for r in mb]
    assert len(straight) == 6 and resumed == straight  # bit for bit, every step
    wa, wb = final_weights(a["run_dir"], 6), final_weights(b2["run_dir"], 6)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for m in (m2, m3):
        np.testing.assert_allclose([r["loss"] for r in m], straight, **TOL)
    for z in (z2, z3):  # the last step's update shows in no loss: the final weights, from the step-6 checkpoints
        assert_same_weights(final_weights(z["run_dir"], 6), wa, f"zero {z['zero_stage']}")

    step3 = "step-00000003"
    (tmp_path / "e" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "b" / "checkpoints" / step3, tmp_path / "e" / "checkpoints" / step3)
    (tmp_path / "e" / "checkpoints" / "latest").write_text(step3 + "\n")
    e1 = values(store, str(tmp_path / "e"), **{**base, "train_steps": 5})  # TP2 x DP1
    e2 = values(store, str(tmp_path / "e"), **{**base, "tp": 1})  # TP1 x DP2
    me = run_ranks(run_configs, 2, [e1, e2])[0][-1]  # metrics.jsonl after both legs
    assert [r["step"] for r in me] == [4, 5, 6]  # one line per step
    np.testing.assert_allclose([r["loss"] for r in me], straight[3:], **TOL)
    np.testing.assert_allclose([r["lr"] for r in me], [r["lr"] for r in ma[3:]], rtol=1e-12)
    assert_same_weights(final_weights(e2["run_dir"], 6), wa, "elastic resume")
    legs = [json.loads((tmp_path / "e" / "checkpoints" / f"step-0000000{s}" / "trainer.json").read_text())
            for s in (5, 6)]
    assert [t["layout"] for t in legs] == [{"tp": 2, "dp": 1, "zero_stage": 0, "dtype": "fp32"},
                                           {"tp": 1, "dp": 2, "zero_stage": 1, "dtype": "fp32"}]
    assert [t["sampler"]["consumed_samples"] for t in legs] == [5 * 4, 6 * 4]


def test_tp2_and_dp2_equal_the_single_process_run(store, tmp_path):
    from tests.dist import run_ranks

    ref = run_configs([values(store, str(tmp_path / "ref"), micro_batch_size=4, validation__path=store,
                              validation__interval=5, validation__batches=2, log__tensorboard=True)])[0]
    assert np.isfinite(ref[-1]["validation_loss"]) and "validation_loss" not in ref[0]
    assert list((tmp_path / "ref" / "tensorboard").glob("events.out.tfevents.*"))
    assert {"tokens_per_s", "tflops_per_device", "lr", "grad_norm", "loss_scale"} <= set(ref[0])
    accum = run_configs([values(store, str(tmp_path / "accum"), micro_batch_size=2)])[0]  # accumulation 2
    tp2 = values(store, str(tmp_path / "tp2"), tp=2, micro_batch_size=4)
    dp2 = values(store, str(tmp_path / "dp2"), micro_batch_size=2)
    sp2 = values(store, str(tmp_path / "sp2"), tp=2, micro_batch_size=4, model__sequence_parallel=True)
    got_tp2, got_dp2, got_sp2 = run_ranks(run_configs, 2, [tp2, dp2, sp2])[0]
    want = np.array([r["loss"] for r in ref])
    for got in (accum, got_tp2, got_dp2, got_sp2):
        np.testing.assert_allclose([r["loss"] for r in got], want, **TOL)
    # the gradient norm counts tensor-parallel replicas (LayerNorms, row-parallel biases) once; the same without ZeRO
    # (DP=1, our clipping hook) and with it (DP=2, DeepSpeed's ZeRO optimizer)
    norms = np.array([r["grad_norm"] for r in ref])
    assert (norms > 0).all()
    for got in (got_tp2, got_dp2, got_sp2):  # sequence parallelism: LayerNorm gradients summed over the slices
        np.testing.assert_allclose([r["grad_norm"] for r in got], norms, rtol=1e-4)
    # and the weights after the last update (which no loss shows), from each run's final checkpoint (step 5)
    want_w = final_weights(str(tmp_path / "ref"), 5)
    for name in ("accum", "tp2", "dp2", "sp2"):
        assert_same_weights(final_weights(str(tmp_path / name), 5), want_w, name)


def test_golden_loss_of_the_tiny_preset(store, tmp_path):
    from common.config import load_config
    from megatron_code.config import PRESET_DIR, ModelConfig

    tiny = load_config(ModelConfig, PRESET_DIR / "tiny.yaml")
    v = values(store, str(tmp_path / "golden"), train_steps=20, seed=1234)
    v["model"] = {k: getattr(tiny, k) for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                                                "vocab_size", "max_position_embeddings")}
    losses = [r["loss"] for r in run_configs([v])[0]]
    if os.environ.get("CODEGEEX_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"preset": "tiny", "steps": 20, "seed": 1234, "losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    np.testing.assert_allclose(losses, golden, rtol=1e-4, err_msg="regenerate with CODEGEEX_UPDATE_GOLDEN=1 only "
                               "for an intended change of the numbers")
    assert losses[-1] < losses[0] - 0.5


def test_nan_steps_are_skipped_counted_and_bounded(store, tmp_path):
    m = run_configs([values(store, str(tmp_path / "nan"), train_steps=5, faults__inject_nan_steps=[2])])[0]
    assert [r["skipped_steps"] for r in m] == [0, 1, 1, 1, 1]
    assert all(np.isfinite(r["loss"]) for i, r in enumerate(m) if i != 1)
    with pytest.raises(RuntimeError, match="3 steps in a row skipped"):
        run_configs([values(store, str(tmp_path / "nan3"), faults__inject_nan_steps=[2, 3, 4],
                            faults__max_consecutive_skipped=3)])


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_0(store, tmp_path):
    import signal

    from megatron_code.train_checkpoint import find_latest

    run = tmp_path / "sig"
    cfg = write_config(values(store, str(run), train_steps=100000), tmp_path / "sig.yaml")
    proc = launch_module(["launch.cli", "train", "--config", cfg], run)
    wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    latest = find_latest(run / "checkpoints")
    assert latest is not None
    saved = json.loads((latest / "trainer.json").read_text())["step"]
    assert 3 <= saved < 100000 and saved == metrics(str(run))[-1]["step"]


@pytest.mark.slow
@pytest.mark.distributed
def test_killed_rank_restarts_under_torchrun_and_resumes(store, tmp_path):
    import psutil

    run = tmp_path / "elastic"
    cfg = write_config(values(store, str(run), train_steps=40, checkpoint__interval=5), tmp_path / "el.yaml")
    proc = launch_module(["torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1", "--rdzv-backend",
                    "c10d", "--rdzv-endpoint", "127.0.0.1:0", "-m", "launch.cli", "train", "--config", cfg], run)
    wait_for_step(run, 12, proc)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "launch.cli" in " ".join(c.cmdline())]
    assert len(workers) == 2
    os.kill(workers[1].pid, 9)
    assert proc.wait(timeout=300) == 0
    assert [r["step"] for r in metrics(str(run))] == list(range(1, 41))  # one line per step, the crash's cut
    log = (tmp_path / "elastic.log").read_text()
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    assert resumed and int(resumed[1]) in (5, 10, 15), log[-2000:]  # from the last checkpoint before the kill


def test_activation_checkpointing_gives_the_same_losses(store, tmp_path):
    runs = [values(store, str(tmp_path / mode), train_steps=3, activation_checkpointing=mode)
            for mode in ("off", "selective", "full")]
    off, selective, full = run_configs(runs)
    for other in (selective, full):
        np.testing.assert_allclose([r["loss"] for r in other], [r["loss"] for r in off], **TOL)
        np.testing.assert_allclose([r["grad_norm"] for r in other], [r["grad_norm"] for r in off], rtol=1e-4)


def test_metrics_are_cut_to_the_resumed_step(tmp_path):
    """A crash after step 8 and a resume from the checkpoint of step 6: the lines of steps 7 and 8 (and a torn last
    line) go, the rest stay as written."""
    from megatron_code.training import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in range(1, 9)]
    path.write_text("".join(lines) + '{"step": 9, "lo')
    assert truncate_metrics(path, 6) == 3
    assert path.read_text() == "".join(lines[:6])
    assert truncate_metrics(path, 6) == 0 and truncate_metrics(tmp_path / "none.jsonl", 3) == 0
