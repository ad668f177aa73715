"""Small models and packed batches shared by the model tests."""

from __future__ import annotations

import numpy as np

from common.config import load_config
from common.contracts import LanguageCounts, PairLayout, StoreManifest, TokenizerRecord, write_manifest
from data_pipeline.packing import document_ids, position_ids
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


def synthetic_store(path, windows: int = 64, seq_len: int = 32, vocab: int = 128, seed: int = 0) -> str:
    """A token store of random documents, independent of any tokenizer or machine (for golden losses)."""
    from pathlib import Path

    from data_pipeline.packing import Packer
    from data_pipeline.store import ShardWriter

    rng = np.random.default_rng(seed)
    out = Path(path)
    writer = ShardWriter(out, seq_len + 1, np.dtype(np.uint16), False, windows_per_shard=max(1, windows // 2))
    packer = Packer(seq_len + 1, 6, 0, writer.add)
    # documents with structure a model can learn: a repeated motif per document
    while packer.windows < windows:
        motif = rng.integers(2, vocab, size=int(rng.integers(2, 6)))
        packer.add(np.concatenate([np.tile(motif, int(rng.integers(3, 9))), [1]]))
    shards = writer.close()
    total = sum(s.windows for s in shards)
    write_manifest(out, StoreManifest(
        seq_len=seq_len, window=seq_len + 1, token_dtype="uint16", columns=["tokens", "doc_starts", "num_tokens", "language"],
        tokenizer=TokenizerRecord(sha256="synthetic", vocab_size=vocab, eod_id=1, pad_id=0), total_windows=total,
        shards=shards))
    return str(out)


# ids of the synthetic pair store's markers (a 128-token vocabulary)
PAIR_IDS = {"pad": 0, "eod": 1, "tag": 2, "descr": 3, "python": 4, "eoc": 5, "mask": 6, "sos": 7}


def synthetic_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One text-to-code pair in the docstring-first layout: the code is the docstring's tokens + 60, reversed, so a
    model can learn code from docstring. Returns (tokens, modality)."""
    from data_pipeline.packing import MODALITY_CODE, MODALITY_DOCSTRING, MODALITY_MARKUP

    doc = rng.integers(10, 60, size=int(rng.integers(3, 7)))
    code = doc[::-1] + 60
    runs = [([PAIR_IDS["tag"], PAIR_IDS["descr"]], MODALITY_MARKUP), (doc, MODALITY_DOCSTRING),
            ([PAIR_IDS["python"]], MODALITY_MARKUP), ([*code, PAIR_IDS["eoc"], PAIR_IDS["eod"]], MODALITY_CODE)]
    tokens = np.concatenate([np.asarray(r, dtype=np.int64) for r, _ in runs])
    modality = np.concatenate([np.full(len(r), m, dtype=np.uint8) for r, m in runs])
    return tokens, modality


def synthetic_pair_store(path, windows: int = 64, seq_len: int = 32, seed: int = 0) -> str:
    """A store of synthetic pairs with per-token modality (best-fit packing: no pair is cut)."""
    from pathlib import Path

    from data_pipeline.packing import Packer
    from data_pipeline.store import ShardWriter

    rng = np.random.default_rng(seed)
    out = Path(path)
    writer = ShardWriter(out, seq_len + 1, np.dtype(np.uint16), True, windows_per_shard=max(1, windows // 2))
    packer = Packer(seq_len + 1, 0, 0, writer.add, "best_fit", with_modality=True, open_windows=4)
    while packer.windows < windows:
        packer.add(*synthetic_pair(rng))
    packer.flush()
    shards = writer.close()
    write_manifest(out, StoreManifest(
        seq_len=seq_len, window=seq_len + 1, token_dtype="uint16",
        columns=["tokens", "doc_starts", "num_tokens", "language", "modality"],
        tokenizer=TokenizerRecord(sha256="synthetic", vocab_size=128, eod_id=1, pad_id=0, mask_id=PAIR_IDS["mask"]),
        pairs=PairLayout(order="docstring_first", normalize_whitespace=False),
        total_windows=sum(s.windows for s in shards), languages={"Python": LanguageCounts(pairs=1)}, shards=shards))
    return str(out)
