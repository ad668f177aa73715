"""``codegeex model info``: a model's parameters (the formula, checked against the model built on the meta device),
training FLOPs per token and memory per rank, as text."""

from __future__ import annotations

import torch

from megatron_code.config import ModelConfig
from megatron_code.flops import flops_per_token, memory_per_rank, parameter_counts
from megatron_code.model import CodeGeeXModel
from megatron_code.parallel import single_context

GIB = 2**30


def checked_parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """:func:`parameter_counts`, after checking its total against the model built (on the meta device)."""
    with torch.device("meta"):
        model = CodeGeeXModel(cfg, single_context(), initialize=False)
    counts = parameter_counts(cfg)
    if model.num_parameters() != counts["total"]:
        raise RuntimeError(f"built model has {model.num_parameters():,} parameters, the formula {counts['total']:,}")
    return counts


def model_info(cfg: ModelConfig, name: str, seq_len: int | None = None, tp: int = 1) -> str:
    """The report of ``codegeex model info`` on the model ``name`` (lines, newline-terminated): parameters by part,
    FLOPs per token at ``seq_len`` (default: the longest the model takes), memory per rank at TP ``tp`` under each
    recompute mode."""
    cfg.check_tensor_parallel(tp)
    counts = checked_parameter_counts(cfg)
    seq = seq_len or cfg.max_position_embeddings
    lines = [f"{name}: {counts['total']:,} parameters ({cfg.num_layers} layers"
             f"{' + top-query layer' if cfg.top_query_layer else ''}, hidden {cfg.hidden_size}, "
             f"{cfg.num_attention_heads} heads of {cfg.head_dim}, FFN {cfg.ffn_hidden_size}, vocabulary {cfg.vocab_size})"]
    lines += [f"  {k:<22}{v:>18,}" for k, v in counts.items() if k != "total"]
    lines.append(f"training FLOPs per token at sequence {seq}: {flops_per_token(cfg, seq):.4g} (Megatron's full-square "
                 f"attention), {flops_per_token(cfg, seq, convention='causal'):.4g} (causal, one document)")
    for recompute in ("off", "selective", "full"):
        m = memory_per_rank(cfg, tp=tp, micro_batch=1, seq_len=seq, recompute=recompute)
        lines.append(f"memory per rank, TP={tp}, DP=1, no ZeRO, micro-batch 1, bf16, recompute {recompute}: "
                     f"{m.total / GIB:.1f} GiB (parameters {m.parameters / GIB:.1f}, gradients "
                     f"{m.gradients / GIB:.1f}, Adam {m.optimizer / GIB:.1f}, activations {m.activations / GIB:.1f}, "
                     f"logits {m.transient / GIB:.1f})")
    return "\n".join(lines) + "\n"
