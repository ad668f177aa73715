"""Scores from a results file: pass@k with bootstrap confidence intervals for every row of every table (HumanEval-X
generation and example tests per language, MBPP on its own, the translation matrix per direction, incremental
pass@k micro and macro per language), an overall row for each table, the statuses, and the multilingual budget
allocation of the CodeGeeX paper. The layout of the dict (and of scores.json) is documented in docs/evaluation.md."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eval_harness.datasets import is_mbpp
from eval_harness.metrics import (
    DEFAULT_KS,
    Bootstrap,
    counts_by,
    incremental_resampled,
    pass_at_k_matrix,
    resampled_means,
    resolve_ks,
)
from eval_harness.samples import unique_results
from eval_harness.tasks import Kind

__all__ = ["DEFAULT_KS", "budget_allocation", "score"]


@dataclass(frozen=True)
class Problems:
    """One row's problems: (n, c) per problem key, in key order, and the row's name (which seeds its bootstrap)."""

    name: str
    counts: list[tuple[int, int]]
    statuses: Counter[str]

    @classmethod
    def of(cls, name: str, rows: list[dict[str, Any]], key: str = "key") -> Problems:
        return cls(name, [nc for _, nc in sorted(counts_by(rows, key).items())], Counter(r["status"] for r in rows))

    @property
    def n_min(self) -> int:
        return min(n for n, _ in self.counts)


def _sizes(counts: Sequence[tuple[int, int]]) -> dict[str, int]:
    ns = [n for n, _ in counts]
    return {"problems": len(ns), "samples": sum(ns), "n": min(ns), "n_max": max(ns)}


def _passk(ks: Sequence[int], point: np.ndarray, draws: np.ndarray, boot: Bootstrap) -> dict[str, Any]:
    ci = boot.interval(draws)
    return {"pass@k": {k: _round(v) for k, v in zip(ks, point, strict=True)},
            "ci95": {k: [_round(lo), _round(hi)] for k, (lo, hi) in zip(ks, ci, strict=True)}}


def _round(v: float) -> float:
    """12 decimals: the product form's last-bit noise (0.3999999999999999 for 2 of 5) gone, nothing else."""
    return round(float(v), 12)


def row_scores(p: Problems, ks: Sequence[int] | None, boot: Bootstrap) -> dict[str, Any]:
    """One row: sizes, pass@k at the k its smallest n allows (and that n), their intervals, its statuses."""
    ks_row = resolve_ks(ks, p.n_min)
    values = pass_at_k_matrix(p.counts, ks_row)
    return {**_sizes(p.counts), **_passk(ks_row, values.mean(axis=0), resampled_means(values, boot, p.name), boot),
            "statuses": dict(sorted(p.statuses.items()))}


def overall_scores(parts: list[Problems], ks: Sequence[int] | None, boot: Bootstrap, mean_of: str) -> dict[str, Any]:
    """The overall rows of a table: ``mean_of_<mean_of>`` (each row weighs the same, as the CodeGeeX paper averages
    languages) and ``all_problems`` (each problem weighs the same), at the k every row allows; each row's problems are
    resampled apart (the same draws as the row's own interval) and combined the same way."""
    ks_all = resolve_ks(ks, min(p.n_min for p in parts))
    values = [pass_at_k_matrix(p.counts, ks_all) for p in parts]
    draws = [resampled_means(v, boot, p.name) for v, p in zip(values, parts, strict=True)]
    weights = np.array([len(v) for v in values], dtype=float)[:, None, None]
    sizes = _sizes([nc for p in parts for nc in p.counts])
    names = {"rows": [p.name for p in parts]}
    return {f"mean_of_{mean_of}": {**names, **sizes, **_passk(ks_all, np.mean([v.mean(axis=0) for v in values], axis=0),
                                                               np.mean(draws, axis=0), boot)},
            "all_problems": {**names, **sizes, **_passk(ks_all, np.concatenate(values).mean(axis=0),
                                                         (weights * np.array(draws)).sum(axis=0) / weights.sum(), boot)}}


def _incremental_parts(rows: list[dict[str, Any]], ks: Sequence[int], boot: Bootstrap,
                       name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(micro, macro, micro draws, macro draws) of incremental rows at ``ks``."""
    by_task: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for key, nc in sorted(counts_by(rows, "key").items()):
        by_task[key.split("|", 1)[0]].append(nc)
    prompts = [pass_at_k_matrix(v, ks) for _, v in sorted(by_task.items())]
    stacked = np.concatenate(prompts)
    micro_draws, macro_draws = incremental_resampled(prompts, boot, name)
    return stacked.mean(axis=0), np.mean([p.mean(axis=0) for p in prompts], axis=0), micro_draws, macro_draws


def incremental_scores(rows: list[dict[str, Any]], ks: Sequence[int] | None, boot: Bootstrap,
                       name: str) -> dict[str, Any]:
    """One language's incremental row: problems, prompts, samples, n, micro and macro pass@k with intervals."""
    p = Problems.of(name, rows)
    ks_row = resolve_ks(ks, p.n_min)
    micro, macro, micro_d, macro_d = _incremental_parts(rows, ks_row, boot, name)
    sizes = _sizes(p.counts)
    return {"problems": len({r["task_id"] for r in rows}), "prompts": sizes["problems"], "samples": sizes["samples"],
            "n": sizes["n"], "n_max": sizes["n_max"], "micro": _passk(ks_row, micro, micro_d, boot),
            "macro": _passk(ks_row, macro, macro_d, boot), "statuses": dict(sorted(p.statuses.items()))}


def incremental_overall(groups: dict[str, list[dict[str, Any]]], ks: Sequence[int] | None,
                        boot: Bootstrap) -> dict[str, Any]:
    """Micro and macro incremental pass@k averaged over the languages (each weighs the same)."""
    ks_all = resolve_ks(ks, min(min(n for n, _ in counts_by(g, "key").values()) for g in groups.values()))
    parts = [_incremental_parts(g, ks_all, boot, f"incremental {lang}") for lang, g in groups.items()]
    return {"mean_of_languages": {"rows": [f"incremental {lang}" for lang in groups],
                                  **{avg: _passk(ks_all, np.mean([p[i] for p in parts], axis=0),
                                                 np.mean([p[i + 2] for p in parts], axis=0), boot)
                                     for i, avg in enumerate(("micro", "macro"))}}}


def _group(rows: list[dict[str, Any]], field: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out["mbpp" if is_mbpp(str(r["task_id"])) else str(r[field])].append(r)
    return dict(sorted(out.items()))


def score(rows: list[dict[str, Any]], ks: Sequence[int] | None = None, boot: Bootstrap | None = None) -> dict[str, Any]:
    """Everything a report shows, from result rows (each (key, sample_index) once: :func:`unique_results`); ``ks``
    None: 1, 10, 100, each row also at its n (see :func:`~eval_harness.metrics.resolve_ks`)."""
    boot = boot or Bootstrap()
    rows = unique_results(rows)
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_kind[r["kind"]].append(r)
    out: dict[str, Any] = {"samples": len(rows), "statuses": dict(sorted(Counter(r["status"] for r in rows).items())),
                           "ks": list(DEFAULT_KS if ks is None else ks), "ks_explicit": ks is not None,
                           "ci": boot.describe()}
    mbpp: dict[str, Any] = {}
    for kind in (Kind.GENERATION, Kind.EXAMPLE):
        groups = _group(by_kind[kind], "language")
        if "mbpp" in groups:
            mbpp[kind] = row_scores(Problems.of(f"mbpp {kind}", groups.pop("mbpp")), ks, boot)
        parts = [Problems.of(f"{kind} {lang}", g) for lang, g in groups.items()]
        if parts:
            out[kind] = {lang: row_scores(p, ks, boot) for lang, p in zip(groups, parts, strict=True)}
            out[f"{kind}_overall"] = overall_scores(parts, ks, boot, "languages")
    if mbpp:
        out["mbpp"] = mbpp
    if by_kind[Kind.TRANSLATION]:
        pairs = defaultdict(list)
        for r in by_kind[Kind.TRANSLATION]:
            pairs[(str(r["source_language"]), str(r["language"]))].append(r)
        parts = [Problems.of(f"translation {s}->{t}", g) for (s, t), g in sorted(pairs.items())]
        matrix: dict[str, dict[str, Any]] = defaultdict(dict)
        for (src, tgt), p in zip(sorted(pairs), parts, strict=True):
            matrix[src][tgt] = row_scores(p, ks, boot)
        out[Kind.TRANSLATION] = dict(matrix)
        out[f"{Kind.TRANSLATION}_overall"] = overall_scores(parts, ks, boot, "pairs")
    if by_kind[Kind.INCREMENTAL]:
        groups = _group(by_kind[Kind.INCREMENTAL], "language")
        out[Kind.INCREMENTAL] = {lang: incremental_scores(g, ks, boot, f"incremental {lang}")
                                 for lang, g in groups.items()}
        out[f"{Kind.INCREMENTAL}_overall"] = incremental_overall(groups, ks, boot)
    return out
def budget_allocation(rows: list[dict[str, Any]], budget: int, trials: int = 200, seed: int = 0) -> dict[str, Any]:
    """CodeGeeX's multilingual budget allocation: ``budget`` samples per problem spread over the languages, uniformly
    or weighted by each language's pass rate; the share of problems solved in at least one language, against the best
    single language with the whole budget. Estimated by drawing samples without replacement from the results (each
    (key, sample_index) once); HumanEval-X only (its languages share problems, MBPP's do not)."""
    gen = [r for r in unique_results(rows) if r["kind"] == Kind.GENERATION and not is_mbpp(str(r["task_id"]))]
    if not gen:
        raise ValueError("the budget allocation needs HumanEval-X generation results (MBPP has one language)")
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
