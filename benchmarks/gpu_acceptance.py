"""GPU acceptance of the training path (issue 14, point 10): one script, under 8 minutes on one H100 or H200.

Each check is a row of the Markdown report printed at the end (and written as JSON with ``--out``):

a. training of the tiny preset (configs/model/tiny.yaml) through the real trainer (``megatron_code.training.train``,
   TP=1, ZeRO-1, precision ``auto``: bf16 on CUDA) over a synthetic token store, checkpoint every 10 steps: 20 steps
   straight, then 10 steps and a resume to 20 from the step-10 checkpoint. Losses of steps 11-20 must be
   bit-identical and so must the final weights; the checkpoint's parameters finite and bf16, the optimizer's master
   weights and Adam state fp32.
b. greedy generation with the KV cache (``megatron_code.generation.generate``) from that checkpoint
   (``megatron_code.checkpoint.load_model``, which builds the model on the parallel context's device) must equal,
   token for token, the greedy continuation of repeated full forwards of the same model with no cache reused:
   2 prompts x 16 tokens.
c. host syncs (``tests.device_audit.HostSyncCounter``) around each training step and around generation: target 1 per
   step and 1 per token (the trainer's own read is told apart from DeepSpeed's); on a GPU also the step and token
   times, with ``torch.cuda.synchronize`` around them.
d. four 13B-shaped layers (codegeex-13b with num_layers=4, no top-query layer, dropout 0) in bf16 at sequence 2048,
   attention ``flash`` if flash_attn imports, else ``flex``: 3 warm-up and 10 timed forward+backward steps with the
   vocab-parallel loss and no optimizer. Tokens/s, TFLOP/s (``megatron_code.flops.flops_per_token``, Megatron's
   full-square convention), MFU against 989 TFLOP/s (dense bf16 of an H100 SXM; NVIDIA quotes the same for the
   H200), target 0.45; peak memory against ``megatron_code.flops.memory_per_rank``'s parameters + gradients +
   activations (this part runs no optimizer, so Adam's states are left out).

Usage, from the repository root:

    python benchmarks/gpu_acceptance.py [--out report.json] [--batch 4] [--workdir DIR] [-v]
    python benchmarks/gpu_acceptance.py --cpu-smoke     # a-c on the CPU in fp32 at tiny sizes, d skipped (< 2 min)

Exit code 0 when every check passes, 1 when one fails, 2 without CUDA (unless --cpu-smoke). What the libraries print
goes to stderr; the report alone to stdout.

The GPU machine (Python 3.12, torch 2.11 with CUDA, Triton) needs, beyond what its image holds: megatron-core
0.16.1, deepspeed 0.19.8 (PyPI has only its sdist: build the pure-Python wheel here with
``pip wheel --no-deps --no-build-isolation deepspeed==0.19.8``) and DeepSpeed's hjson, pydantic, pydantic-core,
annotated-types and typing-inspection. flash-attn is optional (PyPI has no wheel of it; without it d runs flex).
README.md, "On a GPU machine", gives the commands.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

if __package__ in (None, ""):  # run as a file: the repository root is not on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import load_config  # noqa: E402
from megatron_code.config import PRESET_DIR  # noqa: E402

log = logging.getLogger("gpu_acceptance")

PEAK_TFLOPS = 989.0  # dense bf16, H100 SXM (the H200 has the same tensor cores and clocks)
MFU_TARGET = 0.45
SYNC_TARGET = 1


@dataclass
class Settings:
    """Sizes of one acceptance run (the GPU's, the CPU smoke's, or a test's)."""

    device: str  # "cuda" or "cpu"
    seq_len: int = 256
    train_steps: int = 20
    resume_from: int = 10
    sync_steps: int = 3
    prompts: tuple[tuple[int, ...], ...] = ((5, 9, 17, 5, 9, 17, 5, 9, 17, 5, 9), (33, 40, 71, 88, 33, 40, 71))
    new_tokens: int = 16
    precision: str = "auto"

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


@dataclass
class Check:
    """One row of the report."""

    name: str
    passed: bool | None  # None: skipped
    summary: str
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return {True: "PASS", False: "FAIL", None: "skipped"}[self.passed]


# ---------------------------------------------------------------------------------------------------------- helpers


def sync(settings: Settings) -> None:
    if settings.cuda:
        torch.cuda.synchronize()


def tiny_model() -> dict[str, Any]:
    """The tiny preset's keys, as written in configs/model/tiny.yaml."""
    return dict(yaml.safe_load((PRESET_DIR / "tiny.yaml").read_text()))


def make_store(root: Path, settings: Settings) -> str:
    from tests.model_utils import synthetic_store

    return synthetic_store(root / "store", windows=96, seq_len=settings.seq_len)


def train_values(store: str, run_dir: Path, settings: Settings, steps: int) -> dict[str, Any]:
    """A TrainConfig's values (tests.train_utils.values) for the tiny preset; the schedule does not depend on
    ``steps``, so a shorter run is the prefix of a longer one."""
    from tests.train_utils import values

    warmup = 2
    return values(store, str(run_dir), model=tiny_model(), train_steps=steps,
                  optim__warmup_steps=warmup, optim__decay_steps=settings.train_steps - warmup,
                  checkpoint__interval=settings.resume_from, checkpoint__keep=4,
                  precision={"dtype": settings.precision})


@dataclass
class Probe:
    """What the trainer's patched ``build`` and ``train_step`` saw during one run."""

    engine: Any = None
    model: Any = None
    step_seconds: list[float] = field(default_factory=list)
    syncs: list[list[tuple[str, str]]] = field(default_factory=list)  # per step: (kind, site)


@contextlib.contextmanager
def probed_trainer(settings: Settings, count_syncs: bool) -> Iterator[Probe]:
    """Patch megatron_code.training so a run records its engine, each step's time (synchronised on a GPU, outside
    the counter) and, when ``count_syncs``, each step's host syncs."""
    import megatron_code.training as training
    from tests.device_audit import HostSyncCounter

    probe = Probe()
    real_build, real_step = training.build, training.train_step

    def build(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        pc, model, engine, sampler = real_build(cfg, *args, **kwargs)
        probe.engine, probe.model = engine, model
        return pc, model, engine, sampler

    def step(*args: Any, **kwargs: Any) -> Any:
        sync(settings)
        start = time.perf_counter()
        counter = HostSyncCounter() if count_syncs else contextlib.nullcontext()
        with counter:
            result = real_step(*args, **kwargs)
        sync(settings)
        probe.step_seconds.append(time.perf_counter() - start)
        if count_syncs:
            probe.syncs.append(list(counter.events))  # type: ignore[union-attr]
        return result

    training.build, training.train_step = build, step
    try:
        yield probe
    finally:
        training.build, training.train_step = real_build, real_step


def run_training(values: dict[str, Any], settings: Settings, count_syncs: bool = False) -> Probe:
    from megatron_code.train_config import TrainConfig
    from megatron_code.training import train

    with probed_trainer(settings, count_syncs) as probe:
        train(load_config(TrainConfig, values=copy.deepcopy(values)), ["benchmarks/gpu_acceptance.py"])
    return probe


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a resumed run appends; the later line of a step wins)."""
    from tests.train_utils import metrics

    return {r["step"]: r["loss"] for r in metrics(str(run_dir))}


def logged_steps(run_dir: Path) -> list[int]:
    """The steps of metrics.jsonl in order: a real resume continues the list, a fresh start would repeat it."""
    from tests.train_utils import metrics

    return [r["step"] for r in metrics(str(run_dir))]


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def optimizer_dtypes(engine: Any) -> dict[str, list[str]]:
    """The dtypes of the weights the optimizer updates (DeepSpeed's fp32 partitions or groups) and of its Adam state
    (also tests/test_gpu_path.py's check of every ZeRO stage)."""
    opt = engine.optimizer
    masters: set[str] = set()
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat",
                 "fp32_groups_flat", "fp32_groups"):
        for t in getattr(opt, attr, None) or []:
            for leaf in t if isinstance(t, list) else [t]:
                if torch.is_tensor(leaf):
                    masters.add(str(leaf.dtype))
    inner = getattr(opt, "optimizer", opt)
    for group in inner.param_groups:
        masters |= {str(p.dtype) for p in group["params"]}
    states = {str(t.dtype) for st in inner.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0}
    return {"masters": sorted(masters), "states": sorted(states)}


# ------------------------------------------------------------------------------------------ a. training and resume


def train_and_resume(root: Path, store: str, settings: Settings) -> dict[str, Any]:
    """The straight run and the stopped-and-resumed one; what check a (and the tests) look at."""
    n, k = settings.train_steps, settings.resume_from
    straight, resumed = root / "straight", root / "resumed"
    first = run_training(train_values(store, straight, settings, n), settings)
    run_training(train_values(store, resumed, settings, k), settings)
    again = run_training(train_values(store, resumed, settings, n), settings)  # resume: auto, from step k
    return {"straight": straight, "resumed": resumed, "straight_losses": losses(straight),
            "resumed_losses": losses(resumed), "resumed_steps": logged_steps(resumed),
            "step_seconds": first.step_seconds, "optimizer": optimizer_dtypes(again.engine), "resumed_from": k}


def checkpoint_facts(model_dir: Path) -> dict[str, Any]:
    """Dtypes of a checkpoint's parameters and whether all are finite."""
    from megatron_code.checkpoint import full_state

    _, state = full_state(model_dir)
    return {"dtypes": sorted({str(t.dtype) for t in state.values()}),
            "finite": all(bool(torch.isfinite(t.float()).all()) for t in state.values()), "tensors": len(state)}


def same_weights(a: Path, b: Path) -> bool:
    from megatron_code.checkpoint import full_state

    wa, wb = full_state(a)[1], full_state(b)[1]
    return wa.keys() == wb.keys() and all(torch.equal(wa[key], wb[key]) for key in wa)


def check_training(run: dict[str, Any], settings: Settings) -> Check:
    n, k = settings.train_steps, settings.resume_from
    bf16 = settings.precision == "bf16" or (settings.precision == "auto" and settings.cuda)  # auto: bf16 on CUDA
    want = "torch.bfloat16" if bf16 else "torch.float32"
    a, b = run["straight_losses"], run["resumed_losses"]
    tail = list(range(k + 1, n + 1))
    differ = [s for s in tail if a.get(s) != b.get(s)]
    continued = run["resumed_steps"] == list(range(1, n + 1))  # the second run started at step k + 1
    ckpt = checkpoint_facts(step_dir(run["resumed"], n) / "model")
    weights = same_weights(step_dir(run["straight"], n) / "model", step_dir(run["resumed"], n) / "model")
    opt = run["optimizer"]
    ok = (continued and not differ and weights and ckpt["finite"] and ckpt["dtypes"] == [want]
          and opt["masters"] == ["torch.float32"] and opt["states"] == ["torch.float32"])
    summary = (f"{n} steps straight vs {k} + resume to {n} ({'continued at' if continued else 'DID NOT resume at'} "
               f"step {k + 1}): losses of steps {k + 1}-{n} "
               f"{'bit-identical' if not differ else f'differ at steps {differ}'}, final weights "
               f"{'identical' if weights else 'DIFFER'}; checkpoint parameters {'/'.join(ckpt['dtypes'])} "
               f"({'finite' if ckpt['finite'] else 'NOT finite'}, want {want}); optimizer masters "
               f"{'/'.join(opt['masters'])}, Adam state {'/'.join(opt['states']) or 'none'} (want fp32); "
               f"loss {a[1]:.4f} -> {a[n]:.4f}")
    return Check("a. training + exact resume", ok, summary,
                 {"straight_losses": a, "resumed_losses": b, "resumed_steps": run["resumed_steps"],
                  "differing_steps": differ, "weights_equal": weights,
                  "checkpoint": ckpt, "optimizer": opt, "expected_param_dtype": want})


# ------------------------------------------------------------------------------------------------- b. generation


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Tokens, segments and positions laid out as generate() lays them: left padding, segment -1, position 0."""
    longest = max(len(p) for p in prompts)
    tokens = [[pad_id] * (longest - len(p)) + list(p) for p in prompts]
    segments = [[-1] * (longest - len(p)) + [0] * len(p) for p in prompts]
    positions = [[0] * (longest - len(p)) + list(range(len(p))) for p in prompts]
    return tokens, segments, positions


@torch.no_grad()
def greedy_without_cache(model: Any, prompts: list[list[int]], new_tokens: int,
                         pad_id: int = 0) -> tuple[list[list[int]], list[float]]:
    """Greedy tokens from a full forward over prompt + tokens so far at every step, nothing cached between steps
    (an empty cache each time: the attention backend is the one generation's first step uses). Also returns each
    step's smallest gap between the best and second-best logit (a near tie explains a mismatch)."""
    from megatron_code.attention import MaskInfo

    model.eval()
    device = next(model.parameters()).device
    tokens, segments, positions = left_padded(prompts, pad_id)
    out: list[list[int]] = [[] for _ in prompts]
    gaps: list[float] = []
    for _ in range(new_tokens):
        t, s, p = (torch.tensor(x, dtype=torch.long, device=device) for x in (tokens, segments, positions))
        logits, _ = model(t, p, MaskInfo(s), model.new_cache(*t.shape))  # (B, T, V), a fresh cache each step
        last = logits[:, -1].float()
        top = last.topk(2, dim=-1).values
        gaps.append(float((top[:, 0] - top[:, 1]).min()))
        for i, tok in enumerate(last.argmax(dim=-1).tolist()):
            out[i].append(tok)
            tokens[i].append(tok)
            segments[i].append(0)
            positions[i].append(positions[i][-1] + 1)
    return out, gaps


def load_for_generation(model_dir: Path) -> Any:
    from megatron_code.checkpoint import load_model
    from megatron_code.parallel import single_context

    return load_model(model_dir, single_context())


def generate_greedy(model: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from megatron_code.generation import SamplingConfig, generate

    return generate(model, prompts, SamplingConfig(max_new_tokens=new_tokens, greedy=True), pad_id=0)


def first_mismatch(a: list[list[int]], b: list[list[int]]) -> tuple[int, int] | None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        for j, (u, v) in enumerate(zip(x, y, strict=False)):
            if u != v:
                return i, j
        if len(x) != len(y):
            return i, min(len(x), len(y))
    return None


def check_generation(model: Any, settings: Settings) -> Check:
    prompts = [list(p) for p in settings.prompts]
    cached = generate_greedy(model, prompts, settings.new_tokens)
    reference, gaps = greedy_without_cache(model, prompts, settings.new_tokens)
    where = first_mismatch(cached, reference)
    device = str(next(model.parameters()).device)
    dtype = str(next(model.parameters()).dtype)
    detail = "token for token" if where is None else (
        f"first difference: prompt {where[0]}, token {where[1]} (reference's top-2 logit gap there "
        f"{gaps[where[1]]:.3g})")
    summary = (f"{len(prompts)} prompts x {settings.new_tokens} tokens, model on {device} in {dtype}: KV cache "
               f"{'equals' if where is None else 'DIFFERS from'} full forwards without cache, {detail}; "
               f"smallest top-2 gap {min(gaps):.3g}")
    return Check("b. KV-cache generation = no-cache greedy", where is None, summary,
                 {"cached": cached, "reference": reference, "top2_gaps": gaps, "device": device, "dtype": dtype})


# ------------------------------------------------------------------------------------------------------ c. syncs


def ours(events: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The syncs whose innermost site outside torch is this project's (not DeepSpeed's or megatron-core's)."""
    return [(kind, where) for kind, where in events if where.split(" <- ", 1)[0].startswith("megatron_code")]


def count_training_syncs(root: Path, store: str, settings: Settings) -> dict[str, Any]:
    probe = run_training(train_values(store, root / "syncs", settings, settings.sync_steps), settings,
                         count_syncs=True)
    sites = sorted({f"{kind} at {where}" for step in probe.syncs for kind, where in step})
    return {"per_step": [len(s) for s in probe.syncs], "ours_per_step": [len(ours(s)) for s in probe.syncs],
            "sites": sites}


def count_generation_syncs(model: Any, settings: Settings) -> dict[str, Any]:
    from tests.device_audit import HostSyncCounter

    prompts = [list(p) for p in settings.prompts]
    with HostSyncCounter() as counter:
        out = generate_greedy(model, prompts, settings.new_tokens)
    tokens = max(len(o) for o in out)  # generation steps: every prompt gets one token per step
    sync(settings)
    start = time.perf_counter()
    generate_greedy(model, prompts, settings.new_tokens)  # timed apart from the counter
    sync(settings)
    seconds = time.perf_counter() - start
    return {"count": counter.count, "steps": tokens, "kinds": dict(counter.by_kind()),
            "sites": sorted(counter.by_site()), "ms_per_token": seconds / max(tokens, 1) * 1e3}


def check_syncs(train: dict[str, Any], gen: dict[str, Any], step_seconds: list[float], settings: Settings) -> Check:
    per_token = gen["count"] / max(gen["steps"], 1)
    trainer_ok = all(n == SYNC_TARGET for n in train["ours_per_step"])
    ok = trainer_ok and all(n == SYNC_TARGET for n in train["per_step"]) and per_token == SYNC_TARGET
    timed = step_seconds[1:] or step_seconds  # the first step compiles
    extra = sorted(s for s in train["sites"] if not s.split(" at ", 1)[1].startswith("megatron_code"))
    summary = (f"per training step {train['per_step']} (the trainer's own: {train['ours_per_step']}), per generated "
               f"token {per_token:g} ({gen['count']} over {gen['steps']} steps, {gen['kinds']}); target "
               f"{SYNC_TARGET} and {SYNC_TARGET}. Tiny preset: {statistics.median(timed) * 1e3:.1f} ms/step, "
               f"{gen['ms_per_token']:.1f} ms/token{' (torch.cuda.synchronize around each)' if settings.cuda else ''}")
    if extra:
        summary += "; other syncs at: " + "; ".join(extra)
    return Check("c. host syncs (1 per step, 1 per token)", ok, summary,
                 {"training": train, "generation": gen, "median_step_ms": statistics.median(timed) * 1e3})


# --------------------------------------------------------------------------------------- d. 13B-shaped throughput


def big_config(backend: str) -> Any:
    from megatron_code.config import load_preset

    return load_preset("codegeex-13b", ["num_layers=4", "top_query_layer=false", "hidden_dropout=0",
                                        "attention_dropout=0", "params_dtype=bfloat16",
                                        f"attention_backend={backend}"])


def predicted_memory(cfg: Any, batch: int, seq: int) -> dict[str, float]:
    from megatron_code.flops import memory_per_rank

    est = memory_per_rank(cfg, tp=1, dp=1, zero_stage=0, micro_batch=batch, seq_len=seq, precision="bfloat16")
    return {"parameters": est.parameters, "gradients": est.gradients, "activations": est.activations,
            "transient": est.transient, "predicted": est.parameters + est.gradients + est.activations}


def pick_batch(cfg: Any, want: int, seq: int) -> int:
    """``want``, halved while the planner's estimate passes 80% of the GPU's memory."""
    total = torch.cuda.get_device_properties(0).total_memory
    batch = want
    while batch > 1:
        mem = predicted_memory(cfg, batch, seq)
        if mem["predicted"] + mem["transient"] < 0.8 * total:
            break
        batch //= 2
    return batch


def timed_steps(step: Callable[[], None], warmup: int, steps: int) -> float:
    """Seconds for ``steps`` calls after ``warmup`` (the peak-memory counter restarts after the warm-up)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def big_model_step(cfg: Any, batch: int, seq: int) -> tuple[Callable[[], None], Any]:
    """One forward + backward of the vocab-parallel loss on random tokens, one document per row; gradients stay
    allocated between steps (as the planner counts them)."""
    from megatron_code.attention import MaskInfo
    from megatron_code.model import CodeGeeXModel
    from megatron_code.objectives import vocab_parallel_cross_entropy
    from megatron_code.parallel import single_context

    pc = single_context()
    torch.manual_seed(0)
    model = CodeGeeXModel(cfg, pc)  # built, and initialised, on pc.device
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=pc.device)
    pos = torch.arange(seq, device=pc.device).repeat(batch, 1)
    docs = np.zeros((batch, seq), dtype=np.int64)

    def step() -> None:
        model.zero_grad(set_to_none=False)
        mask = MaskInfo.from_documents(docs, pc.device)  # per batch, from the host, as the trainer builds it
        logits, _ = model(tokens[:, :-1], pos, mask)
        vocab_parallel_cross_entropy(logits, tokens[:, 1:], pc).mean().backward()

    return step, model


def check_throughput(want_batch: int, warmup: int = 3, steps: int = 10, seq: int = 2048) -> Check:
    from megatron_code.attention import flash_available
    from megatron_code.flops import flops_per_token

    backend = "flash" if flash_available() else "flex"
    cfg = big_config(backend)
    batch = pick_batch(cfg, want_batch, seq)
    step, _model = big_model_step(cfg, batch, seq)
    seconds = timed_steps(step, warmup, steps)
    peak = torch.cuda.max_memory_allocated()
    tokens = batch * seq * steps
    tflops = flops_per_token(cfg, seq) * tokens / seconds / 1e12
    mem = predicted_memory(cfg, batch, seq)
    v: dict[str, Any] = {
        "backend": backend, "batch": batch, "seq_len": seq, "warmup": warmup, "steps": steps, "seconds": seconds,
        "tokens_per_s": tokens / seconds, "tflops": tflops, "mfu": tflops / PEAK_TFLOPS, "peak_tflops": PEAK_TFLOPS,
        "tflops_causal": flops_per_token(cfg, seq, convention="causal") * tokens / seconds / 1e12,
        "peak_memory_bytes": peak, "planned": mem, "memory_ratio": peak / mem["predicted"]}
    return Check("d. 4 layers of 13B shape, seq 2048, bf16", v["mfu"] >= MFU_TARGET, throughput_summary(v), v)


def throughput_summary(v: dict[str, Any]) -> str:
    mem, gib = v["planned"], 2.0**30
    why = "" if v["backend"] == "flash" else " (flash_attn not importable)"
    below = "" if v["mfu"] >= MFU_TARGET else ": BELOW TARGET"
    return (f"attention {v['backend']}{why}, batch {v['batch']} x {v['seq_len']}, bf16, {v['warmup']} warm-up + "
            f"{v['steps']} timed fwd+bwd, no optimizer: {v['tokens_per_s']:,.0f} tokens/s, {v['tflops']:.1f} TFLOP/s "
            f"(Megatron's full square; {v['tflops_causal']:.1f} counting causal pairs), MFU {v['mfu']:.1%} of "
            f"{PEAK_TFLOPS:.0f} TFLOP/s (H100 dense bf16), target {MFU_TARGET:.0%}{below}; peak memory "
            f"{v['peak_memory_bytes'] / gib:.2f} GiB vs planned {mem['predicted'] / gib:.2f} GiB (parameters "
            f"{mem['parameters'] / gib:.2f} + gradients {mem['gradients'] / gib:.2f} + activations "
            f"{mem['activations'] / gib:.2f}; no optimizer state): ratio {v['memory_ratio']:.2f} "
            f"({v['peak_memory_bytes'] / (mem['predicted'] + mem['transient']):.2f} counting the planner's transient "
            f"logits, {mem['transient'] / gib:.2f} GiB)")


# ---------------------------------------------------------------------------------------------------------- report


def environment(settings: Settings) -> dict[str, Any]:
    from common.revision import git_revision
    from megatron_code.attention import resolve_backends

    try:
        import flash_attn

        flash = str(flash_attn.__version__)
    except ImportError:
        flash = "not installed"
    dev = torch.device(settings.device)
    return {"device": torch.cuda.get_device_name() if settings.cuda else f"CPU ({platform.machine()})",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "flash_attn": flash, "backends": resolve_backends("auto", dev, 0.0), "git": git_revision(),
            "precision": settings.precision}


def markdown(env: dict[str, Any], checks: list[Check], seconds: float) -> str:
    lines = ["# GPU acceptance", "",
             f"{env['device']}, torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']}, flash-attn "
             f"{env['flash_attn']}, attention per use {env['backends']}, revision {env['git'][:12]}, "
             f"{seconds:.0f} s", "", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c.name} | {c.status} | {c.summary} |" for c in checks]
    failed = [c.name for c in checks if c.passed is False]
    lines += ["", f"**{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}**"]
    return "\n".join(lines)


def guarded(name: str, fn: Callable[[], Check]) -> Check:
    """A check that raised is a failed row naming the exception (the rest still run)."""
    try:
        return fn()
    except Exception as exc:  # the report must come out whatever broke
        log.error("%s raised:\n%s", name, traceback.format_exc())
        return Check(name, False, f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def run_checks(settings: Settings, root: Path, batch: int) -> list[Check]:
    """d first on a GPU (while nothing else has compiled; its timing is then the cleanest), then a-c."""
    big = guarded("d. 4 layers of 13B shape, seq 2048, bf16", lambda: check_throughput(batch)) if settings.cuda else (
        Check("d. 4 layers of 13B shape, seq 2048, bf16", None, "skipped: --cpu-smoke (needs a GPU)"))
    store = make_store(root, settings)
    state: dict[str, Any] = {}

    def a() -> Check:
        state["run"] = train_and_resume(root, store, settings)
        return check_training(state["run"], settings)

    def b() -> Check:
        state["model"] = load_for_generation(step_dir(state["run"]["straight"], settings.train_steps) / "model")
        return check_generation(state["model"], settings)

    def c() -> Check:
        train = count_training_syncs(root, store, settings)
        gen = count_generation_syncs(state["model"], settings)
        return check_syncs(train, gen, state["run"]["step_seconds"], settings)

    checks = [guarded("a. training + exact resume", a)]
    checks.append(guarded("b. KV-cache generation = no-cache greedy", b) if "run" in state else
                  Check("b. KV-cache generation = no-cache greedy", False, "not run: a produced no checkpoint"))
    checks.append(guarded("c. host syncs (1 per step, 1 per token)", c) if "model" in state else
                  Check("c. host syncs (1 per step, 1 per token)", False, "not run: b loaded no model"))
    return checks + [big]


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="parts a-c on the CPU, fp32, tiny sizes; d skipped")
    ap.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    ap.add_argument("--batch", type=int, default=4, help="d's batch (halved until the planner says it fits)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="a-c's training precision")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    ap.add_argument("-v", "--verbose", action="store_true", help="the trainer's and DeepSpeed's logs on stderr")
    return ap.parse_args()


def quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    import deepspeed.utils

    deepspeed.utils.logger.setLevel(logging.INFO if verbose else logging.WARNING)
    # the fused kernels compile once per shape (dynamic=False) and b's reference runs 16 lengths: past the limit
    # (8) dynamo would run the rest eagerly, with other roundings than the compiled kernels generation uses
    dynamo = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, name, max(getattr(dynamo, name), 64))


def main() -> int:
    args = arguments()
    if args.cpu_smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run on a GPU machine too (nothing has touched CUDA yet)
    elif not torch.cuda.is_available():
        print("no CUDA device here: run with --cpu-smoke, or on the GPU machine", file=sys.stderr)
        return 2
    settings = Settings("cpu", seq_len=32, precision=args.precision) if args.cpu_smoke else Settings(
        "cuda", precision=args.precision)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        root = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-acceptance-")))
        root.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints; the report alone goes to stdout
            quiet_libraries(args.verbose)
            env = environment(settings)
            checks = run_checks(settings, root, args.batch)
    seconds = time.perf_counter() - start
    print(markdown(env, checks, seconds))
    if args.out:
        report = {"environment": env, "seconds": seconds, "passed": all(c.passed is not False for c in checks),
                  "checks": [asdict(c) | {"status": c.status} for c in checks]}
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0 if all(c.passed is not False for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
