"""Modality-relative embeddings (PanGu-Coder): docstring tokens and code tokens embedded by different tables.

- full (FES): a second vocab-parallel table for every token in the docstring part (the TEXT flag of the store);
- partial (PES): own docstring rows only for ``separated_token_ids`` (the language's grammar keywords and built-in
  names, see :func:`megatron_code.stage2.keyword_token_ids`); every other docstring token uses the shared table.
  The rows are a small replicated table: every tensor-parallel rank gets the same gradient for it (as for the
  position embeddings).

The output layer stays tied to the code (original) table: the loss of the modality-relative objectives is on code,
generation produces code, and the code table is the one stage 1 trained as both input and output.

Stage 2, which starts these tables from a stage-1 checkpoint and picks the PES tokens, is
:mod:`megatron_code.stage2`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import VocabParallelEmbedding
from torch import Tensor, nn

from common.config import ConfigError
from megatron_code.config import ModelConfig
from megatron_code.parallel import ParallelContext


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

    def __init__(self, cfg: ModelConfig, params_dtype: torch.dtype, device: torch.device | None = None,
                 initialize: bool = True) -> None:
        super().__init__()
        if not cfg.separated_token_ids:
            raise ConfigError("model.embedding_separation 'partial' needs model.separated_token_ids (stage 2 fills "
                              "them from the tokenizer when init_from is set)")
        ids = torch.tensor(cfg.separated_token_ids, dtype=torch.long, device=device)
        index = torch.full((cfg.vocab_size,), -1, dtype=torch.long, device=device)
        index[ids] = torch.arange(len(ids), device=device)
        self.index: Tensor
        self.register_buffer("index", index, persistent=False)  # rebuilt from the config, not checkpointed
        self.rows = nn.Parameter(torch.empty(len(ids), cfg.hidden_size, dtype=params_dtype, device=device))
        if initialize:
            nn.init.normal_(self.rows, std=cfg.init_method_std)

    def blend(self, x: Tensor, tokens: Tensor, text: Tensor) -> Tensor:
        row = self.index[tokens]  # (B, T), -1 where the token has no own row
        use = text & (row >= 0)
        return torch.where(use[..., None], F.embedding(row.clamp(min=0), self.rows), x)  # (B, T, C)


def build_separation(cfg: ModelConfig, pc: ParallelContext, mp: ModelParallelConfig, init: Any,
                     device: torch.device | None = None) -> FullSeparation | PartialSeparation | None:
    if cfg.embedding_separation == "full":
        return FullSeparation(cfg, pc, mp, init)
    if cfg.embedding_separation == "partial":
        return PartialSeparation(cfg, mp.params_dtype, device, mp.perform_initialization)
    return None
