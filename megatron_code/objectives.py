"""From a packed batch to model inputs, attention masks and the loss.

A window of ``W = seq_len + 1`` tokens gives inputs ``tokens[:, :-1]`` and labels ``tokens[:, 1:]``. Position ids and
segment ids restart at every document start. The loss counts label position t when it is a real token (not padding)
of the same document as the input at t: the end-of-document token is never asked to predict the next document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from torch import Tensor

from megatron_code.attention import MaskInfo
from megatron_code.parallel import ParallelContext


@dataclass
class ModelInputs:
    tokens: Tensor  # (B, T)
    labels: Tensor  # (B, T)
    position_ids: Tensor  # (B, T)
    mask: MaskInfo
    loss_mask: Tensor  # (B, T) float


def prepare_batch(batch: dict[str, np.ndarray], device: torch.device | str = "cpu") -> ModelInputs:
    """The sampler's numpy batch (tokens, position_ids, document_ids, num_tokens) -> model inputs."""
    tokens = torch.as_tensor(batch["tokens"], dtype=torch.long, device=device)  # (B, W)
    seg = torch.as_tensor(batch["document_ids"], dtype=torch.long, device=device)  # (B, W)
    pos = torch.as_tensor(batch["position_ids"], dtype=torch.long, device=device)  # (B, W)
    num = torch.as_tensor(batch["num_tokens"], dtype=torch.long, device=device)  # (B,)
    w = tokens.shape[1]
    real = torch.arange(w, device=device)[None, :] < num[:, None]  # (B, W)
    loss_mask = (real[:, 1:] & (seg[:, 1:] == seg[:, :-1])).float()  # (B, T)
    return ModelInputs(tokens[:, :-1], tokens[:, 1:], pos[:, :-1], MaskInfo(seg[:, :-1]), loss_mask)


class _VocabParallelCE(torch.autograd.Function):
    """megatron-core's vocab-parallel cross entropy, with the tensor-parallel group passed in."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, group: Any, rank: int) -> Tensor:
        # megatron-core's helpers work in place on an fp32 copy; fp32 logits are copied so the caller's stay intact
        logits = logits.float() if logits.dtype != torch.float32 else logits.clone()
        logits, logits_max = VocabParallelCrossEntropy.calculate_logits_max(logits)
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        part = logits.size(-1)
        start = rank * part
        target_mask, masked_target_1d, predicted, sum_exp, exp_logits = (
            VocabParallelCrossEntropy.calculate_predicted_logits(logits, target, logits_max, start, start + part))
        dist.all_reduce(predicted, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        softmax, loss = VocabParallelCrossEntropy.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None, None]:
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_2d, arange_1d, update, grad_input = VocabParallelCrossEntropy.prepare_gradient_calculation_operands(
            softmax, target_mask)
        grad = VocabParallelCrossEntropy.calculate_gradients(grad_2d, arange_1d, masked_target_1d, update, grad_input,
                                                             grad_output)
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, pc: ParallelContext) -> Tensor:
    """logits (B, T, V/tp), target (B, T) -> per-token loss (B, T) in fp32."""
    return _VocabParallelCE.apply(logits, target, pc.tp_group, pc.tp_rank)


def lm_loss(logits: Tensor, inputs: ModelInputs, pc: ParallelContext) -> tuple[Tensor, Tensor]:
    """(mean loss over the masked tokens, number of masked tokens)."""
    losses = vocab_parallel_cross_entropy(logits, inputs.labels, pc)  # (B, T)
    count = inputs.loss_mask.sum()
    return (losses * inputs.loss_mask).sum() / count.clamp(min=1), count
