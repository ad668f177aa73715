"""FLOPs per token and the memory estimate, against the model and against what autograd really keeps."""

from __future__ import annotations

import pytest
import torch

from megatron_code.attention import MaskInfo
from megatron_code.config import load_preset
from megatron_code.flops import flops_per_token, matmul_parameters, memory_per_rank, parameter_counts
from megatron_code.model import CodeGeeXModel
from megatron_code.objectives import vocab_parallel_cross_entropy
from megatron_code.parallel import single_context
from tests.model_utils import tiny_config


def saved_bytes(model: CodeGeeXModel, batch: int, seq: int) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for backward in one forward and loss."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    tok = torch.randint(0, model.cfg.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, _ = model(tok, torch.arange(seq).repeat(batch, 1), MaskInfo(torch.zeros(batch, seq, dtype=torch.long)))
        vocab_parallel_cross_entropy(logits, tok, model.pc).mean()
    return sum(seen.values())


@pytest.mark.parametrize("layers,hidden,heads,seq,batch", [(2, 64, 4, 64, 2), (4, 128, 8, 128, 2), (2, 64, 4, 256, 1)])
def test_activation_estimate_within_1_percent_of_measured(layers, hidden, heads, seq, batch):
    """docs/model.md: the activation term is within 1% of the bytes autograd saves for tiny models."""
    cfg = tiny_config(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=4 * hidden,
                      vocab_size=256, max_position_embeddings=512)
    torch.manual_seed(0)
    model = CodeGeeXModel(cfg, single_context())
    measured = saved_bytes(model, batch, seq)
    estimate = memory_per_rank(cfg, seq_len=seq, micro_batch=batch, precision="float32").activations
    print(f"activations L={layers} h={hidden} s={seq} b={batch}: measured {measured:,} B, estimate {estimate:,.0f} B")
    assert abs(estimate - measured) / measured < 0.01


def test_parameter_gradient_and_optimizer_bytes_match_the_model():
    cfg = tiny_config()
    model = CodeGeeXModel(cfg, single_context())
    n = sum(p.numel() for p in model.parameters())
    assert parameter_counts(cfg)["total"] == n
    est = memory_per_rank(cfg, precision="float32")
    assert est.parameters == est.gradients == 4 * n and est.optimizer == 8 * n
    zero2 = memory_per_rank(cfg, dp=4, zero_stage=2, precision="bfloat16")
    assert zero2.parameters == 2 * n and zero2.gradients == 2 * n / 4 and zero2.optimizer == 12 * n / 4


def test_flops_conventions():
    cfg = load_preset("codegeex-13b")
    h, layers = 5120, 40
    assert matmul_parameters(cfg) == layers * (4 * h * h + 2 * h * 20480) + 52224 * h
    megatron = flops_per_token(cfg, 2048)
    assert megatron == 6 * matmul_parameters(cfg) + 12 * layers * 2048 * h
    one_doc = flops_per_token(cfg, 2048, [2048], "causal")
    four_docs = flops_per_token(cfg, 2048, [512] * 4, "causal")
    assert four_docs < one_doc < megatron
    assert one_doc - 6 * matmul_parameters(cfg) == pytest.approx(12 * layers * h * 2049 / 2)
    with pytest.raises(ValueError, match="convention 'x'"):
        flops_per_token(cfg, 2048, convention="x")
