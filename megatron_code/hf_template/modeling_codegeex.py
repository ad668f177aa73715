"""CodeGeeX-shaped decoder for Hugging Face ``transformers`` (``trust_remote_code``): plain PyTorch, no KV cache.

Written by ``codegeex model convert --to hf``; its logits equal the training project's model at TP=1. Shapes: B
batch, T positions, C hidden, H heads, D head size, V vocabulary.

    input_ids (B, T) ─ word embedding + position embedding ─▶ x (B, T, C)
    x ─ layers: x + attn(ln1(x)); x + mlp(ln2(x)) ─▶ final LayerNorm ─▶ h
    h ─ top-query layer: queries from top_query_embeddings(position_ids), keys/values from ln1(h) ─▶ h'
    h' @ word_embeddingsᵀ ─▶ logits (B, T, V)

``attention_mask`` (B, T), 1 for tokens and 0 for padding (left padding): a token attends to earlier tokens only,
padding to earlier padding. Without ``position_ids`` positions count tokens only (padding at 0)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from .configuration_codegeex import CodeGeeXConfig


def fast_gelu(x: Tensor) -> Tensor:
    """CodeGeeX's FastGELU: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the activations' dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class CodeGeeXAttention(nn.Module):
    def __init__(self, config: CodeGeeXConfig) -> None:
        super().__init__()
        c = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, c // config.num_attention_heads
        self.query, self.key, self.value, self.dense = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x: Tensor, allowed: Tensor, query_input: Tensor | None = None) -> Tensor:
        """x (B, T, C), allowed (B, 1, T, T) bool -> (B, T, C)."""
        b, t, c = x.shape

        def heads(y: Tensor) -> Tensor:  # (B, T, C) -> (B, H, T, D)
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q = heads(self.query(x if query_input is None else query_input))
        k, v = heads(self.key(x)), heads(self.value(x))
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(self.head_dim))
        return self.dense(out.transpose(1, 2).reshape(b, t, c))  # (B, T, C)


class CodeGeeXMLP(nn.Module):
    def __init__(self, config: CodeGeeXConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(fast_gelu(self.dense_h_to_4h(x)))


class CodeGeeXLayer(nn.Module):
    """Pre-LayerNorm layer; as the top-query layer, queries come from ``query_input`` (no LayerNorm on them)."""

    def __init__(self, config: CodeGeeXConfig) -> None:
        super().__init__()
        eps = config.layernorm_epsilon
        self.input_layernorm = LayerNorm32(config.hidden_size, eps=eps)
        self.attention = CodeGeeXAttention(config)
        self.post_attention_layernorm = LayerNorm32(config.hidden_size, eps=eps)
        self.mlp = CodeGeeXMLP(config)

    def forward(self, x: Tensor, allowed: Tensor, query_input: Tensor | None = None) -> Tensor:
        x = x + self.attention(self.input_layernorm(x), allowed, query_input)
        return x + self.mlp(self.post_attention_layernorm(x))


class CodeGeeXPreTrainedModel(PreTrainedModel):
    config_class = CodeGeeXConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["CodeGeeXLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def allowed_mask(attention_mask: Tensor) -> Tensor:
    """attention_mask (B, T), 1 for tokens -> (B, 1, T, T) bool: causal, tokens to tokens, padding to padding."""
    t = attention_mask.shape[1]
    keep = attention_mask.bool()
    causal = torch.ones(t, t, dtype=torch.bool, device=keep.device).tril()
    same = keep[:, :, None] == keep[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


class CodeGeeXModel(CodeGeeXPreTrainedModel):
    """The decoder without its output layer: hidden states (B, T, C) after the top-query layer."""

    def __init__(self, config: CodeGeeXConfig) -> None:
        super().__init__(config)
        c = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, c)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, c)
        self.layers = nn.ModuleList(CodeGeeXLayer(config) for _ in range(config.num_layers))
        self.final_layernorm = LayerNorm32(c, eps=config.layernorm_epsilon)
        self.top_query_embeddings = nn.Embedding(config.max_position_embeddings, c) if config.top_query_layer else None
        self.top_query_layer = CodeGeeXLayer(config) if config.top_query_layer else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                **kwargs: Any) -> BaseModelOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:  # tokens count from 0 after any left padding; padding sits at 0
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        allowed = allowed_mask(attention_mask)  # (B, 1, T, T)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # (B, T, C)
        for layer in self.layers:
            x = layer(x, allowed)
        x = self.final_layernorm(x)
        if self.top_query_layer is not None and self.top_query_embeddings is not None:
            x = self.top_query_layer(x, allowed, self.top_query_embeddings(position_ids))
        return BaseModelOutput(last_hidden_state=x)


class CodeGeeXForCausalLM(CodeGeeXPreTrainedModel, GenerationMixin):
    """Logits (B, T, V) from the hidden states and the word embedding (tied); ``labels`` (B, T), -100 ignored: the
    mean next-token cross-entropy (labels shifted inside, as in ``transformers``' causal LMs)."""

    def __init__(self, config: CodeGeeXConfig) -> None:
        super().__init__(config)
        self.transformer = CodeGeeXModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                labels: Tensor | None = None, **kwargs: Any) -> CausalLMOutput:
        h = self.transformer(input_ids, attention_mask, position_ids).last_hidden_state  # (B, T, C)
        logits = F.linear(h, self.transformer.word_embeddings.weight)  # (B, T, V)
        loss = None
        if labels is not None:
            shift = logits[:, :-1].float()
            loss = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)
