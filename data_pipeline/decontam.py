"""Decontamination: drop training documents that contain HumanEval-X or MBPP prompts or solutions.

Method: every benchmark prompt and every reference solution is an *item*; its distinct word-and-symbol
n-grams (n = 10 by default) are indexed, leaving out n-grams shared by more than ``max_item_share`` items
(benchmark boilerplate such as Java's ``import java.util.*; import java.lang.*;``). A document is contaminated
when it contains at least ``threshold`` (default half) of one item's indexed n-grams. Items with fewer n-grams
than ``min_ngrams`` (one-line solutions such as ``return len(string)``) cannot be told apart from ordinary code and
are not indexed; the manifest reports how many items were indexed.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from common.config import option
from common.io import read_jsonl
from data_pipeline.dedup import hashed_ngrams

_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


@dataclass
class DecontamConfig:
    """Decontamination against evaluation benchmarks."""

    humaneval_x: str | None = option(None, "directory of humaneval_<lang>.jsonl(.gz) files (HumanEval-X); off when unset")
    mbpp: str | None = option(None, "MBPP mbpp.jsonl (or sanitized-mbpp.json); off when unset")
    ngram: int = option(10, "n-gram size in word and symbol tokens")
    threshold: float = option(0.5, "share of one item's n-grams a document must contain to be contaminated")
    min_ngrams: int = option(4, "items with fewer distinct n-grams are not indexed")
    max_item_share: int = option(5, "n-grams found in more than this many items are boilerplate and ignored")

    @property
    def enabled(self) -> bool:
        return bool(self.humaneval_x or self.mbpp)


def _ngrams(text: str, n: int) -> set[int]:
    return set(hashed_ngrams(_TOKEN.findall(text), n).tolist())


def benchmark_items(cfg: DecontamConfig) -> list[tuple[str, str]]:
    """(item name, text) for every prompt and reference solution of the configured benchmarks."""
    items: list[tuple[str, str]] = []
    if cfg.humaneval_x:
        root = Path(cfg.humaneval_x)
        files = sorted(root.glob("*/humaneval_*.jsonl*")) + sorted(root.glob("humaneval_*.jsonl*"))
        if not files:
            raise FileNotFoundError(f"decontam.humaneval_x: no humaneval_<lang>.jsonl(.gz) under {root}")
        for f in files:
            for rec in read_jsonl(f):
                tid = rec.get("task_id", "?")
                items.append((f"{tid}:prompt", str(rec.get("prompt", ""))))
                items.append((f"{tid}:solution", str(rec.get("canonical_solution", ""))))
    if cfg.mbpp:
        path = Path(cfg.mbpp)
        if not path.is_file():
            raise FileNotFoundError(f"decontam.mbpp: {path} does not exist")
        records = json.loads(path.read_text()) if path.suffix == ".json" else list(read_jsonl(path))
        for rec in records:
            tid = f"MBPP/{rec.get('task_id', '?')}"
            items.append((f"{tid}:prompt", str(rec.get("text") or rec.get("prompt") or "")))
            items.append((f"{tid}:solution", str(rec.get("code", ""))))
            items.append((f"{tid}:tests", "\n".join(rec.get("test_list", []))))
    return items


class ContaminationIndex:
    """The n-gram index of the benchmark items; built once, shipped to every worker."""

    def __init__(self, cfg: DecontamConfig) -> None:
        self.cfg = cfg
        raw = [(name, _ngrams(text, cfg.ngram)) for name, text in benchmark_items(cfg)]
        share = Counter(g for _, grams in raw for g in grams)
        self.names: list[str] = []
        self.sizes: list[int] = []
        self.index: dict[int, list[int]] = {}
        for name, grams in raw:
            kept = {g for g in grams if share[g] <= cfg.max_item_share}
            if len(kept) < cfg.min_ngrams:
                continue
            item = len(self.names)
            self.names.append(name)
            self.sizes.append(len(kept))
            for g in kept:
                self.index.setdefault(g, []).append(item)

    @property
    def num_items(self) -> int:
        return len(self.names)

    def match(self, text: str) -> str | None:
        """The name of the first item the text contains, or None."""
        hits: Counter[int] = Counter()
        for g in _ngrams(text, self.cfg.ngram):
            items = self.index.get(g)
            if items:
                hits.update(items)
        for item, count in sorted(hits.items()):
            if count >= self.cfg.threshold * self.sizes[item]:
                return self.names[item]
        return None
