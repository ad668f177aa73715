"""The training path on a CUDA GPU (``pytest -m gpu`` on the device machine; skipped without CUDA, tests/conftest.py):

- bf16 training of the tiny preset through the real trainer resumes bit for bit (6 steps, resumed from 3), with bf16
  parameters, fp32 master weights and fp32 Adam state;
- greedy generation with the KV cache equals greedy full forwards without one, on the GPU;
- every attention backend (sdpa, flex, flash where installed) agrees on random q/k/v over packed documents, with and
  without a bidirectional prefix, and with a KV cache for sdpa and flex;
- the fused (compiled) elementwise kernels equal the plain path on CUDA;
- one host sync per training step and one per generated token on CUDA.

They share their machinery with benchmarks/gpu_acceptance.py, whose CPU smoke run is the one test here that needs no
GPU (``slow``): it keeps the script runnable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks import gpu_acceptance as acceptance

ROOT = Path(__file__).resolve().parents[1]
SMALL: dict[str, Any] = dict(seq_len=128, train_steps=6, resume_from=3, sync_steps=3, new_tokens=16)


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The straight and the resumed bf16 run of the tiny preset, trained once for the module."""
    settings = acceptance.Settings("cuda", **SMALL)
    root = tmp_path_factory.mktemp("gpu")
    store = acceptance.make_store(root, settings)
    return {"settings": settings, "root": root, "store": store,
            "run": acceptance.train_and_resume(root, store, settings)}


@pytest.fixture(scope="module")
def gpu_model(gpu_run: dict[str, Any]) -> Any:
    """The straight run's last checkpoint, loaded for generation (on the GPU: load_model builds on pc.device)."""
    run, settings = gpu_run["run"], gpu_run["settings"]
    return acceptance.load_for_generation(acceptance.step_dir(run["straight"], settings.train_steps) / "model")


@pytest.mark.gpu
def test_bf16_training_resumes_bit_for_bit_with_fp32_optimizer_state(gpu_run):
    run, settings = gpu_run["run"], gpu_run["settings"]
    n, k = settings.train_steps, settings.resume_from
    straight, resumed = run["straight_losses"], run["resumed_losses"]
    assert sorted(straight) == list(range(1, n + 1))
    assert run["resumed_steps"] == list(range(1, n + 1)), "the second run did not continue from the checkpoint"
    assert [resumed[s] for s in range(k + 1, n + 1)] == [straight[s] for s in range(k + 1, n + 1)]
    assert all(np.isfinite(v) for v in straight.values()) and straight[n] < straight[1]
    final = acceptance.step_dir(run["resumed"], n) / "model"
    assert acceptance.same_weights(acceptance.step_dir(run["straight"], n) / "model", final)
    facts = acceptance.checkpoint_facts(final)
    assert facts["dtypes"] == ["torch.bfloat16"] and facts["finite"], facts
    assert run["optimizer"] == {"masters": ["torch.float32"], "states": ["torch.float32"]}, run["optimizer"]


@pytest.mark.gpu
def test_kv_cache_generation_equals_greedy_full_forwards_on_gpu(gpu_model, gpu_run):
    settings = gpu_run["settings"]
    param = next(gpu_model.parameters())
    assert param.device.type == "cuda" and param.dtype == torch.bfloat16
    prompts = [list(p) for p in settings.prompts]
    cached = acceptance.generate_greedy(gpu_model, prompts, settings.new_tokens)
    reference, gaps = acceptance.greedy_without_cache(gpu_model, prompts, settings.new_tokens)
    assert [len(c) for c in cached] == [settings.new_tokens] * len(prompts)
    assert cached == reference, f"first difference {acceptance.first_mismatch(cached, reference)}; top-2 gaps {gaps}"


@pytest.mark.gpu
def test_one_host_sync_per_generated_token_on_cuda(gpu_model, gpu_run):
    counts = acceptance.count_generation_syncs(gpu_model, gpu_run["settings"])
    assert counts["count"] == counts["steps"] == gpu_run["settings"].new_tokens, counts
    assert counts["kinds"] == {"tolist": counts["steps"]}, counts


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_one_host_sync_per_training_step_on_cuda(gpu_run, precision):
    """fp32 (no ZeRO at DP=1, the trainer's own clipping): exactly the trainer's one read. auto is bf16 on CUDA,
    where DeepSpeed's bf16 optimizer (ZeRO-1) does its own reads of the gradient norm: the trainer's one read is
    asserted, and DeepSpeed's bounded (at most two more), naming their sites when they are not."""
    settings = acceptance.Settings("cuda", **{**SMALL, "precision": precision})
    counts = acceptance.count_training_syncs(gpu_run["root"] / precision, gpu_run["store"], settings)
    assert counts["ours_per_step"] == [1] * settings.sync_steps, counts
    if precision == "fp32":
        assert counts["per_step"] == [1] * settings.sync_steps, counts
    else:  # DeepSpeed's bf16 optimizer reads its overflow flag and gradient norm: at most two more (docs/training.md)
        others = [s for s in counts["sites"] if "megatron_code/training.py" not in s.split(" <- ")[0]]
        assert max(counts["per_step"]) <= 3, f"bf16: {counts['per_step']} host syncs per step; DeepSpeed's at {others}"


# ------------------------------------------------------------------------------------------------------ attention


def _packed_documents(batch: int, length: int) -> np.ndarray:
    """(B, T) document ids: several documents of uneven lengths per row, one whole-row document in the last. The
    first row's first document ends at a 128-position block edge, so flex's (query block 1, key block 0) is empty in
    that row and full in the others: a block mask not built per row fails."""
    rows = [np.repeat(np.arange(4), [128, 37, 64, length - 229])] + [np.zeros(length, dtype=np.int64)] * (batch - 1)
    return np.stack(rows).astype(np.int64)


def _prefix(docs: np.ndarray, width: int = 12) -> torch.Tensor:
    """The first ``width`` positions of every document: a bidirectional prefix."""
    starts = np.ones(docs.shape, dtype=bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    position = np.zeros(docs.shape, dtype=np.int64)
    for b in range(docs.shape[0]):
        for t in range(1, docs.shape[1]):
            position[b, t] = 0 if starts[b, t] else position[b, t - 1] + 1
    return torch.from_numpy(position < width).cuda()


def _attend(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: np.ndarray,
            prefix: torch.Tensor | None, grad: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One backend's output (fp32) and, with ``grad``, the gradients of q, k, v, on a fresh MaskInfo."""
    from megatron_code.attention import BACKENDS, MaskInfo

    leaves = [t.detach().clone().requires_grad_(grad is not None) for t in (q, k, v)]
    mask = MaskInfo.from_documents(docs, "cuda", prefix)
    out = BACKENDS[name](leaves[0], leaves[1], leaves[2], mask, 1.0 / q.shape[-1] ** 0.5, 0.0)
    if grad is None:
        return out.float(), []
    (out.float() * grad).sum().backward()
    return out.float(), [t.grad.float() for t in leaves if t.grad is not None]


def _error(got: tuple[torch.Tensor, list[torch.Tensor]], want: tuple[torch.Tensor, list[torch.Tensor]]) -> list[float]:
    return [float((g - w).detach().abs().max()) for g, w in zip([got[0], *got[1]], [want[0], *want[1]], strict=True)]


# flex in every use; flash only in training without a prefix, the one use attention.can_run gives it
BACKEND_CASES = [("flex", p, c) for p in (False, True) for c in (False, True)] + [("flash", False, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("name,use_prefix,cached", BACKEND_CASES,
                         ids=[f"{n}-{'prefix' if p else 'causal'}-{'kv-cache' if c else 'full'}"
                              for n, p, c in BACKEND_CASES])
def test_attention_backends_agree_on_gpu(name, use_prefix, cached):
    """Each bf16 backend against an fp32 sdpa reference: at most twice bf16 sdpa's own error (flash-attn's tests'
    rule), outputs and, without a cache (training), gradients. flash-attn missing on a GPU machine fails."""
    from megatron_code.attention import flash_available

    if name == "flash" and not flash_available():
        pytest.fail("flash-attn is not installed on this GPU machine: pip install --no-build-isolation '.[gpu]'",
                    pytrace=False)
    torch.manual_seed(0)
    b, h, tk, d = 2, 4, 256, 64
    tq = 64 if cached else tk  # a KV cache: the queries are the last tq of tk, from inside a document's prefix on
    docs = _packed_documents(b, tk)
    prefix = _prefix(docs) if use_prefix else None
    q = torch.randn(b, h, tq, d, device="cuda")
    k, v = (torch.randn(b, h, tk, d, device="cuda") for _ in range(2))
    grad = None if cached else torch.randn(b, h, tq, d, device="cuda")
    reference = _attend("sdpa", q, k, v, docs, prefix, grad)
    lq, lk, lv = (t.bfloat16() for t in (q, k, v))
    bound = [max(2 * e, 1e-2) for e in _error(_attend("sdpa", lq, lk, lv, docs, prefix, grad), reference)]
    errors = _error(_attend(name, lq, lk, lv, docs, prefix, grad), reference)
    assert all(e <= m for e, m in zip(errors, bound, strict=True)), (name, errors, bound)


# ----------------------------------------------------------------------------------------------- fused elementwise


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_elementwise_equals_the_plain_path_on_cuda(dtype):
    from megatron_code.fused import bias_dropout_add, bias_fast_gelu, compiled

    torch.manual_seed(0)
    tol: dict[str, Any] = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    x, r = (torch.randn(3, 5, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    bias = torch.randn(64, device="cuda", dtype=dtype, requires_grad=True)
    for name, plain, args in (("bias_fast_gelu", bias_fast_gelu, (x, bias)),
                              ("bias_dropout_add", bias_dropout_add, (x, bias, r, 0.0, True))):
        tensors = [a for a in args if torch.is_tensor(a)]
        want = plain(*args)
        want_grads = torch.autograd.grad(want.float().square().sum(), tensors)
        got = compiled(name)(*args)
        got_grads = torch.autograd.grad(got.float().square().sum(), tensors)
        assert got.device.type == "cuda" and got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, **tol)
    ones = torch.ones(200_000, device="cuda", dtype=dtype)
    zero = torch.zeros(1, device="cuda", dtype=dtype)
    out = compiled("bias_dropout_add")(ones, zero, zero, 0.25, True)
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.75) < 0.01
    torch.testing.assert_close(out[kept].float(), torch.full_like(out[kept].float(), 1 / 0.75), **tol)


# ------------------------------------------------------------------------------------------- the script, on a CPU


@pytest.mark.slow
def test_the_acceptance_script_runs_its_cpu_smoke(tmp_path):
    report = tmp_path / "report.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_acceptance.py", "--cpu-smoke", "--out", str(report)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    names = ["a. training + exact resume", "b. KV-cache generation = no-cache greedy",
             "c. host syncs (1 per step, 1 per token)", "d. 4 layers of 13B shape, seq 2048, bf16"]
    for name in names:
        assert f"| {name} |" in proc.stdout, proc.stdout
    checks = json.loads(report.read_text())["checks"]
    assert [(c["name"], c["status"]) for c in checks] == list(zip(names, ["PASS", "PASS", "PASS", "skipped"],
                                                                      strict=True))


@pytest.mark.gpu
def test_eval_generate_loads_onto_the_gpu_in_bf16(gpu_run, tokenizer_model):
    """`eval generate`'s native backend on a GPU: the checkpoint on this rank's device in bfloat16 (dtype auto);
    greedy completions do not depend on the batch's seeds, and every one is cut by its stop rule."""
    from eval_harness.backends import NativeGenerator
    from eval_harness.gen_config import GenerateConfig
    from eval_harness.generate import make_tasks
    from eval_harness.stops import truncate
    from tests.conftest import shared_path

    run, settings = gpu_run["run"], gpu_run["settings"]
    model_dir = acceptance.step_dir(run["straight"], settings.train_steps) / "model"
    cfg = GenerateConfig(data=str(shared_path("humaneval-x")), languages="python,cpp", problems=2, greedy=True,
                         max_new_tokens=16, tokenizer=tokenizer_model)
    tasks, problems = make_tasks(cfg)
    gen = NativeGenerator(cfg, model_dir, problems)
    p = next(gen.model.parameters())
    assert p.device.type == "cuda" and p.dtype == torch.bfloat16
    first = gen.complete(tasks, list(range(len(tasks))), None)
    assert first == gen.complete(tasks, [7] * len(tasks), None)
    assert all(truncate(t.language, t.prompt, c)[0] == c for t, c in zip(tasks, first, strict=True))
