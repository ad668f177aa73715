"""The CodeGeeX decoder, tensor-parallel through megatron-core's parallel layers. Read it top to bottom.

Shapes: B batch, T new positions, Tk key positions (cache + new), C hidden, H local heads (heads / TP), D head
size, V/tp the local slice of the vocabulary.

    tokens (B, T) ─ word embedding (vocab-parallel; docstring tokens from their own table or rows under
                    embedding separation, see megatron_code/modality.py) + position embedding ─▶ x (B, T, C)
    x ─ layers[0..L-1]: x + attn(ln1(x)); x + mlp(ln2(x)) ─▶ final LayerNorm ─▶ h
    h ─ top-query layer: queries from top_query_embedding(position_ids), keys/values from ln1(h) ─▶ h'
    h' @ word_embeddingᵀ ─▶ logits (B, T, V/tp)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from megatron_code.attention import BACKENDS, MaskInfo, resolve_backend
from megatron_code.config import ModelConfig
from megatron_code.modality import build_separation
from megatron_code.parallel import ParallelContext

KVCache = list[tuple[Tensor, Tensor]]  # per layer: keys and values (B, H, Tk, D)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _FastGELU(torch.autograd.Function):
    """x * sigmoid(1.702 x), saving only x for backward (autograd's version would also keep the sigmoid)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        sig = torch.sigmoid(1.702 * x)
        return grad * (sig + 1.702 * x * sig * (1.0 - sig))


def fast_gelu(x: Tensor) -> Tensor:
    """CodeGeeX's FastGELU: x * sigmoid(1.702 x)."""
    return _FastGELU.apply(x)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the activations' dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def _normal(std: float) -> Any:
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


class ParallelAttention(nn.Module):
    """Self-attention with heads split across tensor-parallel ranks; queries may come from another input."""

    def __init__(self, cfg: ModelConfig, pc: ParallelContext, mp: ModelParallelConfig, fused: bool) -> None:
        super().__init__()
        c, std = cfg.hidden_size, cfg.init_method_std
        self.heads, self.head_dim, self.fused = cfg.num_attention_heads // pc.tp_size, cfg.head_dim, fused
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.dropout = cfg.attention_dropout
        self.recompute = False  # set by CodeGeeXModel.set_activation_checkpointing
        self.backend = cfg.attention_backend
        col = dict(config=mp, init_method=_normal(std), bias=True, gather_output=False, tp_group=pc.tp_group)
        if fused:  # output rows laid out [head, q/k/v, head_dim] so a contiguous split keeps whole heads
            self.query_key_value = ColumnParallelLinear(c, 3 * c, **col)
        else:
            self.query = ColumnParallelLinear(c, c, **col)
            self.key = ColumnParallelLinear(c, c, **col)
            self.value = ColumnParallelLinear(c, c, **col)
        self.dense = RowParallelLinear(c, c, config=mp, init_method=_normal(std / math.sqrt(2.0 * cfg.total_layers)),
                                       bias=True, input_is_parallel=True, skip_bias_add=False, tp_group=pc.tp_group)

    def _split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def forward(self, x: Tensor, mask: MaskInfo, query_input: Tensor | None = None,
                cache: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if self.fused:
            b, t, _ = x.shape
            qkv = self.query_key_value(x)[0].view(b, t, self.heads, 3, self.head_dim)  # (B, T, H, 3, D)
            q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D) each
        else:
            q = self._split(self.query(x if query_input is None else query_input)[0])
            k, v = self._split(self.key(x)[0]), self._split(self.value(x)[0])
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)  # (B, H, Tk, D)
        backend = BACKENDS[resolve_backend(self.backend, q.device)]
        dropout = self.dropout if self.training else 0.0
        if self.recompute and self.training:  # selective: keep q, k, v; recompute the attention core in backward
            out = checkpoint(backend, q, k, v, mask, self.scale, dropout, use_reentrant=False)
        else:
            out = backend(q, k, v, mask, self.scale, dropout)  # (B, H, T, D)
        b, h, t, d = out.shape
        return self.dense(out.transpose(1, 2).reshape(b, t, h * d))[0], (k, v)  # (B, T, C)


class ParallelMLP(nn.Module):
    """h -> 4h (column-parallel) -> FastGELU -> h (row-parallel)."""

    def __init__(self, cfg: ModelConfig, pc: ParallelContext, mp: ModelParallelConfig) -> None:
        super().__init__()
        std = cfg.init_method_std
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_hidden_size, config=mp,
                                                  init_method=_normal(std), bias=True, gather_output=False,
                                                  tp_group=pc.tp_group)
        self.dense_4h_to_h = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, config=mp,
                                               init_method=_normal(std / math.sqrt(2.0 * cfg.total_layers)), bias=True,
                                               input_is_parallel=True, skip_bias_add=False, tp_group=pc.tp_group)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(fast_gelu(self.dense_h_to_4h(x)[0]))[0]  # (B, T, C)


class TransformerLayer(nn.Module):
    """Pre-LayerNorm layer. As the top-query layer, queries come from ``query_input`` (no LayerNorm on them)."""

    def __init__(self, cfg: ModelConfig, pc: ParallelContext, mp: ModelParallelConfig, top_query: bool = False) -> None:
        super().__init__()
        self.input_layernorm = LayerNorm32(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.attention = ParallelAttention(cfg, pc, mp, fused=cfg.fused_qkv and not top_query)
        self.post_attention_layernorm = LayerNorm32(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = ParallelMLP(cfg, pc, mp)
        self.drop = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: Tensor, mask: MaskInfo, query_input: Tensor | None = None,
                cache: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        attn, kv = self.attention(self.input_layernorm(x), mask, query_input, cache)  # (B, T, C)
        x = x + self.drop(attn)
        x = x + self.drop(self.mlp(self.post_attention_layernorm(x)))
        return x, kv


class CodeGeeXModel(nn.Module):
    """Returns vocabulary-parallel logits (B, T, V/tp); see :mod:`megatron_code.objectives` for the loss."""

    def __init__(self, cfg: ModelConfig, pc: ParallelContext, initialize: bool = True) -> None:
        super().__init__()
        cfg.check_tensor_parallel(pc.tp_size)
        self.cfg, self.pc = cfg, pc
        mp = ModelParallelConfig(tensor_model_parallel_size=pc.tp_size, use_cpu_initialization=True,
                                 perform_initialization=initialize, params_dtype=DTYPES[cfg.params_dtype])
        std = cfg.init_method_std
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, init_method=_normal(std),
                                                      config=mp, tp_group=pc.tp_group)
        self.docstring_embeddings = build_separation(cfg, pc, mp, _normal(std))
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype=mp.params_dtype)
        self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(TransformerLayer(cfg, pc, mp) for _ in range(cfg.num_layers))
        self.final_layernorm = LayerNorm32(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.top_query_embeddings: nn.Embedding | None = None
        self.top_query_layer: TransformerLayer | None = None
        if cfg.top_query_layer:
            self.top_query_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype=mp.params_dtype)
            self.top_query_layer = TransformerLayer(cfg, pc, mp, top_query=True)
        if initialize:
            with torch.no_grad():
                for emb in (self.position_embeddings, self.top_query_embeddings):
                    if emb is not None:
                        nn.init.normal_(emb.weight, std=std)
        self.recompute_layers = False
        self._mark_tensor_parallel()

    def set_activation_checkpointing(self, mode: str) -> None:
        """off; selective (recompute the attention core); full (recompute every layer from its input)."""
        if mode not in ("off", "selective", "full"):
            raise ValueError(f"activation_checkpointing {mode!r} must be 'off', 'selective' or 'full'")
        self.recompute_layers = mode == "full"
        for module in self.modules():
            if isinstance(module, ParallelAttention):
                module.recompute = mode == "selective"

    def _mark_tensor_parallel(self) -> None:
        """Tag split parameters with their partition dimension (megatron-core tags them only when it initialises)."""
        for module in self.modules():
            if isinstance(module, ColumnParallelLinear | VocabParallelEmbedding):
                parts = [(module.weight, 0)] + ([(module.bias, 0)] if getattr(module, "bias", None) is not None else [])
            elif isinstance(module, RowParallelLinear):
                parts = [(module.weight, 1)]
            else:
                continue
            for param, dim in parts:
                if not hasattr(param, "partition_dim"):
                    set_tensor_model_parallel_attributes(param, True, dim, 1)

    def forward(self, tokens: Tensor, position_ids: Tensor, mask: MaskInfo,
                cache: KVCache | None = None, text: Tensor | None = None) -> tuple[Tensor, KVCache]:
        """tokens, position_ids (B, T) -> vocab-parallel logits (B, T, V/tp) and the updated KV cache; ``text`` (B, T)
        marks docstring tokens, which separated embeddings take from their own table."""
        x = self.word_embeddings(tokens)  # (B, T, C)
        if self.docstring_embeddings is not None and text is not None:
            x = self.docstring_embeddings.blend(x, tokens, text)
        x = x + self.position_embeddings(position_ids)  # (B, T, C)
        x = self.embedding_dropout(x)
        new_cache: KVCache = []
        for i, layer in enumerate(self.layers):
            if self.recompute_layers and self.training and cache is None:  # full: keep only each layer's input
                x, kv = checkpoint(layer, x, mask, None, None, use_reentrant=False)
            else:
                x, kv = layer(x, mask, None, cache[i] if cache else None)
            new_cache.append(kv)
        x = self.final_layernorm(x)
        if self.top_query_layer is not None and self.top_query_embeddings is not None:
            query = self.top_query_embeddings(position_ids)  # (B, T, C)
            x, kv = self.top_query_layer(x, mask, query, cache[len(self.layers)] if cache else None)
            new_cache.append(kv)
        x = copy_to_tensor_model_parallel_region(x, group=self.pc.tp_group)  # backward all-reduces over TP
        return F.linear(x, self.word_embeddings.weight), new_cache  # (B, T, V/tp)

    def num_parameters(self) -> int:
        """Parameters of the whole model (all TP ranks), counting replicated ones once."""
        total = 0
        for p in self.parameters():
            total += p.numel() * (self.pc.tp_size if getattr(p, "tensor_model_parallel", False) else 1)
        return total
