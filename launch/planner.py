"""The parallelism planner: every TP x PP x DP x ZeRO x micro-batch x activation-checkpointing choice for a model on
N devices, with memory per device, whether it fits, whether the trainer runs it, predicted step time, MFU and
communication volume. docs/parallelism.md has the formulas with a worked example.

The model of a step (all per device; m micro-batches of b sequences of s tokens per pipeline, w bytes a value):

- memory: :func:`megatron_code.flops.memory_per_rank` for the stage holding the most parameters (the embedding
  stage; layers divided by PP), activations for the whole depth (1F1B keeps PP micro-batches of L/PP layers in
  flight on the first stage), plus ``reserve_gib`` for the CUDA context, communication buffers and fragmentation.
- compute: model FLOPs (Megatron's convention) plus recomputation (full: one more forward; selective: the attention
  core again) at ``efficiency`` x peak; the pipeline bubble adds ``(PP-1)/m`` of it.
- tensor parallelism: per layer and micro-batch 2 all-reduces of ``b s h w`` bytes in forward and 2 in backward
  (2 more with full recomputation), ring cost ``2 (t-1)/t``, over NVLink when the group fits in a node (else the
  network), all exposed: the trainer waits for each before the next matmul.
- data parallelism, of the stage's parameter bytes per TP rank ``P``, ring cost ``(d-1)/d`` per reduce-scatter or
  all-gather, over NVLink when the DP group (``t d`` consecutive ranks) fits in a node, else the network; what the
  trainer's DeepSpeed does, and what hides (a collective overlapping a compute phase is hidden up to its length, the
  excess exposed):
  ZeRO 0 all-reduces gradients after the last backward, ZeRO 1 reduce-scatters them and all-gathers the updated
  parameters (bf16: DeepSpeed's bf16 optimizer all-reduces fp32 gradients, then gathers), both exposed (the trainer
  turns ``overlap_comm`` on for ZeRO 2/3 only); ZeRO 2 reduce-scatters every micro-batch's gradients during its
  backward (hidden up to the backward's length) and all-gathers the parameters after the step (exposed); ZeRO 3
  gathers parameters for forward and again for backward and reduce-scatters gradients, every micro-batch, prefetched
  (hidden up to the micro-batch's compute).
- pipeline: one activation and one gradient of ``b s h`` per micro-batch and stage boundary, exposed.
- the trainer has no pipeline parallelism: PP > 1 rows are priced, marked (``runs: no``) and ranked after every row
  it can run.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass

from common.devices import Device
from megatron_code.config import ModelConfig
from megatron_code.flops import BYTES, activation_bytes, flops_per_token, memory_per_rank

GIB = 2**30


@dataclass
class PlanRequest:
    model: ModelConfig
    gpus: int
    device: Device
    global_batch: int
    seq_len: int
    precision: str = "bfloat16"
    efficiency: float = 0.5
    reserve_gib: float = 3.0
    max_pp: int = 8
    sequence_parallel: bool = True  # with TP > 1: LayerNorm/dropout/residual activations divided by TP too


NO_PIPELINE = "PP>1: no pipeline parallelism in the trainer"


@dataclass
class Choice:
    """One layout and its prediction; times are seconds per optimizer step on one device."""

    tp: int
    pp: int
    dp: int
    zero: int
    micro_batch: int
    recompute: str
    memory: dict[str, float] = dataclasses.field(default_factory=dict)  # GiB by part
    step_s: float = 0.0  # compute + bubble + tp + pp + dp_exposed
    mfu: float = 0.0  # model FLOPs / (step_s x devices x peak)
    comm_gb: float = 0.0  # bytes each device sends per step, TP + PP + DP
    compute_s: float = 0.0  # model FLOPs + recomputation at efficiency x peak
    bubble_s: float = 0.0  # pipeline fill and drain: compute x (PP-1)/micro-batches
    tp_s: float = 0.0  # tensor-parallel all-reduces, all exposed
    pp_s: float = 0.0  # activations and gradients between stages, exposed
    dp_s: float = 0.0  # data-parallel traffic (ZeRO's reduce-scatters and all-gathers, or all-reduces)
    dp_exposed_s: float = 0.0  # the part of dp_s not hidden behind compute
    problem: str = ""  # why it does not fit or cannot work ('' when it fits)
    not_run: str = ""  # why the trainer cannot run it ('' when it can)

    @property
    def fits(self) -> bool:
        return not self.problem

    @property
    def runs(self) -> bool:
        return not self.not_run

    @property
    def key(self) -> tuple[int, int, int, int, int, str]:
        return (self.tp, self.pp, self.dp, self.zero, self.micro_batch, self.recompute)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def structural_problem(req: PlanRequest, tp: int, pp: int, mb: int) -> str:
    """Why a (TP, PP, micro-batch) cannot work at all, or ''."""
    m = req.model
    if tp > req.device.per_node:
        return f"TP ({tp}) spans nodes of {req.device.per_node} devices"
    for name, value in (("num_attention_heads", m.num_attention_heads), ("ffn_hidden_size", m.ffn_hidden_size),
                        ("vocab_size", m.vocab_size)):
        if value % tp:
            return f"{name} ({value}) is not a multiple of TP ({tp})"
    if req.gpus % (tp * pp):
        return f"{req.gpus} devices are not a multiple of TP x PP ({tp * pp})"
    if m.total_layers % pp:
        return f"{m.total_layers} layers are not a multiple of PP ({pp})"
    dp = req.gpus // (tp * pp)
    if req.global_batch % (mb * dp):
        return f"global batch ({req.global_batch}) is not a multiple of micro-batch ({mb}) x DP ({dp})"
    return ""


def memory_gib(req: PlanRequest, tp: int, pp: int, dp: int, zero: int, mb: int, recompute: str) -> dict[str, float]:
    stage = dataclasses.replace(req.model, num_layers=req.model.total_layers // pp - int(req.model.top_query_layer))
    sp = req.sequence_parallel and tp > 1
    est = memory_per_rank(stage, tp, dp, zero, mb, req.seq_len, req.precision, recompute, sp)
    act = activation_bytes(req.model, tp, mb, req.seq_len, BYTES[req.precision], recompute, sp)
    # ZeRO-3 gathers a layer's parameters before use and prefetches the next: two layers' worth in full
    gathered = 2 * (4 * stage.hidden_size**2 + 2 * stage.hidden_size * stage.ffn_hidden_size) / tp * BYTES[req.precision]
    parts = {"parameters": est.parameters + (gathered if zero == 3 else 0.0), "gradients": est.gradients,
             "optimizer": est.optimizer, "activations": act, "transient": est.transient}
    out = {k: v / GIB for k, v in parts.items()}
    out["reserve"] = req.reserve_gib
    out["total"] = sum(out.values())
    return out


def ring(n: int) -> float:
    """Bytes a ring all-reduce sends per device, per byte reduced: ``2 (n-1)/n`` (a reduce-scatter or an all-gather
    alone: half of it)."""
    return 2 * (n - 1) / n


def _link(dev: Device, ranks_spanned: int) -> float:
    """Bytes/s of a collective over ``ranks_spanned`` consecutive ranks: NVLink inside a node, else the network."""
    return (dev.intra_node_gbps if ranks_spanned <= dev.per_node else dev.inter_node_gbps) * 1e9


def _dp_traffic(req: PlanRequest, c: Choice, micro: int, compute_mb: float, backward_mb: float) -> tuple[float, float]:
    """(DP bytes sent per device per step, seconds of it exposed), as DeepSpeed runs it in this trainer: overlap_comm
    on for ZeRO 2/3 only; bf16 with ZeRO-1 is DeepSpeed's bf16 optimizer, which all-reduces fp32 gradients."""
    if c.dp == 1:
        return 0.0, 0.0
    m = req.model
    stage = dataclasses.replace(m, num_layers=m.total_layers // c.pp - int(m.top_query_layer))
    phi = memory_per_rank(stage, c.tp, 1, 0, 1, req.seq_len, req.precision).parameters  # the stage's bytes per TP rank
    half = ring(c.dp) / 2 * phi  # bytes of one reduce-scatter or all-gather of phi
    bw = _link(req.device, c.tp * c.dp)
    if c.zero == 3:  # per micro-batch: gather for forward, gather for backward, reduce-scatter; prefetched
        return micro * 3 * half, micro * max(0.0, 3 * half / bw - compute_mb)
    if c.zero == 2:  # per micro-batch: reduce-scatter during its backward; all-gather of the updated parameters
        return (micro + 1) * half, micro * max(0.0, half / bw - backward_mb) + half / bw
    # ZeRO 0/1: once per step, after the last backward: all-reduce (ZeRO-1: reduce-scatter + all-gather)
    sent = 5 * half if c.zero == 1 and req.precision == "bfloat16" else 2 * half  # fp32 all-reduce + bf16 gather
    return sent, sent / bw


def predict(req: PlanRequest, c: Choice) -> None:
    """Fill in memory, step time (compute, bubble, exposed communication), MFU and communication volume of a
    structurally possible choice; the model is in the module docstring and docs/parallelism.md."""
    m, dev, w = req.model, req.device, BYTES[req.precision]
    c.memory = memory_gib(req, c.tp, c.pp, c.dp, c.zero, c.micro_batch, c.recompute)
    if c.memory["total"] > dev.memory_gib:
        c.problem = f"out of memory by {c.memory['total'] - dev.memory_gib:.1f} GiB"
    tokens = req.global_batch * req.seq_len
    model_flops = flops_per_token(m, req.seq_len) * tokens
    attention = 12.0 * m.total_layers * req.seq_len * m.hidden_size * tokens / 3  # forward share of attention
    extra = {"off": 0.0, "selective": attention, "full": model_flops / 3}[c.recompute]
    micro = req.global_batch // (c.dp * c.micro_batch)  # micro-batches per pipeline per step
    c.compute_s = (model_flops + extra) / (req.gpus * dev.peak_tflops * 1e12 * req.efficiency)
    c.bubble_s = c.compute_s * (c.pp - 1) / micro
    compute_mb = c.compute_s / micro
    backward_mb = compute_mb * (model_flops * 2 / 3 + extra) / (model_flops + extra)  # recomputation runs in backward
    act = c.micro_batch * req.seq_len * m.hidden_size * w  # bytes of one (b, s, h) activation
    tp_bytes = (m.total_layers // c.pp) * micro * (6 if c.recompute == "full" else 4) * act * ring(c.tp)
    c.tp_s = tp_bytes / _link(dev, c.tp)
    pp_bytes = 2 * micro * act if c.pp > 1 else 0.0
    c.pp_s = pp_bytes / _link(dev, c.tp * c.pp)
    dp_bytes, c.dp_exposed_s = _dp_traffic(req, c, micro, compute_mb, backward_mb)
    c.dp_s = dp_bytes / _link(dev, c.tp * c.dp)
    c.step_s = c.compute_s + c.bubble_s + c.tp_s + c.pp_s + c.dp_exposed_s
    c.mfu = model_flops / (c.step_s * req.gpus * dev.peak_tflops * 1e12)
    c.comm_gb = (tp_bytes + pp_bytes + dp_bytes) / 1e9


def plan(req: PlanRequest) -> tuple[list[Choice], list[Choice]]:
    """(every choice that fits, those the trainer runs first, each group fastest first; every choice that does not
    fit, with its reason)."""
    fits: list[Choice] = []
    rejected: list[Choice] = []
    tps = [t for t in _divisors(req.device.per_node * 2) if t <= req.gpus]
    pps = [p for p in _divisors(req.model.total_layers) if p <= req.max_pp]
    mbs = [2**i for i in range(8) if 2**i <= req.global_batch]
    for tp in tps:
        for pp in pps:
            for mb in mbs:
                problem = structural_problem(req, tp, pp, mb)
                dp = max(1, req.gpus // (tp * pp))
                for zero in (0, 1, 2, 3):
                    for recompute in ("off", "selective", "full"):
                        c = Choice(tp, pp, dp, zero, mb, recompute, problem=problem,
                                   not_run=NO_PIPELINE if pp > 1 else "")
                        if not problem:
                            predict(req, c)
                        (fits if c.fits else rejected).append(c)
    fits.sort(key=lambda c: (not c.runs, round(c.step_s, 6), c.memory["total"]))
    return fits, rejected


def rejection_summary(rejected: list[Choice]) -> list[tuple[str, int, str]]:
    """(kind of reason, how many, one example), most frequent first; the numbers in a reason are folded away."""
    kinds: Counter[str] = Counter()
    example: dict[str, str] = {}
    for c in rejected:
        kind = re.sub(r"\(\d+\)|by [\d.]+ GiB|^\d+", "", c.problem).replace("  ", " ").strip()
        kinds[kind] += 1
        example.setdefault(kind, f"TP {c.tp} PP {c.pp} DP {c.dp} ZeRO {c.zero} MB {c.micro_batch} {c.recompute}: "
                                 f"{c.problem}")
    return [(k, n, example[k]) for k, n in kinds.most_common()]


def format_table(choices: list[Choice], limit: int, ranks: dict[tuple[int, int, int, int, int, str], int]) -> str:
    """``ranks``: each fitting choice's place in the full ranking (shown even when the table is filtered)."""
    head = (f"{'rank':>4} {'TP':>3} {'PP':>3} {'DP':>5} {'ZeRO':>4} {'MB':>3} {'ckpt':>9} | {'param':>6} {'grad':>6} "
            f"{'optim':>6} {'activ':>6} {'total':>6} GiB | {'step s':>7} {'comm s':>6} {'MFU':>6} {'comm GB':>7} | "
            f"{'runs':<9} | fits")
    lines = [head, "-" * len(head)]
    for c in choices[:limit]:
        i = ranks.get(c.key, 0) or "-"
        mem = c.memory or {}
        cols = " ".join(f"{mem.get(k, math.nan):6.1f}" for k in ("parameters", "gradients", "optimizer",
                                                                 "activations", "total"))
        runs = "yes" if c.runs else "no (PP>1)"
        lines.append(f"{i:>4} {c.tp:>3} {c.pp:>3} {c.dp:>5} {c.zero:>4} {c.micro_batch:>3} {c.recompute:>9} | {cols} "
                     f"    | {c.step_s:7.2f} {exposed_s(c):6.2f} {c.mfu:6.1%} {c.comm_gb:7.1f} | {runs:<9} | "
                     f"{'yes' if c.fits else c.problem}")
    if any(not c.runs for c in choices[:limit]):
        lines.append("runs no (PP>1): the trainer has no pipeline parallelism; such rows rank after every row it runs")
    return "\n".join(lines)


def exposed_s(c: Choice) -> float:
    """Communication time a step waits for: TP and PP in full, DP beyond what compute hides."""
    return c.tp_s + c.pp_s + c.dp_exposed_s


def choice_row(c: Choice, rank: int | None) -> dict[str, object]:
    """One choice for ``codegeex plan --json``: the layout, memory (GiB), times (s), MFU, runnable and fitting."""
    return {"rank": rank, "tp": c.tp, "pp": c.pp, "dp": c.dp, "zero": c.zero, "micro_batch": c.micro_batch,
            "recompute": c.recompute, "memory_gib": {k: round(v, 4) for k, v in c.memory.items()},
            "step_s": c.step_s, "compute_s": c.compute_s, "bubble_s": c.bubble_s, "tp_comm_s": c.tp_s,
            "pp_comm_s": c.pp_s, "dp_comm_s": c.dp_s, "dp_exposed_s": c.dp_exposed_s, "exposed_comm_s": exposed_s(c),
            "mfu": c.mfu, "comm_gb": c.comm_gb, "fits": c.fits, "problem": c.problem, "runs": c.runs,
            "runs_reason": c.not_run}
