"""The GPU path's invariants, checked on CPU and gloo (tests/device_audit.py makes the NCCL bugs visible here):

- every tensor handed to a collective in a whole training run (steps, validation, the finite check before each
  checkpoint, the stop-signal agreement) was built for the process group's device;
- one host sync per optimizer step, none in the model's layers, one per generated token;
- attention backends resolved once per use, never one that cannot run it; per-batch metadata built on the host;
- precision: bf16 parameters train with fp32 master weights and fp32 Adam state in every ZeRO stage; a precision
  that contradicts model.params_dtype is refused naming both;
- no random initialisation before a load; nothing compiled at run time by DeepSpeed.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from common.config import ConfigError, load_config
from tests.model_utils import packed_batch, synthetic_store, tiny_config
from tests.train_utils import values


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("gpu-path") / "store", windows=48, seq_len=32)


def _audited_runs(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train each config with the collective audit over the whole run and the sync counter around every step."""
    import megatron_code.training as training
    from megatron_code.train_config import TrainConfig
    from tests.device_audit import CollectiveDeviceAudit, HostSyncCounter

    real_step = training.train_step
    out = []
    for v in configs:
        per_step: list[int] = []
        sites: list[str] = []

        def counted(*args: Any, per_step: list[int] = per_step, sites: list[str] = sites, **kwargs: Any) -> Any:
            with HostSyncCounter() as counter:
                result = real_step(*args, **kwargs)
            per_step.append(counter.count)
            sites.extend(f"{kind} at {where}" for kind, where in counter.events)
            return result

        training.train_step = counted
        try:
            with CollectiveDeviceAudit() as audit:
                training.train(load_config(TrainConfig, values=copy.deepcopy(v)), ["test"])
        finally:
            training.train_step = real_step
        out.append({"syncs": per_step, "sites": sorted(set(sites)), "calls": audit.calls,
                    "violations": [str(c) for c in audit.violations]})
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_training_collectives_live_on_the_device_and_each_step_syncs_once(store, tmp_path):
    from tests.dist import run_ranks

    common = dict(train_steps=4, validation__path=store, validation__interval=2, validation__batches=1,
                  checkpoint__interval=2)
    configs = [values(store, str(tmp_path / "tp2-dp2-zero0"), tp=2, zero_stage=0, **common),
               values(store, str(tmp_path / "dp4-zero2"), tp=1, zero_stage=2, micro_batch_size=1, **common)]
    ranks = run_ranks(_audited_runs, 4, configs)
    for rank, runs in enumerate(ranks):
        no_zero, zero2 = runs
        for name, run in (("TP=2 DP=2 without ZeRO", no_zero), ("DP=4 ZeRO-2", zero2)):
            assert run["calls"] > 50, f"rank {rank} {name}: the audit saw only {run['calls']} collectives"
            assert not run["violations"], f"rank {rank} {name}: " + "\n".join(run["violations"])
        # the trainer's own step: exactly the one read of (loss, tokens, stop, grad norm)
        assert no_zero["syncs"] == [1] * 4, f"rank {rank}: {no_zero['syncs']} syncs per step: {no_zero['sites']}"
        ours = [s for s in zero2["sites"] if s.split(" at ", 1)[1].startswith("megatron_code")]
        assert len(ours) == 1 and "training.py" in ours[0], ours  # ZeRO-2's own reads are DeepSpeed's (documented)


def test_no_host_sync_in_the_model_and_one_per_generated_token():
    from megatron_code.generation import SamplingConfig, generate
    from megatron_code.model import CodeGeeXModel
    from megatron_code.objectives import lm_loss, prepare_batch
    from megatron_code.parallel import single_context
    from tests.device_audit import HostSyncCounter

    pc = single_context()
    torch.manual_seed(0)
    for overrides in ({}, {"fused_qkv": True, "hidden_dropout": 0.1, "attention_dropout": 0.1}):
        model = CodeGeeXModel(tiny_config(**overrides), pc)
        model.set_activation_checkpointing("selective")
        inp = prepare_batch(packed_batch())
        with HostSyncCounter() as counter:
            logits, _ = model(inp.tokens, inp.position_ids, inp.mask)
            loss, _ = lm_loss(logits, inp, pc)
            loss.backward()
        assert counter.count == 0, counter.report()
    model.eval()
    with HostSyncCounter() as counter:
        out = generate(model, [[5, 6, 7, 8], [9, 10]], SamplingConfig(max_new_tokens=6, greedy=True), pad_id=0)
    assert [len(o) for o in out] == [6, 6]
    assert counter.count == 6 and set(counter.by_kind()) == {"tolist"}, counter.report()


def test_attention_backends_per_use_and_metadata_from_the_host():
    from megatron_code.attention import BACKENDS, MaskInfo, can_run, resolve_backends

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backends("auto", cpu, 0.1) == {"train": "sdpa", "prefix": "sdpa", "cache": "sdpa"}
    # on a GPU without flash-attn: flex where it can run (no attention dropout), sdpa for generation's cache
    no_flash = resolve_backends("auto", cuda, 0.0)
    assert no_flash == {"train": "flex", "prefix": "flex", "cache": "sdpa"} or no_flash["train"] == "flash"
    assert resolve_backends("auto", cuda, 0.1)["train"] in ("flash", "sdpa")
    assert resolve_backends("flex", cuda, 0.1) == {"train": "sdpa", "prefix": "sdpa", "cache": "sdpa"}
    assert resolve_backends("flex", cuda, 0.0) == {"train": "flex", "prefix": "flex", "cache": "sdpa"}
    assert not can_run("flash", "train", 0.0, cuda, torch.float32)  # flash-attn takes only fp16 and bf16
    for name in BACKENDS:
        for dropout in (0.0, 0.1):
            for device in (cpu, cuda):
                for dtype in (torch.float32, torch.bfloat16):
                    try:
                        table = resolve_backends(name, device, dropout, dtype)
                    except RuntimeError as exc:  # flash without flash-attn
                        assert "flash-attn" in str(exc)
                        continue
                    for use, backend in table.items():
                        assert can_run(backend, use, dropout, device, dtype), (name, dropout, device, use, backend)
    with pytest.raises(ValueError, match="attention_backend 'dense' must be one of"):
        resolve_backends("dense", cpu, 0.0)
    # flash's cu_seqlens and max_seqlen come from the sampler's document ids, on the host
    docs = np.array([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    info = MaskInfo.from_documents(docs)
    assert info.cu_seqlens.tolist() == [0, 3, 5, 6, 12] and info.max_seqlen == 6
    assert info.cu_seqlens.dtype == torch.int32
    # the flex block mask and the dense mask are built once per batch, whatever the number of layers
    assert info.dense(6) is info.dense(6)
    assert info.block_mask(6, 6, cpu) is info.block_mask(6, 6, cpu)


def test_every_explicit_and_auto_choice_with_flash_installed(monkeypatch, caplog):
    """The whole table, flash-attn present (patched) or not: what each name gives each use on each device, dtype and
    dropout, and the log line for every use an explicit choice cannot run."""
    import megatron_code.attention as attention
    from megatron_code.attention import can_run, resolve_backends

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    bf16, fp32 = torch.bfloat16, torch.float32
    for use, device, dtype, want in [("train", cuda, bf16, True), ("train", cuda, torch.float16, True),
                                     ("prefix", cuda, bf16, False), ("cache", cuda, bf16, False),
                                     ("train", cpu, bf16, False), ("train", cuda, fp32, False)]:
        assert can_run("flash", use, 0.1, device, dtype) is want, (use, device, dtype)
    assert [can_run("flex", u, 0.0, cpu) for u in attention.USES] == [True, True, False]
    assert not can_run("flex", "train", 0.1, cuda) and not can_run("dense", "train", 0.0, cpu)
    monkeypatch.setattr(attention, "flash_available", lambda: False)
    with pytest.raises(RuntimeError, match="^attention_backend 'flash' needs the flash-attn package and a CUDA "
                                           "device$"):
        resolve_backends("flash", cuda, 0.0)
    every = lambda b: {"train": b, "prefix": b, "cache": b}  # noqa: E731
    assert resolve_backends("sdpa", cuda, 0.0) == every("sdpa")  # an explicit sdpa stays sdpa on a GPU
    monkeypatch.setattr(attention, "flash_available", lambda: True)
    flash_then = {"train": "flash", "prefix": "flex", "cache": "sdpa"}
    assert resolve_backends("auto", cuda, 0.0) == flash_then
    assert resolve_backends("auto", cuda, 0.1) == {"train": "flash", "prefix": "sdpa", "cache": "sdpa"}
    assert resolve_backends("auto", cuda, 0.0, fp32) == {"train": "flex", "prefix": "flex", "cache": "sdpa"}
    assert resolve_backends("auto", cpu, 0.0) == every("sdpa")
    assert resolve_backends("sdpa", cuda, 0.0) == every("sdpa")
    assert resolve_backends("flex", cuda, 0.0) == {"train": "flex", "prefix": "flex", "cache": "sdpa"}
    caplog.clear()
    with caplog.at_level("INFO", logger="megatron_code.attention"):
        resolve_backends("auto", cuda, 0.1, fp32)  # auto says nothing, whatever it picks
        assert resolve_backends("flash", cuda, 0.0) == flash_then
        assert resolve_backends("flash", cuda, 0.0, fp32) == {"train": "flex", "prefix": "flex", "cache": "sdpa"}
    assert [r.getMessage() for r in caplog.records] == [
        "attention_backend 'flash' cannot run prefix attention here; that use takes 'flex'",
        "attention_backend 'flash' cannot run cache attention here; that use takes 'sdpa'",
        "attention_backend 'flash' cannot run train attention here; that use takes 'flex'",
        "attention_backend 'flash' cannot run prefix attention here; that use takes 'flex'",
        "attention_backend 'flash' cannot run cache attention here; that use takes 'sdpa'"]
    with pytest.raises(ValueError, match=r"attention_backend 'dense' must be one of auto, sdpa, flex, flash$"):
        resolve_backends("dense", cpu, 0.0)


def test_model_resolves_backends_once(monkeypatch):
    import megatron_code.attention as attention
    from megatron_code.model import CodeGeeXModel
    from megatron_code.parallel import single_context

    calls = []
    real = attention.resolve_backends
    monkeypatch.setattr("megatron_code.model.resolve_backends", lambda *a: calls.append(a) or real(*a))
    model = CodeGeeXModel(tiny_config(num_layers=3), single_context())
    from megatron_code.objectives import prepare_batch

    inp = prepare_batch(packed_batch())
    model(inp.tokens, inp.position_ids, inp.mask)[0].sum().backward()
    assert len(calls) == 1


def _precision_run(store: str, tmp: str) -> dict[str, Any]:
    from benchmarks.gpu_acceptance import optimizer_dtypes
    from megatron_code.train_config import TrainConfig
    from megatron_code.training import build, prepare_batch, train_step

    out: dict[str, Any] = {}
    for stage in (0, 1, 2, 3):
        v = values(store, f"{tmp}/bf16-{stage}", zero_stage=stage, precision={"dtype": "bf16"}, train_steps=1)
        cfg = load_config(TrainConfig, values=v)
        pc, model, engine, sampler = build(cfg)
        result = train_step(engine, pc, [prepare_batch(sampler.next_batch(), pc.device)])
        dtypes = optimizer_dtypes(engine)
        out[f"stage{stage}"] = {"params": sorted({str(p.dtype) for p in model.parameters()}), **dtypes,
                                "loss": result.loss, "skipped": result.skipped}
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_bf16_trains_with_fp32_master_weights_and_state_in_every_zero_stage(store, tmp_path):
    from tests.dist import run_ranks

    res = run_ranks(_precision_run, 2, store, str(tmp_path))[0]
    for stage, r in res.items():
        assert r["params"] == ["torch.bfloat16"], (stage, r)
        assert r["masters"] == ["torch.float32"], (stage, r)
        assert r["states"] == ["torch.float32"], (stage, r)
        assert np.isfinite(r["loss"]) and not r["skipped"], (stage, r)


def test_precision_auto_and_a_contradiction_named(store, tmp_path):
    from megatron_code.train_config import TrainConfig, resolve_precision

    def cfg(**over: Any) -> TrainConfig:
        return load_config(TrainConfig, values=values(store, str(tmp_path), **over))

    for over, cuda, want in (({}, True, ("bf16", "bfloat16")), ({}, False, ("fp32", "float32")),
                             ({"model__params_dtype": "bfloat16"}, False, ("bf16", "bfloat16")),
                             ({"precision": {"dtype": "fp16"}}, True, ("fp16", "float16"))):
        c = cfg(**over)
        resolve_precision(c, cuda)
        assert (c.precision.dtype, c.model.params_dtype) == want, over
    with pytest.raises(ConfigError, match=r"precision.dtype \(fp32\) and model.params_dtype \(bfloat16\) disagree"):
        resolve_precision(cfg(precision={"dtype": "fp32"}, model__params_dtype="bfloat16"), True)


def test_no_random_draw_before_a_load_and_no_runtime_build(store, tmp_path, monkeypatch):
    """Resuming builds the model without drawing weights; DeepSpeed compiles nothing during the run."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    from megatron_code.train_config import TrainConfig
    from megatron_code.training import train

    def no_build(self: Any, *a: Any, **k: Any) -> None:
        raise AssertionError(f"DeepSpeed tried to build {self.name} during a run")

    monkeypatch.setattr(OpBuilder, "jit_load", no_build)
    draws: list[tuple[int, ...]] = []
    real_normal = torch.nn.init.normal_
    monkeypatch.setattr(torch.nn.init, "normal_", lambda t, *a, **k: draws.append(tuple(t.shape)) or real_normal(
        t, *a, **k))
    v = values(store, str(tmp_path / "run"), train_steps=2, checkpoint__interval=2)
    train(load_config(TrainConfig, values=copy.deepcopy(v)), ["test"])
    assert draws, "a fresh run initialises its weights"
    draws.clear()
    v["train_steps"] = 3
    train(load_config(TrainConfig, values=v), ["test"])
    assert draws == [], f"resuming drew random values for {draws[:3]}"


def test_fused_elementwise_equals_the_plain_path_on_cpu():
    from megatron_code.fused import bias_dropout_add, bias_fast_gelu, compiled

    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    r = torch.randn(3, 5, 16, requires_grad=True)
    for name, plain, args in (("bias_fast_gelu", bias_fast_gelu, (x, b)),
                              ("bias_dropout_add", bias_dropout_add, (x, b, r, 0.0, True))):
        want = plain(*args)
        grads = torch.autograd.grad(want.square().sum(), [a for a in args if torch.is_tensor(a)])
        got = compiled(name)(*args)
        got_grads = torch.autograd.grad(got.square().sum(), [a for a in args if torch.is_tensor(a)])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for g, w in zip(got_grads, grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # with dropout: the kept share and the scale are dropout's (the mask itself comes from another generator)
    big = torch.ones(200_000)
    out = compiled("bias_dropout_add")(big, torch.zeros(1), torch.zeros(1), 0.25, True)
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.75) < 0.01
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.75))


def test_parallel_context_knows_its_device():
    from megatron_code.parallel import collective_device, single_context

    pc = single_context()
    assert pc.device == collective_device(pc.tp_group) == torch.device("cpu")


def test_prepare_batch_builds_masks_on_the_host():
    """The batch's masks and flash metadata are computed from numpy: the sync counter sees nothing."""
    from megatron_code.objectives import prepare_batch
    from tests.device_audit import HostSyncCounter

    with HostSyncCounter() as counter:
        inp = prepare_batch(packed_batch())
    assert counter.count == 0, counter.report()
    assert inp.mask.cu_seqlens is not None and inp.mask.max_seqlen > 0


def test_bf16_alone_with_the_default_zero_stage(store, tmp_path):
    """One data-parallel rank, bf16 (what precision auto gives on one GPU) and the default ZeRO-2: ZeRO keeps its
    reduction hooks (without them DeepSpeed fails at the first step) and the step trains."""
    from megatron_code.train_config import TrainConfig
    from megatron_code.training import build, prepare_batch, train_step

    cfg = load_config(TrainConfig, values={k: v for k, v in values(store, str(tmp_path), precision={"dtype": "bf16"},
                                                                   micro_batch_size=4, train_steps=2).items()
                                           if k != "zero_stage"})
    assert cfg.zero_stage == 2
    pc, model, engine, sampler = build(cfg)
    losses = [train_step(engine, pc, [prepare_batch(sampler.next_batch(), pc.device)]) for _ in range(2)]
    assert all(np.isfinite(r.loss) and not r.skipped for r in losses), losses
    assert {str(p.dtype) for p in model.parameters()} == {"torch.bfloat16"}
