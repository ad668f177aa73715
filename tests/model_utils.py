"""Small models and packed batches shared by the model tests."""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.packing import document_ids, position_ids
from launch.config import load_config
from megatron_code.config import ModelConfig


def tiny_config(**overrides: object) -> ModelConfig:
    values = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 64, "vocab_size": 128,
              "max_position_embeddings": 64, **overrides}
    return load_config(ModelConfig, values=values)


def packed_batch(seed: int = 0, batch: int = 2, window: int = 25, vocab: int = 128) -> dict[str, np.ndarray]:
    """A sampler-style batch: random tokens, 2-3 documents per window, the last window padded."""
    rng = np.random.default_rng(seed)
    starts = [[0, 7, 15], [0, 11]][:batch] + [[0]] * max(0, batch - 2)
    tokens = rng.integers(0, vocab, size=(batch, window))
    return {
        "tokens": tokens,
        "position_ids": np.stack([position_ids(s, window) for s in starts]),
        "document_ids": np.stack([document_ids(s, window) for s in starts]),
        "num_tokens": np.array([window] * (batch - 1) + [window - 4], dtype=np.int32),
    }


def seeded(seed: int = 1234) -> None:
    torch.manual_seed(seed)
