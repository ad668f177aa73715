"""pass@k and incremental pass@k.

pass@k for one problem with n samples of which c pass is the unbiased estimator ``1 - C(n-c, k) / C(n, k)``
(Chen et al. 2021), computed as the numerically stable product ``1 - prod_{i=n-c+1..n} (1 - k / i)``. It is
reported only for k <= n of every problem averaged over.

Incremental pass@k (PanGu-Coder): each problem also gets prompts extended by the first 1, 2, ... lines of its
reference solution. *Micro* averages over every (problem, prefix) prompt; *macro* first averages each problem's
prompts, then over problems.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np


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
