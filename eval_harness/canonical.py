"""Samples made of the reference solutions: every task kind should pass them all (a check of the data and the
runners; the exceptions are data bugs, listed with their reasons in docs/evaluation.md)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval_harness.datasets import load_humaneval_x, load_mbpp, resolve_languages
from eval_harness.tasks import Kind, translation_tasks

# (kind, task_id) -> why the reference solution cannot pass: bugs in the benchmark's data, not in the harness.
KNOWN_DATA_BUGS = {
    (Kind.TRANSLATION, "Python/142"): 'the declaration ends inside a broken docstring (`"` on its own line), so '
                                      "declaration + solution is a syntax error",
    (Kind.TRANSLATION, "CPP/38"): "the declaration already holds the first lines of decode_cyclic's body, so the "
                                  "canonical solution appended to it leaves a brace unclosed",
    (Kind.TRANSLATION, "Go/10"): "the declaration lacks the helper IsPalindrome that the prompt defines and the "
                                 "solution calls",
    (Kind.TRANSLATION, "Go/32"): "the declaration lacks the helper Poly that the solution calls",
    (Kind.TRANSLATION, "Go/38"): "the declaration lacks EncodeCyclic (and keeps imports it does not use)",
    (Kind.TRANSLATION, "Go/50"): "the declaration lacks the helper EncodeShift that the solution's tests call",
}
GO95 = ("the solution stops at the second key when it agrees with the first (`else { break }`), so for "
        '{"p", "A", "B"} it answers true when Go\'s randomised map order starts at "A" (about 1 run in 8): it passes '
        "or fails by chance")
KNOWN_DATA_BUGS.update({(Kind.GENERATION, "Go/95"): GO95, (Kind.TRANSLATION, "Go/95"): GO95})


@dataclass(frozen=True)
class CanonicalConfig:
    """Which reference-solution samples to write."""

    output: Path  # samples.jsonl to write
    data: str = ""  # HumanEval-X directory
    languages: str = "all"
    kinds: tuple[str, ...] = (Kind.GENERATION,)  # of generation, translation, example, incremental
    mbpp: str = ""  # mbpp.jsonl: its test split too ("": none)


def canonical_samples(data: str, languages: str, kinds: Sequence[str], mbpp: str = "") -> list[dict[str, Any]]:
    by_lang = load_humaneval_x(data, resolve_languages(languages))
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        if kind in (Kind.GENERATION, Kind.EXAMPLE):
            for lang, probs in by_lang.items():
                rows += [{"task_id": p.task_id, "completion": p.canonical_solution, "kind": kind, "language": lang}
                         for p in probs if kind == Kind.GENERATION or p.example_test]
        elif kind == Kind.TRANSLATION:
            targets = {p.task_id: p for probs in by_lang.values() for p in probs}
            rows += [{"task_id": t.task_id, "completion": targets[t.task_id].canonical_solution, "kind": t.kind,
                      "language": t.language, "source_language": t.source_language, "key": t.key}
                     for t in translation_tasks(by_lang)]
        elif kind == Kind.INCREMENTAL:
            for lang, probs in by_lang.items():
                for p in probs:
                    lines = p.canonical_solution.splitlines(keepends=True)
                    rows.append({"task_id": p.task_id, "completion": "".join(lines[1:]), "kind": Kind.INCREMENTAL,
                                 "language": lang, "prefix_lines": 1})
        else:
            raise ValueError(f"--tasks: {kind!r} is not generation, translation, example or incremental")
    if mbpp:
        rows += [{"task_id": p.task_id, "completion": p.canonical_solution} for p in load_mbpp(mbpp)]
    return rows


def write_canonical(cfg: CanonicalConfig) -> int:
    """Write the samples; returns how many."""
    rows = canonical_samples(cfg.data, cfg.languages, cfg.kinds, cfg.mbpp)
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    with open(cfg.output, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return len(rows)
