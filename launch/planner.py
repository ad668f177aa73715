"""The parallelism planner: every TP x PP x DP x ZeRO x micro-batch x activation-checkpointing choice for a model on
N devices, with memory per device, whether it fits, predicted step time, MFU and communication volume.

The model of a step (all per device):

- memory: :func:`megatron_code.flops.memory_per_rank` for the stage holding the most parameters (the embedding
  stage; layers divided by PP), activations for the whole depth (1F1B keeps PP micro-batches of L/PP layers in
  flight on the first stage), plus ``reserve_gib`` for the CUDA context, communication buffers and fragmentation.
- compute: model FLOPs (Megatron's convention) plus recomputation (full: one more forward; selective: the attention
  core again), at ``efficiency`` x peak, stretched by the pipeline bubble ``(PP-1)/m`` for m micro-batches.
- tensor parallelism: 4 all-reduces of ``b s h`` per layer and micro-batch (6 with full recomputation), ring volume
  ``2 (t-1)/t``, over the intra-node link, not overlapped; sequence parallelism (on by default with TP > 1) moves
  the same volume as all-gathers and reduce-scatters and divides the replicated activations by TP.
- data parallelism: gradient reduce-scatter + parameter all-gather ``2 (d-1)/d`` of the stage's parameters (ZeRO-3:
  3x, the parameters are gathered for forward and backward), over the inter-node link when the DP group leaves the
  node, overlapped with the backward pass (only the excess is exposed).
- pipeline: one activation and one gradient of ``b s h`` per micro-batch and stage boundary.
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


@dataclass
class Choice:
    tp: int
    pp: int
    dp: int
    zero: int
    micro_batch: int
    recompute: str
    memory: dict[str, float] = dataclasses.field(default_factory=dict)  # GiB by part
    step_s: float = 0.0
    mfu: float = 0.0
    comm_gb: float = 0.0
    problem: str = ""

    @property
    def fits(self) -> bool:
        return not self.problem

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


def predict(req: PlanRequest, c: Choice) -> None:
    """Fill in memory, step time, MFU and communication volume of a structurally possible choice."""
    m, dev, w = req.model, req.device, BYTES[req.precision]
    c.memory = memory_gib(req, c.tp, c.pp, c.dp, c.zero, c.micro_batch, c.recompute)
    if c.memory["total"] > dev.memory_gib:
        c.problem = f"out of memory by {c.memory['total'] - dev.memory_gib:.1f} GiB"
    tokens = req.global_batch * req.seq_len
    model_flops = flops_per_token(m, req.seq_len) * tokens
    attention = 12.0 * m.total_layers * req.seq_len * m.hidden_size * tokens / 3  # forward share of attention
    extra = {"off": 0.0, "selective": attention, "full": model_flops / 3}[c.recompute]
    micro = req.global_batch // (c.dp * c.micro_batch)  # micro-batches per pipeline per step
    compute = (model_flops + extra) / (req.gpus * dev.peak_tflops * 1e12 * req.efficiency)
    compute *= 1 + (c.pp - 1) / micro
    act = c.micro_batch * req.seq_len * m.hidden_size * w
    tp_bytes = (m.total_layers // c.pp) * micro * (6 if c.recompute == "full" else 4) * act * 2 * (c.tp - 1) / c.tp
    stage_params = memory_per_rank(dataclasses.replace(m, num_layers=m.total_layers // c.pp - int(m.top_query_layer)),
                                   c.tp, 1, 0, 1, req.seq_len, req.precision).parameters
    dp_bytes = (3 if c.zero == 3 else 2) * (c.dp - 1) / c.dp * stage_params
    pp_bytes = 2 * micro * act if c.pp > 1 else 0.0
    dp_link = dev.intra_node_gbps if c.dp * c.tp <= dev.per_node else dev.inter_node_gbps
    pp_link = dev.intra_node_gbps if c.tp * c.pp <= dev.per_node else dev.inter_node_gbps
    tp_s, dp_s, pp_s = tp_bytes / (dev.intra_node_gbps * 1e9), dp_bytes / (dp_link * 1e9), pp_bytes / (pp_link * 1e9)
    c.step_s = compute + tp_s + pp_s + max(0.0, dp_s - compute * 2 / 3)
    c.mfu = model_flops / (c.step_s * req.gpus * dev.peak_tflops * 1e12)
    c.comm_gb = (tp_bytes + dp_bytes + pp_bytes) / 1e9


def plan(req: PlanRequest) -> tuple[list[Choice], list[Choice]]:
    """(every choice that fits, fastest first; every choice that does not, with its reason)."""
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
                        c = Choice(tp, pp, dp, zero, mb, recompute, problem=problem)
                        if not problem:
                            predict(req, c)
                        (fits if c.fits else rejected).append(c)
    fits.sort(key=lambda c: (round(c.step_s, 6), c.memory["total"]))
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
            f"{'optim':>6} {'activ':>6} {'total':>6} GiB | {'step s':>8} {'MFU':>6} {'comm GB':>8} | fits")
    lines = [head, "-" * len(head)]
    for c in choices[:limit]:
        i = ranks.get(c.key, 0) or "-"
        mem = c.memory or {}
        cols = " ".join(f"{mem.get(k, math.nan):6.1f}" for k in ("parameters", "gradients", "optimizer",
                                                                 "activations", "total"))
        lines.append(f"{i:>4} {c.tp:>3} {c.pp:>3} {c.dp:>5} {c.zero:>4} {c.micro_batch:>3} {c.recompute:>9} | {cols} "
                     f"    | {c.step_s:8.2f} {c.mfu:6.1%} {c.comm_gb:8.1f} | {'yes' if c.fits else c.problem}")
    return "\n".join(lines)
