"""Dropout and reduced precision through the real trainer, on CPU (every other trainer test runs fp32 without
dropout).

- TP=2 with hidden and attention dropout: a run stopped at step 3 and resumed gives the straight run's losses and
  final weights bit for bit (the saved RNG states restored); activation checkpointing off, selective and full give
  the same losses and weights bit for bit (the recomputation replays the forward's dropout masks); a dropout-free
  run differs (dropout really is on). The trainer's dropout draws from torch's default generator (CPU here, CUDA on
  a GPU: both saved per rank in ``rng/``); megatron-core's CUDA RNG tracker only initialises weights on a GPU, numpy
  and Python's ``random`` draw nothing in a step (the sampler and corrupt-code-clm's generators are seeded per
  sample), so neither is saved, nor needs to be.
- bf16 (bf16 parameters, DeepSpeed's bf16 optimizer: fp32 master weights and Adam state): finite, falling losses
  within 1e-3 (relative) of the fp32 run's but not equal to them, parameters saved in bf16, the optimizer state in
  fp32, and the resume bit for bit. The trainer has no autocast: reduced precision is the parameters' dtype.
- fp16: DeepSpeed refuses it on a CPU whose oneDNN has no fp16 kernels (``Type fp16 is not supported on your
  device``, checked here where that holds). torch's own CPU fp16 kernels do run it, so with DeepSpeed's device check
  answered yes the trainer's fp16 path (dynamic loss scaler) runs: within 1e-3 of fp32 at a small scale; at 2**20 the
  first steps overflow, are skipped and counted while the scale halves, and a resume at step 3 continues the scaler
  (scale and hysteresis) bit for bit.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.model_utils import synthetic_store
from tests.test_training import final_weights, run_configs
from tests.train_utils import metrics, values

DROPOUT = dict(model__hidden_dropout=0.1, model__attention_dropout=0.1)
BASE = dict(train_steps=6, checkpoint__interval=3, optim__decay_steps=6, **DROPOUT)  # the same schedule stopped at 3
REL = 1e-3  # bf16/fp16 against fp32: a quarter of bf16's unit roundoff (the tiny model's losses agree to ~5e-5)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("dropout") / "store", windows=48, seq_len=32)


def train_each(configs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Train each config in turn; rank 0 returns metrics.jsonl as it stood right after each (a resumed leg's first
    lines must be the first leg's, as written: a fresh start would rewrite them with new timings)."""
    import torch.distributed as dist

    from common.config import load_config
    from megatron_code.train_config import TrainConfig
    from megatron_code.training import train

    out = []
    for v in configs:
        train(load_config(TrainConfig, values=copy.deepcopy(v)), ["test"])
        out.append(metrics(v["run_dir"]) if dist.get_rank() == 0 else [])
    return out


def losses(m: list[dict[str, Any]]) -> list[float]:
    return [r["loss"] for r in m]


def step_dir(run_dir: str, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def assert_equal_weights(run_a: str, run_b: str, step: int = 6) -> None:
    wa, wb = final_weights(run_a, step), final_weights(run_b, step)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{run_b}: {len(differ)} tensors differ from {run_a}'s, e.g. {differ[:3]}"


def assert_resumed(first: list[dict[str, Any]], second: list[dict[str, Any]], straight: list[dict[str, Any]]) -> None:
    """``first``: metrics after the leg stopped at 3; ``second``: after the resumed leg, against the straight run."""
    assert [r["step"] for r in second] == list(range(1, 7))
    assert second[:3] == first, "the second leg rewrote steps 1-3: it did not resume from step 3"
    for key in ("skipped_steps", "loss_scale", "lr"):
        assert [r[key] for r in second] == [r[key] for r in straight], f"resumed {key} differs from the straight run's"
    assert losses(second) == losses(straight), "resumed losses differ from the straight run's"  # bit for bit


@pytest.mark.distributed
@pytest.mark.slow
def test_tp2_dropout_resume_and_recomputation_are_bit_for_bit(store, tmp_path):
    from safetensors.torch import load_file

    from tests.dist import run_ranks

    run = {name: str(tmp_path / name) for name in ("a", "b", "sel", "full", "nodrop")}
    a = values(store, run["a"], tp=2, **BASE)
    b1 = values(store, run["b"], tp=2, **{**BASE, "train_steps": 3})
    b2 = values(store, run["b"], tp=2, **BASE)
    sel = values(store, run["sel"], tp=2, activation_checkpointing="selective", **BASE)
    full = values(store, run["full"], tp=2, activation_checkpointing="full", **BASE)
    nodrop = values(store, run["nodrop"], tp=2, **{**BASE, "model__hidden_dropout": 0.0,
                                                   "model__attention_dropout": 0.0})
    ma, mb1, mb2, msel, mfull, mnodrop = run_ranks(train_each, 2, [a, b1, b2, sel, full, nodrop])[0]
    assert all(np.isfinite(losses(ma)))
    assert losses(mnodrop)[0] != losses(ma)[0], "dropout 0.1 left the first loss unchanged: is dropout applied?"
    assert_resumed(mb1, mb2, ma)
    assert_equal_weights(run["a"], run["b"])
    for name, m in (("sel", msel), ("full", mfull)):
        assert losses(m) == losses(ma), f"activation_checkpointing {name}: losses differ from off's under dropout"
        assert_equal_weights(run["a"], run[name])
    # replicated activations: both tensor-parallel ranks must draw the same hidden-dropout masks, from one state
    # (attention dropout draws from it too, with no tensor-parallel fork as Megatron has: the head slices share masks)
    rng = [load_file(str(step_dir(run["b"], 3) / "rng" / f"rank-{r:05d}.safetensors")) for r in (0, 1)]
    assert torch.equal(rng[0]["cpu"], rng[1]["cpu"])


def _layout_and_optimizer(run_dir: str, step: int) -> tuple[dict[str, Any], set[str], set[str]]:
    """trainer.json's layout, the optimizer state's dtypes and its kinds of entry (fp32, exp_avg, exp_avg_sq)."""
    from safetensors.torch import load_file

    d = step_dir(run_dir, step)
    state: dict[str, torch.Tensor] = {}
    for f in sorted((d / "optimizer").glob("*.safetensors")):
        state.update(load_file(str(f)))
    layout = json.loads((d / "trainer.json").read_text())["layout"]
    return layout, {str(t.dtype) for t in state.values()}, {k.rsplit("/", 1)[1] for k in state}


def _check_precision(run_dir: str, step: int, dtype: str, params: torch.dtype) -> None:
    layout, state_dtypes, kinds = _layout_and_optimizer(run_dir, step)
    assert layout["dtype"] == dtype, layout
    assert {t.dtype for t in final_weights(run_dir, step).values()} == {params}
    assert state_dtypes == {"torch.float32"} and kinds == {"fp32", "exp_avg", "exp_avg_sq"}, (state_dtypes, kinds)


def _close_not_equal(got: list[float], want: list[float], what: str) -> None:
    np.testing.assert_allclose(got, want, rtol=REL, err_msg=f"{what} against fp32")
    assert got != want, f"{what}: the fp32 run's losses exactly: did it run in fp32?"


def test_bf16_trains_on_cpu_close_to_fp32_and_resumes_bit_for_bit(store, tmp_path):
    run = {name: str(tmp_path / name) for name in ("fp32", "bf16", "bf16r")}
    bf16 = dict(precision__dtype="bf16", **BASE)
    m32, m16, mr1, mr2 = (run_configs([v])[0] for v in (
        values(store, run["fp32"], **BASE), values(store, run["bf16"], **bf16),
        values(store, run["bf16r"], **{**bf16, "train_steps": 3}), values(store, run["bf16r"], **bf16)))
    got = losses(m16)
    assert all(np.isfinite(got)) and np.mean(got[-2:]) < got[0] - 0.02, got
    _close_not_equal(got, losses(m32), "bf16")
    _check_precision(run["bf16"], 6, "bf16", torch.bfloat16)
    assert_resumed(mr1, mr2, m16)
    assert_equal_weights(run["bf16"], run["bf16r"])


def test_fp16_on_cpu_refused_by_deepspeed_and_its_loss_scaler_resumes(store, tmp_path, monkeypatch):
    from deepspeed.accelerator import get_accelerator

    accelerator = type(get_accelerator())
    fp16 = dict(precision__dtype="fp16", **BASE)
    if not get_accelerator().is_fp16_supported():  # this CPU's oneDNN has no fp16 kernels: DeepSpeed says so
        with pytest.raises(ValueError, match="Type fp16 is not supported on your device"):
            run_configs([values(store, str(tmp_path / "refused"), **fp16)])
    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda self: True)
    run = {name: str(tmp_path / name) for name in ("fp32", "small", "big", "bigr")}
    big = dict(precision__initial_scale_power=20, **fp16)  # 2**20 overflows the fp16 gradients of steps 1-4
    m32, msmall, mbig, mr1, mr2 = (run_configs([v])[0] for v in (
        values(store, run["fp32"], **BASE), values(store, run["small"], precision__initial_scale_power=8, **fp16),
        values(store, run["big"], **big), values(store, run["bigr"], **{**big, "train_steps": 3}),
        values(store, run["bigr"], **big)))
    assert [r["skipped_steps"] for r in msmall] == [0] * 6 and all(r["loss_scale"] == 2.0**8 for r in msmall)
    _close_not_equal(losses(msmall), losses(m32), "fp16 at scale 2**8")
    _check_precision(run["small"], 6, "fp16", torch.float16)
    # the dynamic scaler: an overflow skips the step; hysteresis 2 keeps the scale once, then each overflow halves it
    assert [r["skipped_steps"] for r in mbig] == [1, 2, 3, 4, 4, 4], mbig
    assert [r["loss_scale"] for r in mbig] == [2.0**p for p in (20, 19, 18, 17, 17, 17)], mbig
    assert all(np.isfinite(losses(mbig)))
    saved = json.loads((step_dir(run["bigr"], 3) / "trainer.json").read_text())["optimizer"]["loss_scaler"]
    assert saved["cur_scale"] == 2.0**18 and saved["cur_hysteresis"] == 1, saved
    assert_resumed(mr1, mr2, mbig)  # the resumed leg overflows at step 4 and halves to 2**17 as the straight one
    assert_equal_weights(run["big"], run["bigr"])
