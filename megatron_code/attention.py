"""Attention that never crosses a document boundary, with an optional bidirectional prefix per document.

Every backend computes the same thing. For query position i and key position j of one sequence (keys include a KV
cache, so queries are the last Tq of Tk positions)::

    allowed(i, j) = seg[i] == seg[j]  and  (j <= i  or  (prefix[i] and prefix[j]))

``seg`` holds document ids (padding gets its own id, -1 for left padding in generation); ``prefix`` marks the
docstring prefix of PREFIX-CODE-CLM. Backends:

- ``sdpa``: a dense additive mask given to ``scaled_dot_product_attention``; any device, any use.
- ``flex``: FlexAttention with one block mask per batch from the same rule (compiled on GPU; forward-only on CPU);
  no attention dropout.
- ``flash``: flash-attn's variable-length kernel over the document segments (GPU; no prefix, no cache).

The backend is resolved once, when the model is built, for each *use* (:data:`USES`): ``train`` (causal documents),
``prefix`` (PREFIX-CODE-CLM's bidirectional docstring) and ``cache`` (generation with a KV cache). A use never gets a
backend that cannot run it: ``auto`` picks flash, then flex (without attention dropout), then sdpa on GPU and sdpa on
CPU; an explicit backend that cannot run a use leaves that use to what ``auto`` would pick, said once in the log. A
backend asked for and not installed raises; nothing falls back to plain causal attention.

Per-batch metadata lives in :class:`MaskInfo`, built once per batch on the host from the sampler's document ids
(:meth:`MaskInfo.from_documents`): flash's ``cu_seqlens`` and ``max_seqlen``; the dense mask and flex's block mask
are built by the first layer and reused by every other one (and by recomputation in backward).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass
class MaskInfo:
    """What attention needs to know about the sequence: document segments and the bidirectional prefix."""

    segment_ids: Tensor  # (B, Tk) int: the document of every key position (cache included)
    prefix: Tensor | None = None  # (B, Tk) bool: positions inside a bidirectional prefix
    cu_seqlens: Tensor | None = None  # (N + 1,) int32: starts of the N documents in the flattened (B * T) batch
    max_seqlen: int = 0  # the longest document, known on the host (flash)

    @classmethod
    def from_documents(cls, document_ids: np.ndarray, device: torch.device | str = "cpu",
                       prefix: Tensor | None = None) -> MaskInfo:
        """From the sampler's (B, T) document ids, on the host: segments, and flash's metadata without a device
        round trip (the ids are copied to ``device`` once, asynchronously from pinned memory on a GPU)."""
        doc = np.asarray(document_ids)
        starts = np.ones(doc.shape, dtype=bool)  # (B, T): every row starts a document
        starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
        cu = np.append(np.flatnonzero(starts), doc.size).astype(np.int32)  # (N + 1,): flat offsets
        return cls(to_device(doc.astype(np.int64), device), prefix, to_device(cu, device), int(np.diff(cu).max()))

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


    def block_mask(self, tq: int, tk: int, device: torch.device) -> Any:
        """FlexAttention's block mask for these segments (built once per batch and shape, shared by every layer)."""
        cached = self.__dict__.get("_block")
        if cached is not None and cached[0] == (tq, tk):
            return cached[1]
        from torch.nn.attention.flex_attention import create_block_mask

        seg, prefix, offset = self.segment_ids, self.prefix, tk - tq

        def mask_mod(b: Tensor, h: Tensor, qi: Tensor, kj: Tensor) -> Tensor:
            same = seg[b, qi + offset] == seg[b, kj]
            ok = kj <= qi + offset
            if prefix is not None:
                ok = ok | (prefix[b, qi + offset] & prefix[b, kj])
            return same & ok

        block = create_block_mask(mask_mod, seg.shape[0], None, tq, tk, device=device)
        self.__dict__["_block"] = ((tq, tk), block)
        return block


def to_device(array: np.ndarray, device: torch.device | str) -> Tensor:
    """A host array on ``device``: through pinned memory and a non-blocking copy on a GPU (no host sync); on the
    host, the array's own memory."""
    if torch.device(device).type == "cuda":
        return torch.from_numpy(np.ascontiguousarray(array)).pin_memory().to(device, non_blocking=True)
    return torch.as_tensor(np.ascontiguousarray(array), device=device)


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


USES = ("train", "prefix", "cache")


def can_run(backend: str, use: str, dropout: float, device: torch.device,
            dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether ``backend`` computes ``use`` (with attention dropout ``dropout`` in training) on ``device`` for
    ``dtype`` activations. flex is never chosen for generation's cache: its shapes change every step, and compiled
    flex would recompile (and rebuild its block mask) for each."""
    if backend == "flash":
        return use == "train" and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if backend == "flex":
        return use != "cache" and dropout == 0.0
    return backend == "sdpa"


def resolve_backends(name: str, device: torch.device, dropout: float,
                     dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """The backend of every use for ``attention_backend`` ``name`` on ``device``; raises when an explicit choice is
    not installed here."""
    if name == "flash" and not flash_available():
        raise RuntimeError("attention_backend 'flash' needs the flash-attn package and a CUDA device")
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"attention_backend {name!r} must be one of auto, {', '.join(BACKENDS)}")
    auto = ["sdpa"]
    if device.type == "cuda":
        auto = (["flash"] if flash_available() else []) + ["flex", "sdpa"]
    chosen: dict[str, str] = {}
    for use in USES:
        if name != "auto" and can_run(name, use, dropout, device, dtype):
            chosen[use] = name
            continue
        chosen[use] = next(b for b in auto if can_run(b, use, dropout, device, dtype))
        if name != "auto":
            log.info("attention_backend %r cannot run %s attention here; that use takes %r", name, use, chosen[use])
    return chosen


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: MaskInfo, scale: float, dropout: float) -> Tensor:
    """q (B, H, Tq, D), k and v (B, H, Tk, D) -> (B, H, Tq, D)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.additive(q.shape[2], q.dtype), dropout_p=dropout,
                                          scale=scale)


_compiled_flex: Any = None


def flex(q: Tensor, k: Tensor, v: Tensor, mask: MaskInfo, scale: float, dropout: float) -> Tensor:
    """FlexAttention with the batch's block mask (no dropout support)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if dropout > 0:
        raise RuntimeError("attention_backend 'flex' has no attention dropout; set attention_dropout=0 or use 'sdpa'")
    block = mask.block_mask(q.shape[2], k.shape[2], q.device)
    fn = flex_attention
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block, scale=scale)


def flash(q: Tensor, k: Tensor, v: Tensor, mask: MaskInfo, scale: float, dropout: float) -> Tensor:
    """flash-attn varlen over the batch's document segments (``mask.cu_seqlens``): causal within each, nothing
    across."""
    from flash_attn import flash_attn_varlen_func

    if mask.prefix is not None or q.shape[2] != k.shape[2]:
        raise RuntimeError("attention_backend 'flash' supports neither a bidirectional prefix nor a KV cache; use 'flex'")
    if mask.cu_seqlens is None:
        raise ValueError("flash attention needs the batch's cu_seqlens: build the mask with MaskInfo.from_documents")
    b, h, t, d = q.shape
    pack = lambda x: x.transpose(1, 2).reshape(b * t, h, d)  # noqa: E731  (B*T, H, D)
    out = flash_attn_varlen_func(pack(q), pack(k), pack(v), mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen,
                                 mask.max_seqlen, dropout_p=dropout, softmax_scale=scale, causal=True)
    return out.reshape(b, t, h, d).transpose(1, 2)  # (B, H, T, D)


BACKENDS = {"sdpa": sdpa, "flex": flex, "flash": flash}
