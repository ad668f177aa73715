"""Training jobs written to disk for the launch-time validation tests, the docs' commands and
benchmarks/validate_time.py: CodeGeeX-13B's own layout with a store of 2,048-token windows and its tokenizer file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from common.contracts import load_store_manifest, write_manifest
from tests.model_utils import synthetic_store


def store_with_tokenizer(path: Path, tokenizer: Path, windows: int = 2, seq_len: int = 2048,
                         vocab: int = 52224) -> str:
    """A synthetic store whose manifest names ``tokenizer`` (a file written here: only its presence is checked)."""
    store = synthetic_store(path, windows=windows, seq_len=seq_len, vocab=vocab)
    tokenizer.write_bytes(b"\0" * 1024)
    meta = load_store_manifest(store)
    write_manifest(store, dataclasses.replace(meta, tokenizer=dataclasses.replace(meta.tokenizer, path=str(tokenizer))))
    return store


def codegeex_13b_job(root: Path, name: str = "codegeex13b.yaml") -> Path:
    """``ROOT/NAME``: the 13B preset at TP=8, ZeRO-2, micro-batch 16, full recomputation, bf16, global batch 3,072
    (CodeGeeX's own layout: 1,536 ranks = TP 8 x DP 192, no accumulation), on a store under ROOT."""
    store = store_with_tokenizer(root / "store-2048", root / "tok-13b.model")
    job = {"run_dir": str(root / "runs" / "codegeex13b"), "model_preset": "codegeex-13b", "tp": 8, "zero_stage": 2,
           "micro_batch_size": 16, "activation_checkpointing": "full", "precision": {"dtype": "bf16"},
           "data": {"sources": [{"path": store}], "global_batch_size": 3072}}
    path = root / name
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path
