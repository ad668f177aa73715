"""``codegeex eval execute`` as a library: a samples file in, a results file out, resumable (what the results file
already holds is not run again; see :mod:`eval_harness.samples`). The programs run through
:mod:`eval_harness.executor`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.logs import progress
from eval_harness.datasets import Problem, is_mbpp, load_humaneval_x, load_mbpp
from eval_harness.executor import default_workers, ensure_tools, execute_jobs, make_jobs
from eval_harness.samples import ResultWriter, iter_pending, load_results, read_samples, result_id
from eval_harness.sandbox import Limits
from eval_harness.scoring import score
from eval_harness.tasks import Kind


@dataclass(frozen=True)
class ExecuteConfig:
    """What ``codegeex eval execute`` runs."""

    samples: Path  # samples.jsonl
    output: Path  # results.jsonl, appended
    data: str = ""  # HumanEval-X directory ("": none)
    mbpp: str = ""  # mbpp.jsonl, for MBPP/ task ids ("": none)
    workers: int = 0  # parallel programs (0: the cores)
    limits: Limits = field(default_factory=Limits)


def load_problems(data: str, mbpp: str, languages: set[str], with_mbpp: bool) -> dict[str, Problem]:
    """Task id -> problem, for HumanEval-X ``languages`` (from ``data``) and, ``with_mbpp``, MBPP (from ``mbpp``)."""
    problems: dict[str, Problem] = {}
    if languages:
        if not data:
            raise ValueError("--data HUMANEVAL_X_DIR is needed for " + ", ".join(sorted(languages)))
        for probs in load_humaneval_x(data, sorted(languages)).values():
            problems.update({p.task_id: p for p in probs})
    if with_mbpp:
        if not mbpp:
            raise ValueError("--mbpp FILE is needed for MBPP/ task ids")
        problems.update({p.task_id: p for p in load_mbpp(mbpp, "all")})
    return problems


def execute_file(cfg: ExecuteConfig) -> dict[str, Any]:
    """Execute what is missing from ``cfg.output``; returns the run's counts. The output's lock is taken before
    anything is read from it and held until the last row is written (one writer at a time)."""
    samples = read_samples(cfg.samples)
    with ResultWriter(cfg.output) as writer:
        done = {result_id(r) for r in writer.rows}
        pending = list(iter_pending(samples, done))
        languages = {s["language"] for s in pending if not is_mbpp(s["task_id"])}
        ensure_tools(languages)
        problems = load_problems(cfg.data, cfg.mbpp, languages, any(is_mbpp(s["task_id"]) for s in pending))
        jobs = make_jobs(pending, problems)
        bar = progress(total=len(samples), initial=len(done), desc="execute", unit="sample")

        def on_result(row: dict[str, Any]) -> None:
            writer.write(row)
            bar.update(1)

        try:
            stats = execute_jobs(jobs, cfg.limits, cfg.workers or default_workers(), on_result)
        finally:
            bar.close()
    stats.update(already_done=len(done), total=len(samples))
    return stats


def summary(results: Path) -> dict[str, Any]:
    """What ``codegeex eval execute`` prints: the statuses, and pass@k of generation and example tests (each
    (key, sample_index) counted once)."""
    scores = score(load_results(results), ks=(1, 10, 100))
    return {"statuses": scores["statuses"], **{k: v for k, v in scores.items() if k in (Kind.GENERATION, Kind.EXAMPLE)}}
