"""pass@k, incremental pass@k, the k to report, and bootstrap confidence intervals over problems.

pass@k for one problem with n samples of which c pass is the unbiased estimator ``1 - C(n-c, k) / C(n, k)``
(Chen et al. 2021), computed as the numerically stable product ``1 - prod_{i=n-c+1..n} (1 - k / i)``. A group of
problems is scored at the k its smallest n allows (:func:`resolve_ks`: the asked ks, 1, 10, 100 by default, and that
n itself).

Incremental pass@k (PanGu-Coder): each problem also gets prompts extended by the first 1, 2, ... lines of its
reference solution. *Micro* averages over every (problem, prefix) prompt; *macro* first averages each problem's
prompts, then over problems.

Confidence intervals (:class:`Bootstrap`): the percentile bootstrap over problems. The problems of a row are drawn
with replacement ``resamples`` times (1000, a fixed seed), each draw's mean pass@k computed, and the 2.5th and 97.5th
percentiles of those means are the 95 % interval. An overall row resamples each of its rows' problems apart (strata)
and combines the draws as it combines the rows.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_KS = (1, 10, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem."""
    if not 0 <= c <= n:
        raise ValueError(f"correct samples ({c}) must be within [0, n ({n})]")
    if k > n:
        raise ValueError(f"k ({k}) must not exceed the number of samples ({n})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], ks: Sequence[int]) -> dict[int, float]:
    """Average pass@k over problems given (n, c) each; only the k that every problem's n allows."""
    counts = list(counts)
    if not counts:
        return {}
    n_min = min(n for n, _ in counts)
    return {k: float(np.mean([pass_at_k(n, c, k) for n, c in counts])) for k in ks if k <= n_min}


def resolve_ks(ks: Sequence[int] | None, n: int) -> list[int]:
    """The k to score problems whose smallest sample count is ``n``: the asked ks (None: 1, 10, 100) that n allows,
    and n itself, ascending."""
    asked = DEFAULT_KS if ks is None else ks
    return sorted({k for k in asked if 1 <= k <= n} | ({n} if n >= 1 else set()))


def pass_at_k_matrix(counts: Sequence[tuple[int, int]], ks: Sequence[int]) -> np.ndarray:
    """pass@k of each problem (rows) at each k (columns), from (n, c) per problem."""
    return np.array([[pass_at_k(n, c, k) for k in ks] for n, c in counts], dtype=float).reshape(len(counts), len(ks))


def counts_by(results: Iterable[dict[str, object]], key: str = "task_id") -> dict[str, tuple[int, int]]:
    """(samples, passed) per value of ``key`` from result rows with a ``status``."""
    n: dict[str, int] = defaultdict(int)
    c: dict[str, int] = defaultdict(int)
    for row in results:
        k = str(row[key])
        n[k] += 1
        c[k] += int(row["status"] == "passed")
    return {k: (n[k], c[k]) for k in n}


def incremental_pass_at_k(results: Iterable[dict[str, object]], ks: Sequence[int]) -> dict[str, dict[int, float]]:
    """Micro and macro incremental pass@k from rows with ``task_id``, ``prefix_lines`` and ``status``."""
    rows = list(results)
    per_prompt = counts_by([{**r, "prompt_key": f"{r['task_id']}#{r['prefix_lines']}"} for r in rows], "prompt_key")
    micro = mean_pass_at_k(per_prompt.values(), ks)
    by_task: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for key, nc in per_prompt.items():
        by_task[key.rsplit("#", 1)[0]].append(nc)
    n_min = min(n for n, _ in per_prompt.values()) if per_prompt else 0
    macro = {k: float(np.mean([np.mean([pass_at_k(n, c, k) for n, c in prompts]) for prompts in by_task.values()]))
             for k in ks if k <= n_min}
    return {"micro": micro, "macro": macro}


@dataclass(frozen=True)
class Bootstrap:
    """The percentile bootstrap over problems: ``resamples`` draws, seeded by ``seed`` and the row's name (so a row's
    interval does not depend on what else is scored), a 95 % interval."""

    resamples: int = 1000
    seed: int = 0
    level: float = 0.95

    def draws(self, size: int, name: str) -> np.ndarray:
        """``resamples`` x ``size`` problem indices, drawn with replacement."""
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        return rng.integers(0, size, size=(self.resamples, size))

    def interval(self, stats: np.ndarray) -> np.ndarray:
        """(K, 2): the lower and upper percentile of each column of ``stats`` (resamples x K)."""
        tail = 100 * (1 - self.level) / 2
        return np.percentile(stats, [tail, 100 - tail], axis=0).T

    def describe(self) -> dict[str, object]:
        """What scores.json says about its intervals."""
        return {"method": "percentile bootstrap over problems", "level": self.level, "resamples": self.resamples,
                "seed": self.seed}


def resampled_means(values: np.ndarray, boot: Bootstrap, name: str) -> np.ndarray:
    """(resamples, K): the mean over problems of ``values`` (problems x K) in each bootstrap draw."""
    if len(values) == 0:
        return np.zeros((boot.resamples, values.shape[1]))
    return values[boot.draws(len(values), name)].mean(axis=1)


def incremental_resampled(prompts: Sequence[np.ndarray], boot: Bootstrap, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Micro and macro incremental pass@k in each bootstrap draw over problems (each problem with all its prompts);
    ``prompts`` holds per problem a (prompts x K) array of pass@k."""
    sums = np.array([p.sum(axis=0) for p in prompts])
    sizes = np.array([len(p) for p in prompts], dtype=float)
    idx = boot.draws(len(prompts), name)
    micro = sums[idx].sum(axis=1) / sizes[idx].sum(axis=1)[:, None]
    macro = (sums / sizes[:, None])[idx].mean(axis=1)
    return micro, macro
