"""Samples made of the reference solutions: every task kind should pass them all (a check of the data and the
runners; the exceptions are data bugs, listed with their reasons in docs/evaluation.md)."""

from __future__ import annotations

from typing import Any

from eval_harness.datasets import load_humaneval_x, load_mbpp, resolve_languages
from eval_harness.tasks import translation_tasks

# (kind, task_id) -> why the reference solution cannot pass: bugs in the benchmark's data, not in the harness.
KNOWN_DATA_BUGS = {
    ("translation", "Python/142"): 'the declaration ends inside a broken docstring (`"` on its own line), so '
                                   "declaration + solution is a syntax error",
    ("translation", "CPP/38"): "the declaration already holds the first lines of decode_cyclic's body, so the "
                               "canonical solution appended to it leaves a brace unclosed",
    ("translation", "Go/10"): "the declaration lacks the helper IsPalindrome that the prompt defines and the solution "
                              "calls",
    ("translation", "Go/32"): "the declaration lacks the helper Poly that the solution calls",
    ("translation", "Go/38"): "the declaration lacks EncodeCyclic (and keeps imports it does not use)",
    ("translation", "Go/50"): "the declaration lacks the helper EncodeShift that the solution's tests call",
}
GO95 = ("the solution stops at the second key when it agrees with the first (`else { break }`), so for "
        '{"p", "A", "B"} it answers true when Go\'s randomised map order starts at "A" (about 1 run in 8): it passes '
        "or fails by chance")
KNOWN_DATA_BUGS.update({("generation", "Go/95"): GO95, ("translation", "Go/95"): GO95})


def canonical_samples(data: str, languages: str, kinds: list[str], mbpp: str = "") -> list[dict[str, Any]]:
    by_lang = load_humaneval_x(data, resolve_languages(languages))
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        if kind in ("generation", "example"):
            for lang, probs in by_lang.items():
                rows += [{"task_id": p.task_id, "completion": p.canonical_solution, "kind": kind, "language": lang}
                         for p in probs if kind == "generation" or p.example_test]
        elif kind == "translation":
            targets = {p.task_id: p for probs in by_lang.values() for p in probs}
            rows += [{"task_id": t.task_id, "completion": targets[t.task_id].canonical_solution, "kind": "translation",
                      "language": t.language, "source_language": t.source_language, "key": t.key}
                     for t in translation_tasks(by_lang)]
        elif kind == "incremental":
            for lang, probs in by_lang.items():
                for p in probs:
                    lines = p.canonical_solution.splitlines(keepends=True)
                    rows.append({"task_id": p.task_id, "completion": "".join(lines[1:]), "kind": "incremental",
                                 "language": lang, "prefix_lines": 1})
        else:
            raise ValueError(f"--tasks: {kind!r} is not generation, translation, example or incremental")
    if mbpp:
        rows += [{"task_id": p.task_id, "completion": p.canonical_solution} for p in load_mbpp(mbpp)]
    return rows
