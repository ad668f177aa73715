"""Executing many samples fast: identical programs run once, Java and Go are compiled in batches
(:mod:`eval_harness.batch`), workers run in parallel, results stream to the caller as they finish (see
:mod:`eval_harness.samples` for resumption).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from eval_harness.batch import BatchPart, run_batch
from eval_harness.datasets import Problem
from eval_harness.execution import Job, make_job, run_program
from eval_harness.gobatch import GoBatch
from eval_harness.javabatch import JavaBatch
from eval_harness.runners import BUILDERS
from eval_harness.sandbox import Limits

BATCHED: tuple[BatchPart, ...] = (JavaBatch(), GoBatch())  # in this order, while the other languages run
TOOLS = {"cpp": ["g++"], "java": ["javac", "java"], "js": ["node"], "go": ["go"]}


def make_jobs(samples: list[dict[str, Any]], problems: dict[str, Problem]) -> list[Job]:
    jobs = []
    for s in samples:
        problem = problems.get(s["task_id"])
        if problem is None:
            raise ValueError(f"sample {s['key']}: task {s['task_id']} is not in the benchmark data given")
        if problem.language not in BUILDERS:
            raise ValueError(f"sample {s['key']}: no runner for {problem.language} here (Rust runs when its "
                             "toolchain is installed and a runner added)")
        jobs.append(make_job(s, problem))
    return jobs


def execute_jobs(jobs: list[Job], limits: Limits, workers: int, on_result: Callable[[dict[str, Any]], None],
                 batch_size: int = 64) -> dict[str, float]:
    """Run every job (identical programs once); ``on_result`` gets each sample's row as soon as it is known.
    Returns counts: jobs, unique programs, seconds."""
    start = time.perf_counter()
    by_digest: dict[str, list[Job]] = {}
    for job in jobs:
        by_digest.setdefault(job.digest, []).append(job)
    unique = [group[0] for group in by_digest.values()]

    lock = threading.Lock()  # results arrive from several threads; the callback sees one at a time

    def done(job: Job, row: dict[str, Any]) -> None:
        row["program_sha256"] = job.digest
        with lock:
            for i, twin in enumerate(by_digest[job.digest]):
                on_result({**twin.sample, **row, "passed": row["status"] == "passed", "cached": i > 0})

    def run_single(job: Job) -> None:
        done(job, run_program(job.program, limits))

    pool = ThreadPoolExecutor(workers)
    try:
        futures = [pool.submit(run_single, j) for j in unique if not any(part.claims(j) for part in BATCHED)]
        for part in BATCHED:  # build batch i while the other languages run
            mine = [j for j in unique if part.claims(j)]
            for i in range(0, len(mine), batch_size):
                run_batch(part, mine[i:i + batch_size], limits, max(1, workers), done)
        for f in as_completed(futures):
            f.result()
    except BaseException:  # a stop (or a failure of the sandbox itself): nothing queued starts
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return {"jobs": len(jobs), "unique_programs": len(unique), "seconds": time.perf_counter() - start}


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def ensure_tools(languages: set[str]) -> None:
    """Fail early, naming what is missing and how to get it."""
    missing = [t for lang in sorted(languages) for t in TOOLS.get(lang, []) if shutil.which(t) is None]
    if missing:
        raise FileNotFoundError(f"missing toolchain(s): {', '.join(missing)} (`make test` installs them on Debian)")
