"""Batched sampling with a KV cache, under tensor parallelism.

Prompts of different lengths are left-padded: padding gets segment id -1 (never attended to by real tokens) and
positions start at 0 on each prompt's first real token. Every tensor-parallel rank gathers the full-vocabulary
logits of the last position and samples with the same seeded generator, so all ranks pick the same token.

:func:`generate_text` is the quick look of ``codegeex model generate``: text in, text out, from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from common.config import option
from data_pipeline.packing import PREFIX, TEXT
from data_pipeline.tokenizer import CodeTokenizer
from megatron_code.attention import MaskInfo, to_device
from megatron_code.checkpoint import load_model, read_manifest
from megatron_code.model import CodeGeeXModel, KVCache
from megatron_code.parallel import single_context


@dataclass
class SamplingConfig:
    """How tokens are chosen."""

    max_new_tokens: int = option(128, "tokens to generate at most per prompt")
    greedy: bool = option(False, "take the most likely token (temperature, top-p and top-k are then ignored)")
    temperature: float = option(0.8, "softmax temperature")
    top_p: float = option(0.95, "nucleus sampling: smallest set of tokens with at least this probability (1: off)")
    top_k: int = option(0, "sample among the k most likely tokens (0: off)")
    seed: int = option(1234, "seed of the sampling generator (same on every tensor-parallel rank)")

    def validate(self) -> None:
        if self.temperature <= 0 and not self.greedy:
            raise ValueError(f"temperature ({self.temperature}) must be positive (or set greedy=true)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p ({self.top_p}) must be in (0, 1]")


def filter_logits(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """logits (B, V) -> logits with the tokens outside top-k / top-p set to -inf."""
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= cfg.top_p  # keep the first token past the threshold
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def _full_logits(model: CodeGeeXModel, logits: Tensor) -> Tensor:
    """Vocab-parallel (B, V/tp) -> full (B, V) on every rank."""
    if model.pc.tp_size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(model.pc.tp_size)]  # megatron's gather allocates on CUDA
    dist.all_gather(parts, logits.contiguous(), group=model.pc.tp_group)
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def generate(
    model: CodeGeeXModel, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, pad_id: int, eod_id: int | None = None,
    stop: Callable[[int, list[int]], bool] | None = None, vocab_limit: int | None = None,
    modality: Sequence[Sequence[int]] | None = None, prefix_lm: bool = False,
    interrupt: Callable[[], None] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt. Generation of a prompt ends at ``eod_id``, when ``stop(i, new_tokens)`` says so
    (the caller's per-language rules), or after ``max_new_tokens``. ``vocab_limit``: the tokenizer's size, when the
    model's vocabulary is padded beyond it (ids past it are never produced). ``modality``: per prompt token, the
    store's flags (:mod:`data_pipeline.pairs`): TEXT tokens go to a separated docstring table, and with ``prefix_lm``
    the PREFIX tokens attend to each other both ways, as PREFIX-CODE-CLM trained; generated tokens are code.
    ``interrupt``: called before each decoding step; what it raises abandons the batch (a requested stop)."""
    model.eval()
    device = next(model.parameters()).device
    b, longest = len(prompts), max(len(p) for p in prompts)
    host_tokens = np.full((b, longest), pad_id, dtype=np.int64)  # (B, T): built on the host, copied once
    host_seg = np.full((b, longest), -1, dtype=np.int64)
    host_pos = np.zeros((b, longest), dtype=np.int64)
    for i, p in enumerate(prompts):
        n = len(p)
        host_tokens[i, longest - n:], host_seg[i, longest - n:], host_pos[i, longest - n:] = list(p), 0, np.arange(n)
    tokens, seg, pos = (to_device(a, device) for a in (host_tokens, host_seg, host_pos))
    text, prefix = _prompt_flags(modality, b, longest, device, prefix_lm)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * b
    cache: KVCache = []  # an empty cache: generation from the first step (the cache use's attention)
    step_tokens, step_pos = tokens, pos
    next_position = max(len(p) for p in prompts)  # the largest position of the next step, known on the host
    new_col = torch.zeros((b, 1), dtype=torch.long, device=device)  # a new token's segment (0) and flags (off)
    for _ in range(cfg.max_new_tokens):
        if interrupt is not None:
            interrupt()
        if next_position - 1 >= model.cfg.max_position_embeddings:
            break  # no learned position beyond this
        logits, cache = model(step_tokens, step_pos, MaskInfo(seg, prefix), cache, text=text)  # (B, T, V/tp)
        last = _full_logits(model, logits[:, -1].float())  # (B, V)
        if vocab_limit is not None and vocab_limit < last.shape[-1]:
            last[:, vocab_limit:] = float("-inf")
        if cfg.greedy:
            nxt = last.argmax(dim=-1)
        else:
            probs = torch.softmax(filter_logits(last, cfg), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        for i, t in enumerate(nxt.tolist()):  # the token's one host sync
            if done[i]:
                continue
            if eod_id is not None and t == eod_id:
                done[i] = True
                continue
            out[i].append(t)
            if stop is not None and stop(i, out[i]):
                done[i] = True
        if all(done):
            break
        step_tokens = nxt[:, None]
        step_pos = step_pos[:, -1:] + 1
        next_position += 1
        seg = torch.cat([seg, new_col], dim=1)
        text = None if text is None else new_col.bool()
        if prefix is not None:
            prefix = torch.cat([prefix, new_col.bool()], dim=1)
    return out


def _prompt_flags(modality: Sequence[Sequence[int]] | None, b: int, longest: int, device: torch.device,
                  prefix_lm: bool) -> tuple[Tensor | None, Tensor | None]:
    """Left-padded (B, longest) TEXT and PREFIX masks of the prompts (padding: neither)."""
    if modality is None:
        return None, None
    host = np.zeros((b, longest), dtype=np.int64)
    for i, m in enumerate(modality):
        if len(m):
            host[i, longest - len(m):] = list(m)
    flags = to_device(host, device)  # (B, T)
    return (flags & TEXT) != 0, ((flags & PREFIX) != 0) if prefix_lm else None


def generate_text(checkpoint: str | Path, prompts: Sequence[str], cfg: SamplingConfig,
                  tokenizer: str | Path | None = None) -> list[str]:
    """Each prompt followed by its completion, sampled in this process (TP=1) from a checkpoint directory, with
    ``tokenizer`` (default: the one the checkpoint names)."""
    tok_path = read_manifest(checkpoint).tokenizer_path(tokenizer, checkpoint)
    tok = CodeTokenizer(tok_path)
    model = load_model(checkpoint, single_context())
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {tok.vocab_size} pieces, more than the model's vocab_size "
                         f"({model.cfg.vocab_size})")
    outs = generate(model, [tok.encode(p) for p in prompts], cfg, pad_id=tok.pad_id, eod_id=tok.eod_id,
                    vocab_limit=tok.vocab_size)
    return [prompt + tok.decode(out) for prompt, out in zip(prompts, outs, strict=True)]
