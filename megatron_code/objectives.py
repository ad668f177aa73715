"""From a packed batch to model inputs, attention masks and the loss.

A window of ``W = seq_len + 1`` tokens gives inputs ``tokens[:, :-1]`` and labels ``tokens[:, 1:]``. Position ids and
segment ids restart at every document start. The loss counts label position t when it is a real token (not padding)
of the same document as the input at t: the end-of-document token is never asked to predict the next document.

Text-to-code objectives (PanGu-Coder), from the per-token modality flags of the store (:mod:`data_pipeline.pairs`):

    objective          inputs                          attention                      loss on labels that are
    text-code-clm      as stored                       causal                         every token
    code-clm           as stored                       causal                         code (not TEXT)
    corrupt-code-clm   CORRUPTIBLE tokens replaced     causal                         code (not TEXT)
    prefix-code-clm    as stored                       bidirectional inside PREFIX    outside the PREFIX

Corruption picks each docstring token with probability ``corrupt_share``, then replaces it by ``[MASK]`` (0.8), a
random token (0.1) or keeps it (0.1), from a generator seeded by (seed, source, store index): the same sample is
corrupted the same way on every run, so a resumed run is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from torch import Tensor

from common.contracts import StoreManifest
from data_pipeline.packing import CORRUPTIBLE, PREFIX, TEXT
from megatron_code.attention import MaskInfo, to_device
from megatron_code.parallel import ParallelContext


@dataclass
class ModelInputs:
    tokens: Tensor  # (B, T)
    labels: Tensor  # (B, T)
    position_ids: Tensor  # (B, T)
    mask: MaskInfo
    loss_mask: Tensor  # (B, T) float
    text: Tensor | None = None  # (B, T) bool: inputs embedded by the docstring table under embedding separation


@dataclass
class Objective:
    """An objective with what it needs at run time (from the store's tokenizer record)."""

    name: str = "text-code-clm"
    corrupt_share: float = 0.15
    seed: int = 0
    mask_id: int = -1
    vocab_size: int = 0


def make_objective(cfg: Any, manifests: list[tuple[str, StoreManifest]]) -> Objective:
    """The run's objective (``cfg``: a TrainConfig), checked against the training stores' manifests (path, manifest)."""
    name = cfg.objective.name
    if name != "text-code-clm":
        plain = [path for path, m in manifests if not m.has_modality]
        if plain:
            raise ValueError(f"objective.name {name} needs stores of text-to-code pairs with per-token modality; "
                             f"{plain[0]} has none (build it with extract.functions=true)")
    tokenizer = manifests[0][1].tokenizer
    if name == "corrupt-code-clm" and tokenizer.mask_id < 0:
        raise ValueError(f"objective.name corrupt-code-clm needs the [MASK] id in {manifests[0][0]}'s manifest "
                         "(tokenizer.mask_id); rebuild the store")
    return Objective(name, cfg.objective.corrupt_share, cfg.seed, tokenizer.mask_id, tokenizer.vocab_size)


def corrupt(tokens: np.ndarray, modality: np.ndarray, keys: np.ndarray, obj: Objective) -> np.ndarray:
    """tokens, modality (B, W); keys (B, 2) (source, store index) -> tokens with docstring tokens corrupted."""
    if obj.vocab_size <= 0 or obj.mask_id < 0:
        raise ValueError(f"corrupt-code-clm needs the tokenizer's vocab_size ({obj.vocab_size}) and [MASK] id "
                         f"({obj.mask_id})")
    out = tokens.copy()
    for b in range(len(tokens)):
        rng = np.random.default_rng([obj.seed, int(keys[b, 0]), int(keys[b, 1])])
        w = tokens.shape[1]
        pick, how, rand = rng.random(w), rng.random(w), rng.integers(0, obj.vocab_size, w)
        chosen = ((modality[b] & CORRUPTIBLE) != 0) & (pick < obj.corrupt_share)  # (W,)
        out[b] = np.where(chosen & (how < 0.8), obj.mask_id, np.where(chosen & (how < 0.9), rand, tokens[b]))
    return out


def prepare_batch(batch: dict[str, np.ndarray], device: torch.device | str = "cpu",
                  objective: Objective | None = None) -> ModelInputs:
    """The sampler's numpy batch (tokens, position_ids, document_ids, num_tokens, and modality and sample_keys for
    pairs) -> model inputs under ``objective`` (default: text-code-clm)."""
    obj = objective or Objective()
    modality = batch.get("modality")
    if modality is None and obj.name != "text-code-clm":
        raise ValueError(f"objective {obj.name} needs per-token modality: build the store with extract.functions=true")
    raw = batch["tokens"]
    if obj.name == "corrupt-code-clm" and modality is not None:
        raw = corrupt(raw, modality, batch["sample_keys"], obj)
    docs = np.asarray(batch["document_ids"])
    w = docs.shape[1]
    # masks built on the host from the sampler's arrays; each array crosses to the device once, asynchronously
    real = np.arange(w)[None, :] < np.asarray(batch["num_tokens"])[:, None]  # (B, W)
    keep = real[:, 1:] & (docs[:, 1:] == docs[:, :-1])  # (B, T)
    prefix = None
    if modality is not None:
        mod = np.asarray(modality).astype(np.int64)  # (B, W)
        if obj.name in ("code-clm", "corrupt-code-clm"):
            keep &= (mod[:, 1:] & TEXT) == 0
        elif obj.name == "prefix-code-clm":
            keep &= (mod[:, 1:] & PREFIX) == 0
            prefix = to_device((mod[:, :-1] & PREFIX) != 0, device)  # (B, T)
    tokens = to_device(np.asarray(raw, dtype=np.int64)[:, :-1], device)  # (B, T)
    labels = to_device(np.asarray(batch["tokens"], dtype=np.int64)[:, 1:], device)  # (B, T): never corrupted
    pos = to_device(np.asarray(batch["position_ids"], dtype=np.int64)[:, :-1], device)  # (B, T)
    mask = MaskInfo.from_documents(docs[:, :-1], device, prefix)
    text = None if modality is None else to_device((mod[:, :-1] & TEXT) != 0, device)  # (B, T)
    return ModelInputs(tokens, labels, pos, mask, to_device(keep.astype(np.float32), device), text)


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
