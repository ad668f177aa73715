"""The model's elementwise work, plain and fused.

    bias_fast_gelu(x, b)             FastGELU(x + b) = y * sigmoid(1.702 y), y = x + b    (the MLP's first half)
    bias_dropout_add(x, b, r, p)     r + dropout(x + b, p)                                (after attention and MLP)

The linear layers hand their bias back unapplied (``skip_bias_add``) so it joins these. On a GPU each runs as one
kernel compiled by ``torch.compile`` (inductor), which reads x once and writes once instead of once per operation;
on the CPU the plain path runs (the same formulas; tests/test_model.py compares both on the CPU). The plain FastGELU
saves only its input for backward (autograd's own version would also keep the sigmoid).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class _FastGELU(torch.autograd.Function):
    """x * sigmoid(1.702 x), saving only x for backward."""

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


def bias_fast_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """x (..., F), bias (F,) -> FastGELU(x + bias) (..., F)."""
    return fast_gelu(x + bias)


def bias_dropout_add(x: Tensor, bias: Tensor, residual: Tensor, p: float, training: bool) -> Tensor:
    """x, residual (..., C), bias (C,) -> residual + dropout(x + bias) (..., C)."""
    return residual + F.dropout(x + bias, p, training)


def _bias_fast_gelu_formula(x: Tensor, bias: Tensor) -> Tensor:
    y = x + bias
    return y * torch.sigmoid(1.702 * y)


_COMPILED: dict[str, Callable[..., Tensor]] = {}


def compiled(name: str) -> Callable[..., Tensor]:
    """The fused (``torch.compile``d) version of ``bias_fast_gelu`` or ``bias_dropout_add``, compiled once per
    process on first use."""
    if name not in _COMPILED:
        fn: Any = {"bias_fast_gelu": _bias_fast_gelu_formula, "bias_dropout_add": bias_dropout_add}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=None)  # a second shape makes it shape-generic: no recompiles
    return _COMPILED[name]


def elementwise(fused: bool) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """(bias_fast_gelu, bias_dropout_add): compiled when ``fused``, else plain."""
    if fused:
        return compiled("bias_fast_gelu"), compiled("bias_dropout_add")
    return bias_fast_gelu, bias_dropout_add
