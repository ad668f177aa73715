"""The CodeGeeX decoder, tensor-parallel through megatron-core's parallel layers. Read it top to bottom.

Shapes: B batch, T new positions, Tk key positions (cache + new), C hidden, H local heads (heads / TP), D head
size, V/tp the local slice of the vocabulary.

    tokens (B, T) ─ word embedding (vocab-parallel; docstring tokens from their own table or rows under
                    embedding separation, see megatron_code/modality.py) + position embedding ─▶ x (B, T, C)
    x ─ layers[0..L-1]: x + attn(ln1(x)); x + mlp(ln2(x)) ─▶ final LayerNorm ─▶ h
    h ─ top-query layer: queries from top_query_embedding(position_ids), keys/values from ln1(h) ─▶ h'
    h' @ word_embeddingᵀ ─▶ logits (B, T, V/tp)

Sequence parallelism (``sequence_parallel``, TP > 1; Megatron's): between the tensor-parallel regions the layers
hold (T/tp, B, C), sequence-first, a different slice of the sequence on every rank, so LayerNorm, dropout, bias and
residual work and the activations they keep are divided by TP. The column-parallel linears all-gather the sequence
before their matmul (and keep only the local slice for backward); the row-parallel ones reduce-scatter after it
instead of all-reducing. Parameters used on a sequence slice (LayerNorms, the row-parallel biases) get their
gradients summed over the tensor-parallel group in backward. Without it the layers hold (B, T, C).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from megatron_code.attention import BACKENDS, MaskInfo, resolve_backends
from megatron_code.config import ModelConfig
from megatron_code.fused import elementwise
from megatron_code.modality import build_separation
from megatron_code.parallel import ParallelContext, prepare_sequence_parallel, seed_device_initialisation


class KVCache:
    """Keys and values of every layer for a whole generation, allocated once: (L, B, H, Tmax, D) each, of which the
    first :attr:`length` positions (a host int) are filled. A forward step writes its new positions in place (no
    concatenation, no reallocation) and :meth:`advance` moves the length on once every layer has written."""

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        # zeroed: positions a grouped prefill leaves unwritten are masked, and 0 x NaN from stale memory would not be
        self.keys = torch.zeros((layers, batch, heads, max_len, head_dim), dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.length = 0  # positions filled, on the host
        self.pending = 0  # positions the current step writes
        self.rows: Tensor | None = None  # a prefill in groups: the rows the next forward writes (see write_rows)
        self.start = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (B, H, T, D) of the step's new positions -> every position's keys and values so far (B, H, Tk, D),
        views into the buffer. In a grouped prefill (:meth:`write_rows`), k, v (G, H, T, D) go to the group's rows
        and are what the group attends to."""
        if self.rows is not None:
            end = self.start + k.shape[2]
            self.keys[layer, self.rows, :, self.start:end] = k
            self.values[layer, self.rows, :, self.start:end] = v
            return k, v
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot take {end}")
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        self.pending = k.shape[2]
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self) -> None:
        if self.rows is None:
            self.length += self.pending
        self.pending = 0

    def write_rows(self, rows: Tensor | None, start: int = 0, length: int = 0) -> None:
        """The next forwards write batch rows ``rows`` (an index tensor) from position ``start`` on: a prefill in
        groups of similar prompt lengths, each padded to its own longest. ``rows`` None ends it: ``length``
        positions are then filled in every row."""
        self.rows, self.start = rows, start
        if rows is None:
            self.length = length

    def keep(self, rows: Tensor) -> None:
        """Keep only batch rows ``rows`` (an index tensor on the cache's device): finished prompts leave the batch."""
        self.keys, self.values = self.keys[:, rows], self.values[:, rows]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": torch.float32}


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the activations' dtype. Under sequence parallelism (``sp_group``) it sees
    a slice of the sequence, so its parameters' gradients are summed over the tensor-parallel group."""

    sp_group: Any = None

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        if self.sp_group is not None:
            w, b = (copy_to_tensor_model_parallel_region(t, group=self.sp_group) for t in (w, b))
        return F.layer_norm(x.float(), self.normalized_shape, w.float(), b.float(), self.eps).to(x.dtype)


def _sp_bias(bias: Tensor, group: Any) -> Tensor:
    """A row-parallel bias added to a sequence slice: its gradient summed over the tensor-parallel group."""
    return bias if group is None else copy_to_tensor_model_parallel_region(bias, group=group)


def _embedding(cfg: ModelConfig, mp: ModelParallelConfig, device: torch.device | None) -> nn.Embedding:
    """A replicated (max_position_embeddings, C) table; its random draw is skipped when the weights will be loaded."""
    shape = (cfg.max_position_embeddings, cfg.hidden_size)
    if mp.perform_initialization:  # nn.Embedding draws N(0, 1) itself (then the model draws N(0, std))
        return nn.Embedding(*shape, dtype=mp.params_dtype, device=device)
    return nn.Embedding(*shape, _weight=torch.empty(shape, dtype=mp.params_dtype, device=device))


def _normal(std: float) -> Any:
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


class ParallelAttention(nn.Module):
    """Self-attention with heads split across tensor-parallel ranks; queries may come from another input.

    Returns the row-parallel output without its bias (the layer adds it with dropout and the residual)."""

    def __init__(self, cfg: ModelConfig, pc: ParallelContext, mp: ModelParallelConfig, fused: bool,
                 backends: dict[str, str]) -> None:
        super().__init__()
        c, std = cfg.hidden_size, cfg.init_method_std
        self.heads, self.head_dim, self.fused = cfg.num_attention_heads // pc.tp_size, cfg.head_dim, fused
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.dropout = cfg.attention_dropout
        self.recompute = False  # set by CodeGeeXModel.set_activation_checkpointing
        self.seq_first = mp.sequence_parallel
        self.backends = {use: BACKENDS[name] for use, name in backends.items()}  # resolved once, per use
        col = dict(config=mp, init_method=_normal(std), bias=True, gather_output=False, skip_bias_add=True,
                   tp_group=pc.tp_group)
        if fused:  # output rows laid out [head, q/k/v, head_dim] so a contiguous split keeps whole heads
            self.query_key_value = ColumnParallelLinear(c, 3 * c, **col)
        else:
            self.query = ColumnParallelLinear(c, c, **col)
            self.key = ColumnParallelLinear(c, c, **col)
            self.value = ColumnParallelLinear(c, c, **col)
        self.dense = RowParallelLinear(c, c, config=mp, init_method=_normal(std / math.sqrt(2.0 * cfg.total_layers)),
                                       bias=True, input_is_parallel=True, skip_bias_add=True, tp_group=pc.tp_group)

    def _heads(self, x: Tensor, parts: int = 1) -> Tensor:
        """(B, T, parts*H*D) or, sequence-first, (T, B, parts*H*D) -> (parts, B, H, T, D)."""
        if self.seq_first:
            t, b, _ = x.shape
            return x.view(t, b, self.heads, parts, self.head_dim).permute(3, 1, 2, 0, 4)
        b, t, _ = x.shape
        return x.view(b, t, self.heads, parts, self.head_dim).permute(3, 0, 2, 1, 4)

    def _merge(self, out: Tensor) -> Tensor:
        """(B, H, T, D) -> (B, T, H*D) or, sequence-first, (T, B, H*D)."""
        b, h, t, d = out.shape
        order = (2, 0, 1, 3) if self.seq_first else (0, 2, 1, 3)
        return out.permute(*order).reshape(*((t, b) if self.seq_first else (b, t)), h * d)

    def forward(self, x: Tensor, mask: MaskInfo, use: str, query_input: Tensor | None = None,
                cache: tuple[KVCache, int] | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, C), or (T/tp, B, C) sequence-parallel -> (output without bias, like x; bias (C,)). ``cache``: the
        generation's cache and this layer's index in it (the new keys and values are written there)."""
        if self.fused:
            out, bias = self.query_key_value(x)
            q, k, v = self._heads(out + bias, 3)  # (B, H, T, D) each
        else:
            q, k, v = (self._heads(out + bias)[0] for out, bias in (
                self.query(x if query_input is None else query_input), self.key(x), self.value(x)))
        if cache is not None:
            k, v = cache[0].append(cache[1], k, v)  # (B, H, Tk, D)
        backend = self.backends[use]
        dropout = self.dropout if self.training else 0.0
        if self.recompute and self.training:  # selective: keep q, k, v; recompute the attention core in backward
            out = checkpoint(backend, q, k, v, mask, self.scale, dropout, use_reentrant=False)
        else:
            out = backend(q, k, v, mask, self.scale, dropout)  # (B, H, T, D)
        return self.dense(self._merge(out))  # like x, and the bias (C,)


class ParallelMLP(nn.Module):
    """h -> 4h (column-parallel) -> bias + FastGELU -> h (row-parallel, bias returned unapplied)."""

    def __init__(self, cfg: ModelConfig, pc: ParallelContext, mp: ModelParallelConfig, gelu: Any) -> None:
        super().__init__()
        std = cfg.init_method_std
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_hidden_size, config=mp,
                                                  init_method=_normal(std), bias=True, gather_output=False,
                                                  skip_bias_add=True, tp_group=pc.tp_group)
        self.dense_4h_to_h = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, config=mp,
                                               init_method=_normal(std / math.sqrt(2.0 * cfg.total_layers)), bias=True,
                                               input_is_parallel=True, skip_bias_add=True, tp_group=pc.tp_group)
        self.gelu = gelu

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, bias = self.dense_h_to_4h(x)  # (..., F/tp), (F/tp,)
        return self.dense_4h_to_h(self.gelu(h, bias))  # like x, and the bias (C,)


class TransformerLayer(nn.Module):
    """Pre-LayerNorm layer. As the top-query layer, queries come from ``query_input`` (no LayerNorm on them)."""

    def __init__(self, cfg: ModelConfig, pc: ParallelContext, mp: ModelParallelConfig, backends: dict[str, str],
                 fused_elementwise: bool, top_query: bool = False) -> None:
        super().__init__()
        gelu, self.bias_dropout_add = elementwise(fused_elementwise)
        self.input_layernorm = LayerNorm32(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.attention = ParallelAttention(cfg, pc, mp, cfg.fused_qkv and not top_query, backends)
        self.post_attention_layernorm = LayerNorm32(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = ParallelMLP(cfg, pc, mp, gelu)
        self.dropout = cfg.hidden_dropout
        self.sp_group = pc.tp_group if mp.sequence_parallel else None

    def forward(self, x: Tensor, mask: MaskInfo, use: str, query_input: Tensor | None = None,
                cache: tuple[KVCache, int] | None = None) -> Tensor:
        """x (B, T, C), or (T/tp, B, C) sequence-parallel -> the same shape."""
        attn, bias = self.attention(self.input_layernorm(x), mask, use, query_input, cache)
        x = self.bias_dropout_add(attn, _sp_bias(bias, self.sp_group), x, self.dropout, self.training)
        mlp, bias = self.mlp(self.post_attention_layernorm(x))
        return self.bias_dropout_add(mlp, _sp_bias(bias, self.sp_group), x, self.dropout, self.training)


class CodeGeeXModel(nn.Module):
    """Returns vocabulary-parallel logits (B, T, V/tp); see :mod:`megatron_code.objectives` for the loss.

    ``initialize=False`` allocates the parameters without drawing random values (the weights are about to be
    loaded). On a GPU the parameters are created, and initialised, there: each rank draws only its own slices."""

    def __init__(self, cfg: ModelConfig, pc: ParallelContext, initialize: bool = True) -> None:
        super().__init__()
        cfg.check_tensor_parallel(pc.tp_size)
        self.cfg, self.pc = cfg, pc
        self.sequence_parallel = cfg.sequence_parallel and pc.tp_size > 1
        # built on the host (and so inside a caller's `with torch.device("meta")`) on a CPU or for the meta device
        on_host = pc.device.type == "cpu" or torch.empty(0).device.type == "meta"
        if self.sequence_parallel:
            prepare_sequence_parallel(pc)
        if initialize and not on_host:
            seed_device_initialisation(pc)
        mp = ModelParallelConfig(tensor_model_parallel_size=pc.tp_size, use_cpu_initialization=on_host,
                                 perform_initialization=initialize, params_dtype=DTYPES[cfg.params_dtype],
                                 sequence_parallel=self.sequence_parallel)
        dev = None if on_host else pc.device  # on the host: wherever the caller's device context says (meta too)
        std = cfg.init_method_std
        backends = resolve_backends(cfg.attention_backend, pc.device, cfg.attention_dropout, mp.params_dtype)
        fused = cfg.fused_elementwise and not on_host
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, init_method=_normal(std),
                                                      config=mp, tp_group=pc.tp_group)
        self.docstring_embeddings = build_separation(cfg, pc, mp, _normal(std), dev)
        self.position_embeddings = _embedding(cfg, mp, dev)
        self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(TransformerLayer(cfg, pc, mp, backends, fused) for _ in range(cfg.num_layers))
        self.final_layernorm = LayerNorm32(cfg.hidden_size, eps=cfg.layernorm_epsilon, device=dev)
        self.top_query_embeddings: nn.Embedding | None = None
        self.top_query_layer: TransformerLayer | None = None
        if cfg.top_query_layer:
            self.top_query_embeddings = _embedding(cfg, mp, dev)
            self.top_query_layer = TransformerLayer(cfg, pc, mp, backends, fused, top_query=True)
        if initialize:
            with torch.no_grad():
                for emb in (self.position_embeddings, self.top_query_embeddings):
                    if emb is not None:
                        nn.init.normal_(emb.weight, std=std)
        if dev is not None:
            self.to(dev)  # LayerNorms and buffers made on the host: small
        self.recompute_layers = False
        self._mark_parallel()

    def set_activation_checkpointing(self, mode: str) -> None:
        """off; selective (recompute the attention core); full (recompute every layer from its input)."""
        if mode not in ("off", "selective", "full"):
            raise ValueError(f"activation_checkpointing {mode!r} must be 'off', 'selective' or 'full'")
        self.recompute_layers = mode == "full"
        for module in self.modules():
            if isinstance(module, ParallelAttention):
                module.recompute = mode == "selective"

    def _mark_parallel(self) -> None:
        """Tag split parameters with their partition dimension (megatron-core tags them only when it initialises),
        and, under sequence parallelism, point the LayerNorms at the group that sums their gradients."""
        for module in self.modules():
            if isinstance(module, LayerNorm32) and self.sequence_parallel:
                module.sp_group = self.pc.tp_group
            if isinstance(module, ColumnParallelLinear | VocabParallelEmbedding):
                parts = [(module.weight, 0)] + ([(module.bias, 0)] if getattr(module, "bias", None) is not None else [])
            elif isinstance(module, RowParallelLinear):
                parts = [(module.weight, 1)]
            else:
                continue
            for param, dim in parts:
                if not hasattr(param, "partition_dim"):
                    set_tensor_model_parallel_attributes(param, True, dim, 1)

    def _embed(self, tokens: Tensor, position_ids: Tensor, text: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The layers' input and the top-query layer's queries: (B, T, C), or (T/tp, B, C) sequence-parallel."""
        x = self.word_embeddings(tokens)  # (B, T, C)
        if self.docstring_embeddings is not None and text is not None:
            x = self.docstring_embeddings.blend(x, tokens, text)
        x = x + self.position_embeddings(position_ids)  # (B, T, C)
        query = self.top_query_embeddings(position_ids) if self.top_query_embeddings is not None else None
        if self.sequence_parallel:
            g = self.pc.tp_group
            x = scatter_to_sequence_parallel_region(x.transpose(0, 1).contiguous(), group=g)  # (T/tp, B, C)
            if query is not None:
                query = scatter_to_sequence_parallel_region(query.transpose(0, 1).contiguous(), group=g)
        return self.embedding_dropout(x), query

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` positions, on this rank's device, in the
        parameters' dtype, holding this rank's heads of every layer (the top-query layer's too)."""
        p = self.word_embeddings.weight
        layers = self.cfg.num_layers + int(self.top_query_layer is not None)
        return KVCache(layers, batch, self.cfg.num_attention_heads // self.pc.tp_size, max_len, self.cfg.head_dim,
                       p.dtype, p.device)

    def forward(self, tokens: Tensor, position_ids: Tensor, mask: MaskInfo, cache: KVCache | None = None,
                text: Tensor | None = None, last_only: bool = False) -> tuple[Tensor, KVCache | None]:
        """tokens, position_ids (B, T) -> vocab-parallel logits (B, T, V/tp), and ``cache``; ``text`` (B, T) marks
        docstring tokens, which separated embeddings take from their own table. A ``cache``
        (:meth:`new_cache`) means generation: the step's keys and values are written into it, and its attention
        backend is the cache use's. ``last_only``: logits of the last position only (B, 1, V/tp)."""
        use = "cache" if cache is not None else "prefix" if mask.prefix is not None else "train"
        if self.sequence_parallel and (cache is not None or tokens.shape[1] % self.pc.tp_size):
            raise ValueError(f"sequence_parallel splits the sequence ({tokens.shape[1]} positions) over "
                             f"tensor_model_parallel_size ({self.pc.tp_size}): it must divide it, and generation with "
                             "a KV cache runs without sequence parallelism (load the model with sequence_parallel=false)")
        x, query = self._embed(tokens, position_ids, text)
        for i, layer in enumerate(self.layers):
            if self.recompute_layers and self.training and cache is None:  # full: keep only each layer's input
                x = checkpoint(layer, x, mask, use, None, None, use_reentrant=False)
            else:
                x = layer(x, mask, use, None, None if cache is None else (cache, i))
        x = self.final_layernorm(x)
        if self.top_query_layer is not None:
            slot = None if cache is None else (cache, len(self.layers))
            x = self.top_query_layer(x, mask, use, query, slot)
        if cache is not None:
            cache.advance()
        if self.sequence_parallel:  # backward reduce-scatters the gradient the vocabulary slices sum to
            x = gather_from_sequence_parallel_region(x, True, group=self.pc.tp_group).transpose(0, 1)  # (B, T, C)
        else:
            x = copy_to_tensor_model_parallel_region(x, group=self.pc.tp_group)  # backward all-reduces over TP
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return F.linear(x, self.word_embeddings.weight), cache  # (B, T, V/tp)

    def num_parameters(self) -> int:
        """Parameters of the whole model (all TP ranks), counting replicated ones once."""
        total = 0
        for p in self.parameters():
            total += p.numel() * (self.pc.tp_size if getattr(p, "tensor_model_parallel", False) else 1)
        return total
