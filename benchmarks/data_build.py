"""Data pipeline benchmark: `codegeex data build` against megatron-core's IndexedDatasetBuilder, in one run.

1. Build throughput on the same JSONL corpus and tokenizer: ours (filters, dedup and parsing off, so both sides
   only tokenize, append the end-of-document id and write) against Megatron's preprocessing design (a worker pool
   that tokenizes each JSON line, appends EOD and adds each document to an IndexedDatasetBuilder). Both sides
   write the same tokens; the script checks the totals match.
2. Each of our filters, dedup steps and the parser on its own: MB/s on one core.
3. Random reads of seq_len+1 windows: our Arrow store against megatron-core's IndexedDataset holding the same
   windows, each read copied into an int64 array as a trainer would.
4. Peak memory (RSS of the whole process tree) building from the corpus and from one 10x larger (repeated with a
   varying header line), with the full pipeline and with dedup off.

Usage: python benchmarks/data_build.py [--mb-per-language 4] [--workers 2] [--out runs/bench-data]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from common.config import load_config
from common.contracts import StoreManifest
from data_pipeline.build import run_build
from data_pipeline.config import BuildConfig, TokenizerConfig
from data_pipeline.decontam import ContaminationIndex, DecontamConfig
from data_pipeline.dedup import DedupConfig, MinHasher, content_hash
from data_pipeline.default_corpus import expand_inputs
from data_pipeline.documents import accepted_documents
from data_pipeline.extract import ExtractConfig
from data_pipeline.filters import FilterConfig, SyntaxChecker, check_text
from data_pipeline.languages import get_language
from data_pipeline.sources import RecordFields, enumerate_units
from data_pipeline.store import TokenStore
from data_pipeline.tokenizer import load_tokenizer
from data_pipeline.train_tokenizer import run_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def make_corpus(out: Path, mb_per_language: float) -> tuple[Path, list[tuple[str, str]]]:
    cfg = load_config(TokenizerConfig, values={"inputs": ["default"], "output": "x",
                                               "max_input_mb_per_language": mb_per_language, "max_train_mb": 1e9})
    docs = []
    counts: Counter[str] = Counter()
    units, _ = enumerate_units(expand_inputs(cfg.inputs), 4 << 20, cfg.filters.max_file_bytes, int(mb_per_language * 2**20))
    checker = SyntaxChecker()
    for u in units:
        for d in accepted_documents(u, RecordFields(), cfg.filters, ExtractConfig(), checker, counts):
            docs.append((d.language.name, d.text))
    path = out / "corpus.jsonl"
    with open(path, "w") as fh:
        for lang, text in docs:
            fh.write(json.dumps({"content": text, "language": lang}) + "\n")
    return path, docs


# ---- Megatron's preprocessing design, reimplemented around megatron-core's IndexedDatasetBuilder ----
class MegatronEncoder:
    """Like tools/preprocess_data.py's Encoder: one JSON line in, one ``encode`` of its text, token ids with EOD out
    (either tokenizer kind: a SentencePiece ``.model`` or CodeGeeX's byte-level BPE directory). ``hf:DIR``: as
    Megatron-LM runs a Hugging Face tokenizer (``--tokenizer-type HuggingFaceTokenizer``: transformers'
    ``AutoTokenizer``, ``tokenizer(text).input_ids`` per document), after CodeGeeX's whitespace rule in Python, as
    CodeGeeX's own tokenizer applies it; the same ids."""

    def __init__(self, model: str) -> None:
        self.model = model

    def initializer(self) -> None:
        MegatronEncoder.tok = load_tokenizer(self.model.removeprefix("hf:"))
        MegatronEncoder.hf = None
        if self.model.startswith("hf:"):
            from transformers import AutoTokenizer

            MegatronEncoder.hf = AutoTokenizer.from_pretrained(self.model.removeprefix("hf:"))

    @staticmethod
    def _hf_ids(text: str) -> list[int]:
        for n in range(10, 1, -1):  # CodeGeeX's rule: runs of n spaces, longest first
            text = text.replace(" " * n, f"<|extratoken_{n + 8}|>")
        return list(MegatronEncoder.hf(text).input_ids)

    def encode(self, line: str) -> tuple[list[int], int]:
        data = json.loads(line)
        tok = MegatronEncoder.tok
        if MegatronEncoder.hf is not None:
            tag = get_language(data["language"]).tag + "\n"
            ids = self._hf_ids(tag) + self._hf_ids(data["content"])
        else:
            ids = tok.tag_ids(get_language(data["language"])) + tok.encode(data["content"])
        ids.append(tok.eod_id)
        return ids, len(line)


def megatron_build(corpus: Path, model: str, prefix: Path, workers: int) -> tuple[float, int]:
    import torch  # noqa: F401  (the builder's module imports torch)
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    encoder = MegatronEncoder(model)
    start = time.perf_counter()
    tokens = 0
    with open(corpus) as fin, multiprocessing.get_context("fork").Pool(workers, initializer=encoder.initializer) as pool:
        builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=DType.optimal_dtype(
            load_tokenizer(model.removeprefix("hf:")).vocab_size))
        for ids, _ in pool.imap(encoder.encode, fin, 32):
            builder.add_document(ids, [len(ids)])
            tokens += len(ids)
        builder.finalize(str(prefix) + ".idx")
    return time.perf_counter() - start, tokens


def our_build(corpus: Path, model: str, out: Path, workers: int, seq_len: int, extra: list[str]) -> tuple[float, StoreManifest]:
    """Time `codegeex data build` in this process, as the Megatron side is timed."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(BuildConfig, overrides=extra, values={"inputs": [str(corpus)], "tokenizer": model,
                                                            "output": str(out), "workers": workers, "pack.seq_len": seq_len})
    start = time.perf_counter()
    manifest = run_build(cfg, ["benchmark"])
    assert manifest is not None
    return time.perf_counter() - start, manifest


def our_build_rss(corpus: Path, model: str, out: Path, workers: int, seq_len: int, extra: list[str]) -> int:
    """Peak RSS of `codegeex data build` run as a command."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "launch.cli", "--log-level", "WARNING", "data", "build", "--input", str(corpus),
           "--tokenizer", model, "--output", str(out), "--seq-len", str(seq_len), "--workers", str(workers), *extra]
    return run_measuring_rss(cmd)


def run_measuring_rss(cmd: list[str]) -> int:
    """Run a command; return the peak of the summed RSS of it and its children (sampled every 20 ms)."""
    proc = subprocess.Popen(cmd)
    ps = psutil.Process(proc.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                procs = [ps, *ps.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    rc = proc.wait()
    done.set()
    t.join()
    if rc:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {rc}")
    return peak


NO_FILTERS = ["filters.parse=false", "filters.max_line_length=100000000", "filters.max_avg_line_length=1e9",
              "dedup.exact=false", "dedup.near=false", "redact.enabled=false"]


def stage_throughput(docs: list[tuple[str, str]]) -> dict[str, float]:
    """MB/s of each filter and dedup step alone, one core."""
    texts = [t for _, t in docs]
    raw = [t.encode() for t in texts]
    mb = sum(len(b) for b in raw) / 2**20
    out = {}

    def timed(name: str, fn: Any) -> None:
        t0 = time.perf_counter()
        fn()
        out[name] = mb / (time.perf_counter() - t0)

    fc = FilterConfig(max_line_length=10**9, max_avg_line_length=1e9)
    timed("filters (binary, UTF-8, size, line lengths)", lambda: [check_text(b, fc) for b in raw])
    checker = SyntaxChecker()
    langs = [get_language(lang) for lang, _ in docs]
    timed("tree-sitter parse", lambda: [checker.parse(lang, b) for lang, b in zip(langs, raw)])
    timed("exact dedup hash", lambda: [content_hash(t) for t in texts])
    mh = MinHasher(DedupConfig())
    timed("MinHash (256 perm, 5-grams) + LSH keys", lambda: [mh.band_keys(mh.signature(t)) for t in texts])
    he, mbpp = SHARED / "humaneval-x", SHARED / "mbpp" / "mbpp.jsonl"
    if he.exists() and mbpp.exists():
        index = ContaminationIndex(DecontamConfig(humaneval_x=str(he), mbpp=str(mbpp)))
        timed("decontamination (HumanEval-X + MBPP, 10-grams)", lambda: [index.match(t) for t in texts])
    return out


def read_throughput(store_dir: Path, prefix: Path, n_reads: int) -> tuple[float, float]:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

    store = TokenStore(store_dir)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=DType.optimal_dtype(store.manifest.tokenizer.vocab_size))
    for i in range(len(store)):
        builder.add_document(np.asarray(store[i].tokens), [store.window])
    builder.finalize(str(prefix) + ".idx")
    mds = IndexedDataset(str(prefix))
    order = np.random.default_rng(0).integers(0, len(store), size=n_reads)
    for i in order[:100]:  # warm the page cache for both
        store[int(i)], mds[int(i)]
    best_ours, best_meg = 0.0, 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for i in order:
            np.asarray(store[int(i)].tokens, dtype=np.int64)
        best_ours = max(best_ours, n_reads / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for i in order:
            np.asarray(mds[int(i)], dtype=np.int64)
        best_meg = max(best_meg, n_reads / (time.perf_counter() - t0))
    assert np.array_equal(store[int(order[0])].tokens, mds[int(order[0])])
    return best_ours, best_meg


def repeat_corpus(src: Path, dst: Path, times: int) -> None:
    lines = src.read_text().splitlines()
    with open(dst, "w") as fh:
        for k in range(times):
            for line in lines:
                rec = json.loads(line)
                lang = get_language(rec["language"])
                end = " */" if lang.line_comment == "/*" else (" -->" if lang.line_comment == "<!--" else "")
                rec["content"] = f"{lang.line_comment} variant {k}{end}\n" + rec["content"]
                fh.write(json.dumps(rec) + "\n")


def timed_side(side: str, corpus: Path, model: str, out: Path, workers: int, seq_len: int) -> tuple[float, int]:
    """One side's build in a fresh interpreter (no state shared with the other side); seconds and tokens,
    timed inside that process, excluding interpreter start-up and imports."""
    code = (f"import json, sys; from pathlib import Path; sys.path.insert(0, {str(ROOT)!r}); "
            f"import benchmarks.data_build as D; "
            f"r = D.megatron_build(Path({str(corpus)!r}), {model!r}, Path({str(out)!r}), {workers}) if {side!r} == 'megatron' "
            f"else D.our_build(Path({str(corpus)!r}), {model!r}, Path({str(out)!r}), {workers}, {seq_len}, D.NO_FILTERS); "
            f"print(json.dumps([r[0], r[1] if {side!r} == 'megatron' else r[1].total_tokens]))")
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    seconds, tokens = json.loads(res.stdout.strip().splitlines()[-1])
    return float(seconds), int(tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb-per-language", type=float, default=4.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab-size", type=int, default=16000)
    ap.add_argument("--reads", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/bench-data")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    corpus, docs = make_corpus(out, args.mb_per_language)
    mb = corpus.stat().st_size / 2**20
    text_mb = sum(len(t.encode()) for _, t in docs) / 2**20
    model = str(run_tokenizer(load_config(TokenizerConfig, values={"inputs": [str(corpus)], "output": str(out / "tok"),
                                                                  "vocab_size": args.vocab_size, "max_train_mb": 64})))
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"corpus: {len(docs)} documents, {text_mb:.1f} MiB of source ({mb:.1f} MiB JSONL), "
          f"languages {dict(Counter(lang for lang, _ in docs))}")

    w = args.workers
    times: dict[str, list[float]] = {"megatron": [], "ours": []}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):  # alternate the sides so drifts in machine speed hit both
        for side in ("megatron", "ours"):
            s, n = timed_side(side, corpus, model, out / side, w, args.seq_len)
            times[side].append(s)
            tokens[side] = n
    assert tokens["megatron"] == tokens["ours"], tokens
    meg_s, ours_s = float(np.median(times["megatron"])), float(np.median(times["ours"]))
    meg_tokens = tokens["ours"]
    print(f"\n## build, {w} workers, same {meg_tokens:,} tokens written (median of {args.repeats} runs each, "
          "each in a fresh process)")
    print("| | seconds | MB/s | MB/s per worker | tokens/s per worker |")
    print("|---|---|---|---|---|")
    for name, s in (("megatron-core IndexedDatasetBuilder", meg_s), ("codegeex data build", ours_s)):
        print(f"| {name} | {s:.2f} | {text_mb / s:.2f} | {text_mb / s / w:.2f} | {meg_tokens / s / w:,.0f} |")
    print(f"ratio (ours / megatron throughput): {meg_s / ours_s:.2f}x (target >= 1.5x); "
          f"runs: megatron {[round(x, 2) for x in times['megatron']]}, ours {[round(x, 2) for x in times['ours']]}")

    print("\n## each stage alone, one core")
    print("| stage | MB/s |\n|---|---|")
    for name, v in stage_throughput(docs).items():
        print(f"| {name} | {v:.2f} |")

    ours_r, meg_r = read_throughput(out / "ours", out / "megatron-windows", args.reads)
    print(f"\n## random reads of {args.seq_len + 1}-token windows ({args.reads} reads, best of 3)")
    print(f"| Arrow store | {ours_r:,.0f} samples/s |\n| megatron-core IndexedDataset | {meg_r:,.0f} samples/s |")
    print(f"ratio: {ours_r / meg_r:.2f}x (target >= 1.0x)")

    repeat_corpus(corpus, out / "corpus1x.jsonl", 1)
    repeat_corpus(corpus, out / "corpus10x.jsonl", 10)
    print("\n## peak RSS (process tree), 1x and 10x corpus")
    print("| pipeline | 1x MiB | 10x MiB | ratio |\n|---|---|---|---|")
    for label, extra in (("full (parse, exact + near dedup)", []), ("dedup off", ["dedup.exact=false", "dedup.near=false"])):
        rss = []
        for name in ("corpus1x.jsonl", "corpus10x.jsonl"):
            rss.append(our_build_rss(out / name, model, out / "mem", args.workers, args.seq_len, extra) / 2**20)
        print(f"| {label} | {rss[0]:.0f} | {rss[1]:.0f} | {rss[1] / rss[0]:.2f} (target <= 1.2) |")


if __name__ == "__main__":
    main()
