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


def sample_next(logits: Tensor, cfg: SamplingConfig, u: Tensor) -> Tensor:
    """logits (B, V), ``u`` (B,) uniforms in [0, 1) -> the next token of every row (B,): the most likely one when
    greedy, else an inverse-CDF draw from the softmax at ``temperature`` over the tokens top-k and top-p keep (as
    :func:`filter_logits` keeps them). A row's token depends only on its own logits and its own ``u``, never on the
    rows batched with it, so a prompt gets the same sample whichever batch, rank or machine generates it."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    sorted_logits, order = torch.sort(logits / cfg.temperature, descending=True, dim=-1)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    cum = probs.cumsum(dim=-1)  # (B, V)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if cfg.top_k > 0:
        keep[:, cfg.top_k:] = False
    if cfg.top_p < 1.0:
        keep &= cum - probs < cfg.top_p  # the first token past the threshold stays
    kept = keep.sum(dim=-1, keepdim=True)  # (B, 1): a prefix of the sorted tokens
    total = cum.gather(1, kept - 1)  # (B, 1): its probability mass
    idx = torch.searchsorted(cum, u[:, None].to(cum.dtype) * total, right=True)  # (B, 1)
    return order.gather(1, torch.minimum(idx, kept - 1)).squeeze(1)


def _full_logits(model: CodeGeeXModel, logits: Tensor) -> Tensor:
    """Vocab-parallel (B, V/tp) -> full (B, V) on every rank."""
    if model.pc.tp_size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(model.pc.tp_size)]  # megatron's gather allocates on CUDA
    dist.all_gather(parts, logits.contiguous(), group=model.pc.tp_group)
    return torch.cat(parts, dim=-1)


def row_uniforms(seeds: Sequence[int], steps: int) -> np.ndarray:
    """(B, steps) uniforms in [0, 1): row i's from its own generator seeded ``seeds[i]`` (NumPy's PCG64, the same on
    every platform), drawn on the host once per batch."""
    return np.stack([np.random.default_rng(s).random(steps) for s in seeds]) if steps else np.zeros((len(seeds), 0))


@dataclass
class _Rows:
    """The rows of a batch still generating, on the device; ``index`` maps them to the caller's prompts."""

    index: list[int]
    segments: Tensor  # (B, Tmax): -1 on left padding, 0 on the prompt and everything generated
    prefix: Tensor | None  # (B, Tmax) bool: the bidirectional docstring prefix (prompt positions only)
    uniforms: Tensor  # (B, steps)
    positions: Tensor  # (B, 1): the position of the token fed next

    def keep(self, alive: list[int], cache: KVCache, tokens: Tensor) -> Tensor:
        """Drop the finished rows (``alive``: the places of the rows to keep) from the batch and the cache; returns
        ``tokens`` (B, 1) of the kept rows."""
        rows = to_device(np.asarray(alive, dtype=np.int64), self.segments.device)
        cache.keep(rows)
        self.index = [self.index[a] for a in alive]
        self.segments, self.uniforms, self.positions = (t[rows] for t in (self.segments, self.uniforms, self.positions))
        if self.prefix is not None:
            self.prefix = self.prefix[rows]
        return tokens[rows]


def _prepare(model: CodeGeeXModel, prompts: Sequence[Sequence[int]], steps: int, pad_id: int,
             modality: Sequence[Sequence[int]] | None, prefix_lm: bool,
             seeds: Sequence[int]) -> tuple[Tensor, Tensor, Tensor | None, _Rows]:
    """Left-padded prompt tokens and positions (B, L), their TEXT flags (B, L) and the batch's rows, built on the
    host and copied to the device once."""
    device = next(model.parameters()).device
    b, longest = len(prompts), max(len(p) for p in prompts)
    host_tokens = np.full((b, longest), pad_id, dtype=np.int64)  # (B, L)
    host_seg = np.zeros((b, longest + steps), dtype=np.int64)  # (B, Tmax)
    host_flags = np.zeros((b, longest + steps), dtype=np.int64)
    for i, p in enumerate(prompts):
        host_tokens[i, longest - len(p):longest], host_seg[i, :longest - len(p)] = list(p), -1
        if modality is not None and len(modality[i]):
            host_flags[i, longest - len(modality[i]):longest] = list(modality[i])
    tokens, seg = to_device(host_tokens, device), to_device(host_seg, device)
    flags = to_device(host_flags, device) if modality is not None else None
    positions = ((seg[:, :longest] >= 0).long().cumsum(dim=1) - 1).clamp(min=0)  # (B, L): 0 from a prompt's start
    text = None if flags is None else (flags[:, :longest] & TEXT) != 0
    prefix = None if flags is None or not prefix_lm else (flags & PREFIX) != 0
    rows = _Rows(list(range(b)), seg, prefix, to_device(row_uniforms(seeds, steps), device), positions[:, -1:])
    return tokens, positions, text, rows


@torch.no_grad()
def generate(
    model: CodeGeeXModel, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, pad_id: int, eod_id: int | None = None,
    stop: Callable[[int, list[int]], bool] | None = None, vocab_limit: int | None = None,
    modality: Sequence[Sequence[int]] | None = None, prefix_lm: bool = False,
    interrupt: Callable[[], None] | None = None, seeds: Sequence[int] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt. Generation of a prompt ends at ``eod_id``, when ``stop(i, new_tokens)`` says so
    (the caller's per-language rules), or after ``max_new_tokens``. ``vocab_limit``: the tokenizer's size, when the
    model's vocabulary is padded beyond it (ids past it are never produced). ``modality``: per prompt token, the
    store's flags (:mod:`data_pipeline.pairs`): TEXT tokens go to a separated docstring table, and with ``prefix_lm``
    the PREFIX tokens attend to each other both ways, as PREFIX-CODE-CLM trained; generated tokens are code.
    ``interrupt``: called before each decoding step; what it raises abandons the batch (a requested stop).
    ``seeds``: one per prompt, the seed of its own sampling stream (default: ``cfg.seed`` and the prompt's place).

    The KV cache is allocated once for the longest prompt plus the steps; each step runs the model on one new token
    per row and reads the chosen tokens back to the host once (the step's only host sync). Rows that finished leave
    the batch once a quarter of it has finished, so the rest run on a smaller batch."""
    model.eval()
    longest = max(len(p) for p in prompts)
    steps = max(0, min(cfg.max_new_tokens, model.cfg.max_position_embeddings - longest + 1))
    seeds = list(seeds) if seeds is not None else [cfg.seed * 1_000_003 + i for i in range(len(prompts))]
    tokens, positions, text, rows = _prepare(model, prompts, steps, pad_id, modality, prefix_lm, seeds)
    cache = model.new_cache(len(prompts), longest + steps)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(steps):
        if interrupt is not None:
            interrupt()
        tk = longest + step  # key positions once this step's are cached
        mask = MaskInfo(rows.segments[:, :tk], None if rows.prefix is None else rows.prefix[:, :tk])
        logits, _ = model(tokens, positions, mask, cache, text=text if step == 0 else None, last_only=True)
        last = _full_logits(model, logits[:, -1].float())  # (B, V)
        if vocab_limit is not None and vocab_limit < last.shape[-1]:
            last[:, vocab_limit:] = float("-inf")
        nxt = sample_next(last, cfg, rows.uniforms[:, step])  # (B,)
        for place, t in enumerate(nxt.tolist()):  # the step's one host sync
            i = rows.index[place]
            if done[i]:
                continue
            if eod_id is not None and t == eod_id:
                done[i] = True
                continue
            out[i].append(t)
            done[i] = stop is not None and stop(i, out[i])
        alive = [place for place, i in enumerate(rows.index) if not done[i]]
        if not alive:
            break
        tokens, rows.positions = nxt[:, None], rows.positions + 1  # (B, 1) each: the token fed next, its position
        if len(alive) <= 3 * len(rows.index) // 4:
            tokens = rows.keep(alive, cache, tokens)
        positions = rows.positions
    return out


def generate_text(checkpoint: str | Path, prompts: Sequence[str], cfg: SamplingConfig,
                  tokenizer: str | Path | None = None) -> list[str]:
    """Each prompt followed by its completion, sampled in this process (TP=1) from a checkpoint (a run, checkpoints,
    step-N or model directory), with ``tokenizer`` (default: the one the checkpoint carries)."""
    from megatron_code.checkpoint import resolve_model_dir

    ckpt = resolve_model_dir(checkpoint)
    tok_path = read_manifest(ckpt).tokenizer_path(tokenizer, ckpt)
    tok = CodeTokenizer(tok_path)
    model = load_model(ckpt, single_context())
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {tok.vocab_size} pieces, more than the model's vocab_size "
                         f"({model.cfg.vocab_size})")
    outs = generate(model, [tok.encode(p) for p in prompts], cfg, pad_id=tok.pad_id, eod_id=tok.eod_id,
                    vocab_limit=tok.vocab_size)
    return [prompt + tok.decode(out) for prompt, out in zip(prompts, outs, strict=True)]
