"""Modality-relative embeddings (PanGu-Coder): docstring tokens and code tokens embedded by different tables.

- full (FES): a second vocab-parallel table for every token in the docstring part (the TEXT flag of the store);
- partial (PES): own docstring rows only for ``separated_token_ids`` (the language's grammar keywords and built-in
  names, see :func:`keyword_token_ids`); every other docstring token uses the shared table. The rows are a small
  replicated table: every tensor-parallel rank gets the same gradient for it (as for the position embeddings).

The output layer stays tied to the code (original) table: the loss of the modality-relative objectives is on code,
generation produces code, and the code table is the one stage 1 trained as both input and output.

Stage 2 starts from a stage-1 checkpoint (:func:`init_from_checkpoint`): weights are loaded (resharded to this TP
size) and the docstring table, or rows, are copied from the trained shared table, so right after separation the
model computes exactly what stage 1 computed (tested).
"""

from __future__ import annotations

import builtins
import keyword
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import VocabParallelEmbedding
from torch import Tensor, nn

from common.config import ConfigError, to_dict
from common.contracts import CheckpointManifest, StoreManifest
from megatron_code.config import ModelConfig
from megatron_code.parallel import ParallelContext

if TYPE_CHECKING:
    from megatron_code.model import CodeGeeXModel


class FullSeparation(nn.Module):
    """A second vocab-parallel table for docstring tokens."""

    def __init__(self, cfg: ModelConfig, pc: ParallelContext, mp: ModelParallelConfig, init: Any) -> None:
        super().__init__()
        self.table = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, init_method=init, config=mp,
                                            tp_group=pc.tp_group)

    def blend(self, x: Tensor, tokens: Tensor, text: Tensor) -> Tensor:
        """x (B, T, C) from the code table -> docstring positions (text (B, T)) from this table."""
        return torch.where(text[..., None], self.table(tokens), x)  # (B, T, C)


class PartialSeparation(nn.Module):
    """Own docstring rows for a few token ids (replicated); ``index`` maps a token id to its row or -1."""

    def __init__(self, cfg: ModelConfig, params_dtype: torch.dtype) -> None:
        super().__init__()
        if not cfg.separated_token_ids:
            raise ConfigError("model.embedding_separation 'partial' needs model.separated_token_ids (stage 2 fills "
                              "them from the tokenizer when init_from is set)")
        ids = torch.tensor(cfg.separated_token_ids, dtype=torch.long)
        index = torch.full((cfg.vocab_size,), -1, dtype=torch.long)
        index[ids] = torch.arange(len(ids))
        self.index: Tensor
        self.register_buffer("index", index, persistent=False)  # rebuilt from the config, not checkpointed
        self.rows = nn.Parameter(torch.zeros(len(ids), cfg.hidden_size, dtype=params_dtype))
        nn.init.normal_(self.rows, std=cfg.init_method_std)

    def blend(self, x: Tensor, tokens: Tensor, text: Tensor) -> Tensor:
        row = self.index[tokens]  # (B, T), -1 where the token has no own row
        use = text & (row >= 0)
        return torch.where(use[..., None], F.embedding(row.clamp(min=0), self.rows), x)  # (B, T, C)


def build_separation(cfg: ModelConfig, pc: ParallelContext, mp: ModelParallelConfig,
                     init: Any) -> FullSeparation | PartialSeparation | None:
    if cfg.embedding_separation == "full":
        return FullSeparation(cfg, pc, mp, init)
    if cfg.embedding_separation == "partial":
        return PartialSeparation(cfg, mp.params_dtype)
    return None


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
    from data_pipeline.tokenizer import META_SPACE, CodeTokenizer

    tok = CodeTokenizer(tokenizer_path)
    names: set[str] = set()
    for lang in languages:
        names |= set(python_names() if lang == "Python" else grammar_keywords(lang))
    ids = [i for i in range(tok.vocab_size) if tok.sp.id_to_piece(i).removeprefix(META_SPACE) in names]
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

SEPARATION_FIELDS = ("embedding_separation", "separated_token_ids")
FREE_FIELDS = SEPARATION_FIELDS + ("hidden_dropout", "attention_dropout", "attention_backend", "params_dtype")


def check_compatible(source: ModelConfig, target: ModelConfig, path: str | Path) -> None:
    """The stage-1 model must have the stage-2 model's shape (separation aside)."""
    a, b = to_dict(source), to_dict(target)
    diff = [f"{k} ({a[k]} in {path}, {b[k]} here)" for k in a if k not in FREE_FIELDS and a[k] != b[k]]
    if diff:
        raise ConfigError(f"init_from {path}: the model differs: {'; '.join(diff)}")


@torch.no_grad()
def init_from_checkpoint(model: CodeGeeXModel, path: str | Path) -> CheckpointManifest:
    """Load a checkpoint's weights into ``model`` (any TP size), separating the embeddings if the checkpoint has
    none and the model has some; returns the checkpoint's manifest."""
    from megatron_code.checkpoint import load_parameters, load_shard, model_config, read_manifest, resolve_model_dir

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
    pc: ParallelContext = model.pc
    state = load_shard(path, pc.tp_rank, pc.tp_size)
    sep = model.docstring_embeddings
    if sep is not None and not any(k.startswith("docstring_embeddings.") for k in state):
        shared = state["word_embeddings.weight"]  # (V/tp, C): this rank's rows of the trained table
        if isinstance(sep, FullSeparation):
            state["docstring_embeddings.table.weight"] = shared.clone()
        else:
            start = pc.tp_rank * shared.shape[0]
            ids = torch.tensor(model.cfg.separated_token_ids, dtype=torch.long)
            local = (ids >= start) & (ids < start + shared.shape[0])
            rows = torch.zeros(len(ids), shared.shape[1], dtype=torch.float32)
            rows[local] = shared[ids[local] - start].float()
            if pc.tp_size > 1:  # every rank contributes the rows it holds
                dist.all_reduce(rows, group=pc.tp_group)
            state["docstring_embeddings.rows"] = rows.to(shared.dtype)
    load_parameters(model, state, str(path))
    return manifest
