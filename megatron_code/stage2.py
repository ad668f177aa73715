"""Stage 2 of modality-relative pre-training: start a model with separated embeddings from a stage-1 checkpoint.

:func:`init_from_checkpoint` loads a checkpoint's weights (resharded to this TP size) and, when the checkpoint has
no separation and the model has some, copies the docstring table, or rows, from the trained shared table: right
after separation the model computes exactly what stage 1 computed (tested). Partial separation (PES) separates
the language's grammar keywords and built-in names (:func:`keyword_token_ids`, :func:`fill_separated_ids`).

The separated-embedding modules themselves are in :mod:`megatron_code.modality`.
"""

from __future__ import annotations

import builtins
import keyword
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from common.config import ConfigError, to_dict
from common.contracts import CheckpointManifest, StoreManifest
from common.integrity import CorruptCheckpointError
from megatron_code.checkpoint import (
    load_parameters,
    load_shard,
    model_config,
    read_manifest,
    resolve_model_dir,
    verify_together,
)
from megatron_code.config import ModelConfig
from megatron_code.modality import FullSeparation
from megatron_code.model import CodeGeeXModel
from megatron_code.parallel import collective_device

SEPARATION_FIELDS = ("embedding_separation", "separated_token_ids")
FREE_FIELDS = SEPARATION_FIELDS + ("hidden_dropout", "attention_dropout", "attention_backend", "params_dtype",
                                    "sequence_parallel", "fused_elementwise")


# --- which tokens PES separates -------------------------------------------------------------------------------------

def python_names() -> list[str]:
    """Python's keywords (the grammar's, soft ones included) and built-in functions and constants."""
    names = set(keyword.kwlist) | set(keyword.softkwlist)
    names |= {n for n in dir(builtins) if not n.startswith("_") and not (n[0].isupper() and n.endswith(("Error",
                                                                                                         "Warning")))}
    return sorted(names)


def grammar_keywords(language: str) -> list[str]:
    """A tree-sitter grammar's keywords: its anonymous node kinds that are words (``func``, ``return``, ...)."""
    from data_pipeline.languages import load_grammar

    grammar = load_grammar(language)
    if grammar is None:
        return []
    kinds = {grammar.node_kind_for_id(i) or "" for i in range(grammar.node_kind_count)
             if not grammar.node_kind_is_named(i) and grammar.node_kind_is_visible(i)}
    return sorted(k for k in kinds if k.isidentifier())


def keyword_token_ids(tokenizer_path: str | Path, languages: Iterable[str]) -> list[int]:
    """Vocabulary pieces that are exactly a keyword or built-in name of one of ``languages`` (with or without the
    leading word-boundary mark)."""
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    names: set[str] = set()
    for lang in languages:
        names |= set(python_names() if lang == "Python" else grammar_keywords(lang))
    # SentencePiece marks a word boundary with U+2581, byte-level BPE with U+0120 (its spelling of a space)
    ids = [i for i, piece in enumerate(tok.pieces(range(tok.vocab_size)))
           if piece.removeprefix("\u2581").removeprefix("\u0120") in names]
    if not ids:
        raise ConfigError(f"tokenizer {tokenizer_path}: no piece is a keyword of {sorted(languages)}")
    return ids


def fill_separated_ids(cfg: ModelConfig, manifest: StoreManifest) -> None:
    """Partial separation without ids: the keywords and built-ins of the store's languages in its tokenizer."""
    if cfg.embedding_separation != "partial" or cfg.separated_token_ids:
        return
    languages = [name for name, counts in manifest.languages.items() if counts.pairs]
    cfg.separated_token_ids = keyword_token_ids(manifest.tokenizer.path, languages or ["Python"])


# --- stage 2 ----------------------------------------------------------------------------------------------------------

def check_compatible(source: ModelConfig, target: ModelConfig, path: str | Path) -> None:
    """The stage-1 model must have the stage-2 model's shape (separation aside)."""
    a, b = to_dict(source), to_dict(target)
    diff = [f"{k} ({a[k]} in {path}, {b[k]} here)" for k in a if k not in FREE_FIELDS and a[k] != b[k]]
    if diff:
        raise ConfigError(f"init_from {path}: the model differs: {'; '.join(diff)}")


@torch.no_grad()
def init_from_checkpoint(model: CodeGeeXModel, path: str | Path, new_rows: list[int] | None = None,
                         vocab: int = 0) -> CheckpointManifest:
    """Load a checkpoint's weights into ``model`` (any TP size), separating the embeddings if the checkpoint has
    none and the model has some; returns the checkpoint's manifest. ``new_rows``: token ids the checkpoint never
    trained (the store's markers), set to the mean of its rows below ``vocab`` (the tokenizer's size) when the
    checkpoint was converted from another code base (``converted_from``: a released model)."""
    try:
        path = resolve_model_dir(path)
    except FileNotFoundError as exc:
        raise ConfigError(f"init_from: {exc}") from None
    manifest = read_manifest(path)
    source = model_config(manifest)
    check_compatible(source, model.cfg, path)
    if source.embedding_separation not in ("none", model.cfg.embedding_separation):
        raise ConfigError(f"init_from {path}: its embeddings are separated ({source.embedding_separation}); this "
                          f"model's separation is {model.cfg.embedding_separation}")
    problems = verify_together(path, manifest.files)  # each rank a share, not every rank every shard
    if problems:
        raise CorruptCheckpointError(f"init_from {path} is corrupt: " + "; ".join(problems))
    state = load_shard(path, model.pc.tp_rank, model.pc.tp_size)
    if new_rows and manifest.converted_from:
        _mean_rows(model, state["word_embeddings.weight"], new_rows, vocab)
    if model.docstring_embeddings is not None and not any(k.startswith("docstring_embeddings.") for k in state):
        _separate(model, state)
    load_parameters(model, state, str(path))
    return manifest


def _separate(model: CodeGeeXModel, state: dict[str, Tensor]) -> None:
    """Add the docstring table, or rows, to a stage-1 ``state`` (this rank's shard), copied from the shared table."""
    pc = model.pc
    shared = state["word_embeddings.weight"]  # (V/tp, C): this rank's rows of the trained table
    if isinstance(model.docstring_embeddings, FullSeparation):
        state["docstring_embeddings.table.weight"] = shared.clone()  # (V/tp, C)
        return
    start = pc.tp_rank * shared.shape[0]
    ids = torch.tensor(model.cfg.separated_token_ids, dtype=torch.long, device=shared.device)  # (S,)
    local = (ids >= start) & (ids < start + shared.shape[0])  # (S,): the ids whose rows this rank holds
    rows = torch.zeros(len(ids), shared.shape[1], dtype=torch.float32, device=shared.device)  # (S, C)
    rows[local] = shared[ids[local] - start].float()
    if pc.tp_size > 1:  # every rank contributes the rows it holds, on the device the group's backend works on
        on_group = rows.to(collective_device(pc.tp_group))
        dist.all_reduce(on_group, group=pc.tp_group)
        rows = on_group.to(shared.device)
    state["docstring_embeddings.rows"] = rows.to(shared.dtype)  # (S, C)


def _mean_rows(model: CodeGeeXModel, table: Tensor, ids: list[int], vocab: int) -> None:
    """Rows ``ids`` of the word embedding (``table``: this rank's shard, changed in place) become the mean of the
    rows below ``vocab`` that are not among them (Hewitt, 2021: a new token's logit starts at the average one, so the
    model's distribution barely moves). The output layer is tied to this table, so its logits move with it."""
    pc = model.pc
    start = pc.tp_rank * table.shape[0]
    rows = torch.arange(start, start + table.shape[0], device=table.device)  # (V/tp,): the ids this rank holds
    fresh = torch.isin(rows, torch.tensor(ids, dtype=torch.long, device=table.device))  # (V/tp,)
    trained = (rows < vocab) & ~fresh  # (V/tp,)
    part = torch.cat([table[trained].float().sum(0), trained.sum().float()[None]])  # (C + 1,): sum of rows, count
    if pc.tp_size > 1:
        on_group = part.to(collective_device(pc.tp_group))
        dist.all_reduce(on_group, group=pc.tp_group)
        part = on_group.to(table.device)
    table[fresh] = (part[:-1] / part[-1].clamp(min=1)).to(table.dtype)  # (C,) broadcast over the fresh rows
