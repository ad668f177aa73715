"""Build throughput with CodeGeeX's byte-level BPE tokenizer, side by side in one run (issue 18).

Sides, on the same JSONL corpus, 2 workers, alternating, each run in a fresh process, medians:
- ``codegeex data build`` with the project's SentencePiece tokenizer (``CodeTokenizer``, trained here);
- ``codegeex data build`` with CodeGeeX's tokenizer (``CodeGeeXTokenizer``: batches through ``encode_batch_fast``,
  one thread per worker);
- Megatron-LM's preprocessing design (``benchmarks.data_build.megatron_build``: a pool of workers, one ``encode`` per
  JSON line, tag and end-of-document ids added, documents appended to megatron-core's ``IndexedDatasetBuilder``)
  with CodeGeeX's tokenizer, and, for reference, with SentencePiece.

Filters, dedup, parsing and redaction are off on our side (``data_build.NO_FILTERS``), so both sides only tokenize
and write; the token totals of the two sides with the same tokenizer are checked equal. Documents holding a special
token's text (``<|endoftext|>``, ``<|extratoken_``), which our build skips, are left out of the corpus.

``--profile`` also runs our build with CodeGeeX's tokenizer on 1 worker under cProfile and prints the top functions.

Usage: python -m benchmarks.bpe_build [--mb-per-language 4] [--workers 2] [--repeats 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.data_build import NO_FILTERS, SHARED, make_corpus, our_build, timed_side
from common.config import load_config
from data_pipeline.config import TokenizerConfig
from data_pipeline.train_tokenizer import run_tokenizer

BPE_DIR = SHARED / "codegeex-tokenizer"
RESERVED = ("<|endoftext|>", "<|extratoken_")
LABELS = {"ours-sp": "codegeex data build, SentencePiece", "ours-bpe": "codegeex data build, CodeGeeX BPE",
          "megatron-bpe": "Megatron-style pool, CodeGeeX BPE", "megatron-sp": "Megatron-style pool, SentencePiece",
          "megatron-hf": "Megatron-LM's HuggingFaceTokenizer path (transformers + CodeGeeX's rule), CodeGeeX BPE"}


def corpus_without_reserved(out: Path, mb_per_language: float) -> tuple[Path, list[tuple[str, str]], int]:
    """data_build's corpus, less the documents holding a special token's text; the count left out."""
    path, docs = make_corpus(out, mb_per_language)
    kept = [(lang, text) for lang, text in docs if not any(r in text for r in RESERVED)]
    with open(path, "w") as fh:
        for lang, text in kept:
            fh.write(json.dumps({"content": text, "language": lang}) + "\n")
    return path, kept, len(docs) - len(kept)


def profile_ours(corpus: Path, out: Path, seq_len: int, top: int) -> None:
    """Our build with CodeGeeX's tokenizer on 1 worker under cProfile: the functions that take the time."""
    prof = cProfile.Profile()
    prof.enable()
    seconds, manifest = our_build(corpus, str(BPE_DIR), out, 1, seq_len, NO_FILTERS)
    prof.disable()
    print(f"\n## cProfile, ours with CodeGeeX BPE, 1 worker: {seconds:.2f} s, {manifest.total_tokens:,} tokens "
          f"(profiled, so slower than unprofiled)")
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb-per-language", type=float, default=4.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab-size", type=int, default=16000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-megatron-sp", action="store_true", help="skip the Megatron-style SentencePiece reference")
    ap.add_argument("--profile", action="store_true", help="also profile ours with CodeGeeX BPE on 1 worker")
    ap.add_argument("--out", default="runs/bench-bpe")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    corpus, docs, dropped = corpus_without_reserved(out, args.mb_per_language)
    text_mb = sum(len(t.encode()) for _, t in docs) / 2**20
    t0 = time.perf_counter()
    sp_model = str(run_tokenizer(load_config(TokenizerConfig, values={
        "inputs": [str(corpus)], "output": str(out / "tok"), "vocab_size": args.vocab_size, "max_train_mb": 64})))
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}")
    print(f"corpus: {len(docs)} documents ({dropped} holding a special token's text left out), {text_mb:.2f} MiB of "
          f"source ({corpus.stat().st_size / 2**20:.2f} MiB JSONL), languages {dict(Counter(lang for lang, _ in docs))}; "
          f"SentencePiece trained in {time.perf_counter() - t0:.1f} s")

    models = {"sp": sp_model, "bpe": str(BPE_DIR), "hf": f"hf:{BPE_DIR}"}
    sides = ["ours-sp", "ours-bpe", "megatron-bpe", "megatron-hf"] + ([] if args.no_megatron_sp else ["megatron-sp"])
    w = args.workers
    times: dict[str, list[float]] = {s: [] for s in sides}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):  # alternate the sides so drifts in machine speed hit all of them
        for side in sides:
            kind, tok = side.split("-")
            s, n = timed_side(kind, corpus, models[tok], out / side, w, args.seq_len)
            times[side].append(s)
            tokens[side] = n
    assert tokens["ours-bpe"] == tokens["megatron-bpe"] == tokens["megatron-hf"], tokens
    assert "megatron-sp" not in tokens or tokens["megatron-sp"] == tokens["ours-sp"], tokens
    med = {s: float(np.median(v)) for s, v in times.items()}
    print(f"\n## build, {w} workers, median of {args.repeats} runs each, each in a fresh process")
    print("| side | tokens | seconds | MiB/s | tokens/s per worker |\n|---|---|---|---|---|")
    for side in sides:
        s = med[side]
        print(f"| {LABELS[side]} | {tokens[side]:,} | {s:.2f} | {text_mb / s:.2f} | {tokens[side] / s / w:,.0f} |")
    print(f"ratio ours / Megatron-style, CodeGeeX BPE: {med['megatron-bpe'] / med['ours-bpe']:.2f}x (target >= 1.5x)")
    print(f"ratio ours / Megatron-LM's HuggingFaceTokenizer path: {med['megatron-hf'] / med['ours-bpe']:.2f}x")
    print(f"ratio ours CodeGeeX BPE / ours SentencePiece (MiB/s): {med['ours-sp'] / med['ours-bpe']:.2f}x")
    if "megatron-sp" in med:
        print(f"ratio ours / Megatron-style, SentencePiece: {med['megatron-sp'] / med['ours-sp']:.2f}x")
    print("runs (s): " + "; ".join(f"{side} {[round(x, 2) for x in times[side]]}" for side in sides))
    if args.profile:
        profile_ours(corpus, out / "profile", args.seq_len, 25)


if __name__ == "__main__":
    main()
