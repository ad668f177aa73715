"""Model FLOPs per token and a per-rank memory estimate.

FLOPs, training (forward + backward = 3 x forward), per token:

    6 * N_matmul  +  attention

``N_matmul`` counts the parameters of every matrix multiply: the QKV, output and MLP weights of all layers (the
top-query layer included) and the word embedding once, as the tied output projection. Embedding lookups, biases and
LayerNorms are left out. The attention term counts QKᵀ and AV (2 matmuls, 2 FLOPs per multiply-add) times 3:

- ``megatron``: the full square, every token attends to ``seq_len`` keys: ``12 * L * seq_len * h`` per token. This
  is what Megatron-LM and most published MFU figures use.
- ``causal``: what per-document causal attention actually computes, ``sum_i L_i (L_i + 1) / 2`` query-key pairs
  for documents of lengths ``L_i`` in a window: ``12 * L * h * sum_i L_i (L_i + 1) / 2 / seq_len`` per token.

Memory per rank (bytes): parameters, gradients and Adam states (fp32 master, m, v) sharded by ZeRO stage across
data-parallel ranks, and activations (:func:`activation_bytes`) counted for this implementation the way Megatron's
paper counts its own (Korthikanti et al. 2022: ``34sbh + 5as^2b`` bytes per layer in fp16 with dropout).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_code.config import ModelConfig


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by part, for the whole model."""
    h, f, layers = cfg.hidden_size, cfg.ffn_hidden_size, cfg.total_layers
    per_layer = {"attention": 4 * h * h + 4 * h, "mlp": 2 * h * f + f + h, "layernorms": 4 * h}
    counts = {
        "word_embeddings": cfg.vocab_size * h,
        "position_embeddings": cfg.max_position_embeddings * h,
        "top_query_embeddings": cfg.max_position_embeddings * h if cfg.top_query_layer else 0,
        "attention": layers * per_layer["attention"],
        "mlp": layers * per_layer["mlp"],
        "layernorms": layers * per_layer["layernorms"] + 2 * h,
    }
    if cfg.embedding_separation != "none":  # stage 2's docstring table (full) or rows (partial)
        rows = cfg.vocab_size if cfg.embedding_separation == "full" else len(cfg.separated_token_ids)
        counts["docstring_embeddings"] = rows * h
    counts["total"] = sum(counts.values())
    return counts


def matmul_parameters(cfg: ModelConfig) -> int:
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    return cfg.total_layers * (4 * h * h + 2 * h * f) + cfg.vocab_size * h


def flops_per_token(cfg: ModelConfig, seq_len: int, doc_lengths: list[int] | None = None,
                    convention: str = "megatron") -> float:
    """Training FLOPs per token; ``causal`` needs the document lengths of a window (default: one document)."""
    dense = 6.0 * matmul_parameters(cfg)
    h, layers = cfg.hidden_size, cfg.total_layers
    if convention == "megatron":
        return dense + 12.0 * layers * seq_len * h
    if convention == "causal":
        docs = doc_lengths or [seq_len]
        pairs = sum(n * (n + 1) / 2 for n in docs)
        return dense + 12.0 * layers * h * pairs / seq_len
    raise ValueError(f"convention {convention!r} must be 'megatron' or 'causal'")


@dataclass
class MemoryEstimate:
    """Bytes per rank."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    transient: float = 0.0  # the output layer's logits, alive beside the loss's saved fp32 softmax

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.transient


BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def activation_bytes(cfg: ModelConfig, tp: int, micro_batch: int, seq_len: int, width: int, recompute: str,
                     sequence_parallel: bool = False) -> float:
    """Bytes kept for backward by one micro-batch, counted for this implementation (checked against the tensors
    autograd actually saves in tests/test_flops.py and, with sequence parallelism, tests/test_model_parallel.py).

    Per layer, in elements of ``width`` bytes: LayerNorm inputs 2sbh, the shared QKV input sbh, q, k, v and the
    attention output 4sbh, the output projection's input sbh, the MLP input sbh, FastGELU's input and output 2sbf
    (the tensor-parallel parts divided by TP): ``9sbh + 2sbf`` in all, Megatron's 34sbh without dropout masks for
    f = 4h. Sequence parallelism (TP > 1) also divides the replicated 4sbh (LayerNorm and linear inputs are kept as
    the rank's sequence slice): ``(9sbh + 2sbf) / tp``, Megatron's 34sbh/t. Attention saves no s x s matrix
    (flash-style kernels keep the log-sum-exp); with dropout the probability matrix and its mask are kept
    (``a s^2 b`` elements and bytes), and each dropout keeps a one-byte mask of sbh (a slice under sequence
    parallelism). Once per model: the additive document mask (b s^2 elements), the embeddings' output and the final
    LayerNorm's input (2sbh, sequence slices under sequence parallelism), the output projection's input (sbh, whole),
    and the loss's fp32 softmax (s b V / tp, 4 bytes).
    """
    h, f, a, s, b = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads, seq_len, micro_batch
    sp = tp if sequence_parallel and tp > 1 else 1
    per_layer: float
    if recompute == "full":
        per_layer = s * b * h * width / sp  # the layer input; the rest is recomputed in backward
    elif recompute in ("off", "selective"):
        per_layer = (4 * s * b * h / sp + (5 * s * b * h + 2 * s * b * f) / tp) * width
        if cfg.hidden_dropout > 0:
            per_layer += 3 * s * b * h / sp  # one-byte masks after attention, after the MLP, (embeddings: once)
        if cfg.attention_dropout > 0 and recompute == "off":
            per_layer += a * s * s * b / tp * (width + 1)  # probabilities kept for the dropout, and its mask
    else:
        raise ValueError(f"recompute {recompute!r} must be 'off', 'selective' or 'full'")
    once = b * s * s * width + (2 * s * b * h / sp + s * b * h) * width + 4 * s * b * cfg.vocab_size / tp
    return float(cfg.total_layers * per_layer + once)


def memory_per_rank(cfg: ModelConfig, tp: int = 1, dp: int = 1, zero_stage: int = 0, micro_batch: int = 1,
                    seq_len: int = 2048, precision: str = "bfloat16", recompute: str = "off",
                    sequence_parallel: bool = False) -> MemoryEstimate:
    """Memory of training one rank: ``precision`` of weights and gradients; Adam keeps fp32 master weights (when the
    precision is not fp32), m and v, i.e. 12 bytes a parameter (8 in fp32), sharded over DP by ZeRO 1 and up;
    ZeRO 2 also shards gradients, ZeRO 3 also parameters. The peak comes at the start of backward, when the logits
    (``s b V / tp`` in ``precision``) are still held beside everything saved for backward."""
    counts = parameter_counts(cfg)
    split = counts["word_embeddings"] + counts["attention"] + counts["mlp"]  # divided by TP (biases approximately)
    if cfg.embedding_separation == "full":  # a second vocab-parallel table; partial rows are replicated
        split += counts["docstring_embeddings"]
    params_local = split / tp + (counts["total"] - split)
    w = BYTES[precision]
    opt_bytes = 8 if w == 4 else 12
    parameters = params_local * w / (dp if zero_stage >= 3 else 1)
    gradients = params_local * w / (dp if zero_stage >= 2 else 1)
    optimizer = params_local * opt_bytes / (dp if zero_stage >= 1 else 1)
    activations = activation_bytes(cfg, tp, micro_batch, seq_len, w, recompute, sequence_parallel)
    transient = float(seq_len * micro_batch * cfg.vocab_size / tp * w)
    return MemoryEstimate(parameters, gradients, optimizer, activations, transient)
