"""Scores from a results file: pass@k per language (generation, example tests), the 5x5 translation matrix,
incremental pass@k (micro and macro), failure reasons, and the multilingual budget allocation of the CodeGeeX paper."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from eval_harness.metrics import counts_by, incremental_pass_at_k, mean_pass_at_k
from eval_harness.samples import unique_results
from eval_harness.tasks import Kind

DEFAULT_KS = (1, 10, 100)


def score(rows: list[dict[str, Any]], ks: Sequence[int] = DEFAULT_KS) -> dict[str, Any]:
    """Everything a report shows, from result rows (each (key, sample_index) once: :func:`unique_results`)."""
    rows = unique_results(rows)
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_kind[r["kind"]].append(r)
    out: dict[str, Any] = {"samples": len(rows), "statuses": dict(Counter(r["status"] for r in rows))}
    for kind in (Kind.GENERATION, Kind.EXAMPLE):
        per_lang: dict[str, Any] = {}
        for lang in sorted({r["language"] for r in by_kind[kind]}):
            lang_rows = [r for r in by_kind[kind] if r["language"] == lang]
            counts = counts_by(lang_rows, "key")
            per_lang[lang] = {"problems": len(counts), "samples": len(lang_rows),
                              "pass@k": mean_pass_at_k(counts.values(), ks),
                              "statuses": dict(Counter(r["status"] for r in lang_rows))}
        if per_lang:
            out[kind] = per_lang
    if by_kind[Kind.TRANSLATION]:
        matrix: dict[str, dict[str, dict[int, float]]] = defaultdict(dict)
        pairs = {(r["source_language"], r["language"]) for r in by_kind[Kind.TRANSLATION]}
        for src, tgt in sorted(pairs):
            sel = [r for r in by_kind[Kind.TRANSLATION] if (r["source_language"], r["language"]) == (src, tgt)]
            matrix[src][tgt] = mean_pass_at_k(counts_by(sel, "key").values(), ks)
        out[Kind.TRANSLATION] = dict(matrix)
    if by_kind[Kind.INCREMENTAL]:
        out[Kind.INCREMENTAL] = {}
        for lang in sorted({r["language"] for r in by_kind[Kind.INCREMENTAL]}):
            sel = [r for r in by_kind[Kind.INCREMENTAL] if r["language"] == lang]
            out[Kind.INCREMENTAL][lang] = incremental_pass_at_k(sel, ks)
    return out


def budget_allocation(rows: list[dict[str, Any]], budget: int, trials: int = 200, seed: int = 0) -> dict[str, Any]:
    """CodeGeeX's multilingual budget allocation: ``budget`` samples per problem spread over the languages, uniformly
    or weighted by each language's pass rate; the share of problems solved in at least one language, against the best
    single language with the whole budget. Estimated by drawing samples without replacement from the results (each
    (key, sample_index) once)."""
    gen = [r for r in unique_results(rows) if r["kind"] == Kind.GENERATION]
    langs = sorted({r["language"] for r in gen})
    outcomes: dict[tuple[int, str], list[bool]] = defaultdict(list)
    for r in gen:
        outcomes[(int(str(r["task_id"]).rsplit("/", 1)[1]), r["language"])].append(r["status"] == "passed")
    problems = sorted({num for num, _ in outcomes})
    rate = {lang: float(np.mean([o for (_, lg), v in outcomes.items() if lg == lang for o in v])) for lang in langs}
    rng = np.random.default_rng(seed)

    def solved(alloc: dict[str, int]) -> float:
        hits = 0.0
        for num in problems:
            ok = 0
            for _ in range(trials):
                ok += any(bool(rng.choice(outcomes[(num, lg)], size=min(k, len(outcomes[(num, lg)])),
                                          replace=False).any()) for lg, k in alloc.items() if k and (num, lg) in outcomes)
            hits += ok / trials
        return hits / len(problems)

    def split(weights: dict[str, float]) -> dict[str, int]:
        total = sum(weights.values()) or 1.0
        alloc = {lg: int(budget * w / total) for lg, w in weights.items()}
        for lg in sorted(weights, key=lambda g: -weights[g])[:budget - sum(alloc.values())]:
            alloc[lg] += 1
        return alloc

    uniform, weighted = split(dict.fromkeys(langs, 1.0)), split(rate)
    single = {lg: solved({lg: budget}) for lg in langs}
    best = max(single, key=lambda g: single[g])
    return {"budget": budget, "pass_rate": rate, "uniform": {"allocation": uniform, "solved": solved(uniform)},
            "weighted": {"allocation": weighted, "solved": solved(weighted)},
            "best_single": {"language": best, "solved": single[best]}, "single": single}
