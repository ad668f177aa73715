"""Attention that never crosses a document boundary, with an optional bidirectional prefix per document.

Every backend computes the same thing. For query position i and key position j of one sequence (keys include a KV
cache, so queries are the last Tq of Tk positions)::

    allowed(i, j) = seg[i] == seg[j]  and  (j <= i  or  (prefix[i] and prefix[j]))

``seg`` holds document ids (padding gets its own id, -1 for left padding in generation); ``prefix`` marks the
docstring prefix of PREFIX-CODE-CLM. Backends:

- ``sdpa``: a dense boolean mask given to ``scaled_dot_product_attention``; any device.
- ``flex``: FlexAttention with a block mask built from the same rule (compiled on GPU; forward-only on CPU).
- ``flash``: flash-attn's variable-length kernel over the document segments (GPU, no prefix, no cache).

A backend asked for and not available raises; nothing falls back to plain causal attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class MaskInfo:
    """What attention needs to know about the sequence: document segments and the bidirectional prefix."""

    segment_ids: Tensor  # (B, Tk) int: the document of every key position (cache included)
    prefix: Tensor | None = None  # (B, Tk) bool: positions inside a bidirectional prefix

    def dense(self, tq: int) -> Tensor:
        """(B, 1, Tq, Tk) bool mask: True where attention is allowed (built once, shared by every layer)."""
        cached = self.__dict__.get("_dense")
        if cached is not None and cached.shape[2] == tq:
            return cached
        self.__dict__["_dense"] = mask = self._build(tq)
        return mask

    def additive(self, tq: int, dtype: torch.dtype) -> Tensor:
        """(B, 1, Tq, Tk) float mask, 0 where allowed and -inf elsewhere, built once for every layer (given as a
        boolean, SDPA would convert it to this in each layer and keep each copy for backward)."""
        cached = self.__dict__.get("_additive")
        if cached is not None and cached.shape[2] == tq and cached.dtype == dtype:
            return cached
        allowed = self.dense(tq)
        self.__dict__["_additive"] = mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, float("-inf"))
        return mask

    def _build(self, tq: int) -> Tensor:
        seg = self.segment_ids
        tk = seg.shape[1]
        qi = torch.arange(tk - tq, tk, device=seg.device)
        kj = torch.arange(tk, device=seg.device)
        allowed = (seg[:, -tq:, None] == seg[:, None, :]) & (kj[None, None, :] <= qi[None, :, None])  # (B, Tq, Tk)
        if self.prefix is not None:
            allowed |= (seg[:, -tq:, None] == seg[:, None, :]) & self.prefix[:, -tq:, None] & self.prefix[:, None, :]
        return allowed[:, None]


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend to use for ``name`` on ``device``; raises when an explicit choice cannot run here."""
    if name == "auto":
        if device.type == "cuda":
            return "flash" if flash_available() else "flex"
        return "sdpa"
    if name == "flash" and not flash_available():
        raise RuntimeError("attention_backend 'flash' needs the flash-attn package and a CUDA device")
    return name


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: MaskInfo, scale: float, dropout: float) -> Tensor:
    """q (B, H, Tq, D), k and v (B, H, Tk, D) -> (B, H, Tq, D)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.additive(q.shape[2], q.dtype), dropout_p=dropout,
                                          scale=scale)


_compiled_flex: Any = None


def flex(q: Tensor, k: Tensor, v: Tensor, mask: MaskInfo, scale: float, dropout: float) -> Tensor:
    """FlexAttention with a block mask from the same rule (no dropout support)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    if dropout > 0:
        raise RuntimeError("attention_backend 'flex' has no attention dropout; set attention_dropout=0 or use 'sdpa'")
    seg, prefix = mask.segment_ids, mask.prefix
    tq, tk = q.shape[2], k.shape[2]
    offset = tk - tq

    def mask_mod(b: Tensor, h: Tensor, qi: Tensor, kj: Tensor) -> Tensor:
        same = seg[b, qi + offset] == seg[b, kj]
        ok = kj <= qi + offset
        if prefix is not None:
            ok = ok | (prefix[b, qi + offset] & prefix[b, kj])
        return same & ok

    block = create_block_mask(mask_mod, q.shape[0], None, tq, tk, device=q.device)
    fn = flex_attention
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block, scale=scale)


def flash(q: Tensor, k: Tensor, v: Tensor, mask: MaskInfo, scale: float, dropout: float) -> Tensor:
    """flash-attn varlen over contiguous document segments: causal within each, nothing across."""
    from flash_attn import flash_attn_varlen_func

    if mask.prefix is not None or q.shape[2] != k.shape[2]:
        raise RuntimeError("attention_backend 'flash' supports neither a bidirectional prefix nor a KV cache; use 'flex'")
    b, h, t, d = q.shape
    seg = mask.segment_ids  # (B, T)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    flat_starts = torch.nonzero(starts.reshape(-1)).squeeze(1)
    cu = torch.cat([flat_starts, torch.tensor([b * t], device=seg.device)]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    pack = lambda x: x.transpose(1, 2).reshape(b * t, h, d)  # noqa: E731
    out = flash_attn_varlen_func(pack(q), pack(k), pack(v), cu, cu, max_len, max_len, dropout_p=dropout,
                                 softmax_scale=scale, causal=True)
    return out.reshape(b, t, h, d).transpose(1, 2)


BACKENDS = {"sdpa": sdpa, "flex": flex, "flash": flash}
