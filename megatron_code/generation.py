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
from data_pipeline.tokenizer import check_vocab_fits, load_tokenizer
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
    if cfg.top_k > 0:  # top-p then applies to the top-k tokens' own softmax, as filter_logits (and HF, vLLM) do
        sorted_logits[:, cfg.top_k:] = float("-inf")
    probs = torch.softmax(sorted_logits, dim=-1)
    cum = probs.cumsum(dim=-1)  # (B, V)
    keep = probs > 0  # never a masked token (top-k, vocab_limit), however close to 1 a draw is
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


def _groups(lengths: list[int], most: int = 4) -> list[list[int]]:
    """Places 0..n-1 split into at most ``most`` groups of similar ``lengths`` (sorted, consecutive): a prefill pads
    each group only to its own longest prompt. One group for a small batch or equal lengths."""
    order = sorted(range(len(lengths)), key=lambda j: lengths[j])
    if len(order) < 2 * most or lengths[order[0]] == lengths[order[-1]]:
        return [order]
    size = -(-len(order) // most)
    return [order[i:i + size] for i in range(0, len(order), size)]


def _prefill(model: CodeGeeXModel, prompts: Sequence[Sequence[int]], modality: Sequence[Sequence[int]] | None,
             tokens: Tensor, positions: Tensor, text: Tensor | None, rows: _Rows,
             capacity: int) -> tuple[KVCache, Tensor]:
    """The prompts (B, L) through the model into a new cache of ``capacity`` positions: (the cache, a row per prompt;
    the last position's logits (B, 1, V/tp)). Identical prompts (the n samples of one task) are computed once and
    their keys and values copied to each of their rows; the others go in groups of similar length, so that short
    prompts are not padded to the longest."""
    longest, device = tokens.shape[1], tokens.device
    same = [(tuple(p), tuple(modality[i]) if modality is not None else ()) for i, p in enumerate(prompts)]
    first: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    of_row = [first.setdefault(key, i) for i, key in enumerate(same)]  # each row's first row with its prompt
    reps = sorted(set(of_row))
    cache = model.new_cache(len(reps), capacity)
    parts = []
    for group in _groups([len(prompts[r]) for r in reps]):
        span = max(len(prompts[reps[j]]) for j in group)
        src = to_device(np.asarray([reps[j] for j in group], dtype=np.int64), device)  # (G,) rows of the batch
        cols = slice(longest - span, longest)
        cache.write_rows(to_device(np.asarray(group, dtype=np.int64), device), longest - span)
        mask = MaskInfo(rows.segments[src, cols], None if rows.prefix is None else rows.prefix[src, cols])
        logits, _ = model(tokens[src, cols], positions[src, cols], mask, cache,
                          text=None if text is None else text[src, cols], last_only=True)  # (G, 1, V/tp)
        parts.append((group, logits))
    cache.write_rows(None, length=longest)
    if len(reps) < len(prompts):  # cache row j holds prompt reps[j]: a row for every prompt of the batch
        cache_row = {r: j for j, r in enumerate(reps)}
        cache.keep(to_device(np.asarray([cache_row[r] for r in of_row], dtype=np.int64), device))
    order = [reps[j] for group, _ in parts for j in group]  # the prompt of each row of the logits below
    logits = torch.cat([lg for _, lg in parts]) if len(parts) > 1 else parts[0][1]  # (U, 1, V/tp)
    if order == list(range(len(prompts))):
        return cache, logits
    place = {r: i for i, r in enumerate(order)}
    return cache, logits[to_device(np.asarray([place[r] for r in of_row], dtype=np.int64), device)]  # (B, 1, V/tp)


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
    per row and reads the chosen tokens back to the host once (the step's only host sync). Identical prompts are
    prefilled once. Rows that finished leave the batch once a quarter of it has finished, so the rest run on a
    smaller batch."""
    model.eval()
    longest, max_pos = max(len(p) for p in prompts), model.cfg.max_position_embeddings
    if longest > max_pos:
        raise ValueError(f"a prompt of {longest} tokens does not fit the model's max_position_embeddings ({max_pos})")
    limits = [max(0, min(cfg.max_new_tokens, max_pos - len(p) + 1)) for p in prompts]  # each row's own, batch-free
    steps = max(limits)
    seeds = list(seeds) if seeds is not None else [cfg.seed * 1_000_003 + i for i in range(len(prompts))]
    tokens, positions, text, rows = _prepare(model, prompts, steps, pad_id, modality, prefix_lm, seeds)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    if steps == 0:
        return out
    if interrupt is not None:
        interrupt()
    cache, logits = _prefill(model, prompts, modality, tokens, positions, text, rows, longest + steps)
    for step in range(steps):
        if step:
            if interrupt is not None:
                interrupt()
            tk = longest + step  # key positions once this step's are cached
            mask = MaskInfo(rows.segments[:, :tk], None if rows.prefix is None else rows.prefix[:, :tk])
            logits, _ = model(tokens, positions, mask, cache, last_only=True)  # (B, 1, V/tp)
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
            done[i] = len(out[i]) >= limits[i] or (stop is not None and stop(i, out[i]))
        alive = [place for place, i in enumerate(rows.index) if not done[i]]
        if not alive:
            break
        # (B, 1) each: the token fed next and its position (a finished row's, until it leaves, kept in the table)
        tokens, rows.positions = nxt[:, None], (rows.positions + 1).clamp(max=max_pos - 1)
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
    tok = load_tokenizer(tok_path)
    model = load_model(ckpt, single_context())
    check_vocab_fits(tok, model.cfg.vocab_size)
    outs = generate(model, [tok.encode(p) for p in prompts], cfg, pad_id=tok.pad_id, eod_id=tok.eod_id,
                    vocab_limit=tok.vocab_size)
    return [prompt + tok.decode(out) for prompt, out in zip(prompts, outs, strict=True)]
