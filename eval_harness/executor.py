"""Executing many samples fast: identical programs run once, Java and Go are compiled in batches (Go:
:mod:`eval_harness.gobatch`), workers run in parallel,
results stream to the results file as they finish (see :mod:`eval_harness.samples` for resumption).

Java batches: every program goes into its own package (``package cgN;`` before its imports) and one ``javac`` compiles
the batch in the sandbox, saving a JVM start and the compiler's warm-up per program. If the batch fails, the files
javac names are compile errors, and the rest is compiled again. The compiled classes are then made read-only (owned
by root), and each program runs in its own sandbox and fresh directory with them on its class path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval_harness.datasets import Problem
from eval_harness.execution import new_sentinel, program_digest, result_row, run_program
from eval_harness.gobatch import run_go_batch
from eval_harness.runners import BUILDERS, JVM, Program
from eval_harness.sandbox import Limits, RunResult, compile_limits, run_sandboxed, work_root

log = logging.getLogger("codegeex.eval")


@dataclass
class Job:
    sample: dict[str, Any]
    program: Program
    sentinel: str
    digest: str


def code_and_test(sample: dict[str, Any], problem: Problem) -> tuple[str, str]:
    """The code the completion continues, and the tests, for the sample's kind."""
    kind = sample["kind"]
    if problem.task_id.startswith("MBPP/"):
        return "", problem.test
    if kind == "translation":
        return problem.declaration, problem.test
    if kind == "incremental":
        lines = problem.canonical_solution.splitlines(keepends=True)
        return problem.prompt + "".join(lines[:int(sample.get("prefix_lines", 0))]), problem.test
    if kind == "example":
        if not problem.example_test:
            raise ValueError(f"{problem.task_id} has no example_test for example-test mode")
        return problem.prompt, problem.example_test
    return problem.prompt, problem.test


def make_jobs(samples: list[dict[str, Any]], problems: dict[str, Problem]) -> list[Job]:
    jobs = []
    for s in samples:
        problem = problems.get(s["task_id"])
        if problem is None:
            raise ValueError(f"sample {s['key']}: task {s['task_id']} is not in the benchmark data given")
        if problem.language not in BUILDERS:
            raise ValueError(f"sample {s['key']}: no runner for {problem.language} here (Rust runs when its "
                             "toolchain is installed and a runner added)")
        code, test = code_and_test(s, problem)
        sentinel = new_sentinel()
        program = BUILDERS[problem.language](code + s["completion"], test, problem.extra, sentinel)
        jobs.append(Job(s, program, sentinel, program_digest(program, sentinel)))
    return jobs


def _javac_batch(programs: list[tuple[str, Job]], root: Path, limits: Limits) -> dict[str, RunResult]:
    """Compile ``(package, job)`` pairs into ``root/classes``; returns the failures by package."""
    src = root / "src"
    for pkg, job in programs:
        (src / pkg).mkdir(parents=True, exist_ok=True)
        (src / pkg / "Main.java").write_text(f"package {pkg};\n" + job.program.files["Main.java"])
    (root / "classes").mkdir(exist_ok=True)
    failures: dict[str, RunResult] = {}
    pending = [pkg for pkg, _ in programs]
    base = compile_limits(limits)
    while pending:  # every round drops the files javac names, so this ends
        scaled = dataclasses.replace(base, timeout_s=base.timeout_s * max(1.0, len(pending) / 20))  # a batch is longer
        # every diagnostic to a file: the run's captured output is capped, and javac stops at 100 errors by default
        cmd = ["javac", *(f"-J{o}" for o in JVM[:1] + JVM[2:]), "-nowarn", "-Xmaxerrs", "100000", "-Xstdout",
               "javac.log", "-encoding", "UTF-8", "-d", "classes", *(f"src/{pkg}/Main.java" for pkg in pending)]
        out = run_sandboxed(cmd, root, scaled)
        if out.returncode == 0 and not out.timed_out:
            return failures
        diagnostics = (root / "javac.log").read_text(errors="replace") if (root / "javac.log").exists() else ""
        out = dataclasses.replace(out, stderr=out.stderr + diagnostics)
        named = set(re.findall(r"src/(cg\d+)/Main\.java:\d+: error", out.stdout + out.stderr)) & set(pending)
        if not named or out.timed_out:  # nothing to blame: every file left fails with this output
            named = set(pending)
        for pkg in named:
            failures[pkg] = out
        pending = [p for p in pending if p not in named]
    return failures


def run_java_batch(jobs: list[Job], limits: Limits, workers: int, done: Callable[[Job, dict[str, Any]], None]) -> None:
    with tempfile.TemporaryDirectory(prefix="codegeex-javac-", dir=work_root()) as tmp:
        root = Path(tmp)
        named = [(f"cg{i}", job) for i, job in enumerate(jobs)]
        failures = _javac_batch(named, root, limits)
        for path in [root, *root.rglob("*")]:  # read-only for the programs that run next
            if os.geteuid() == 0:
                os.chown(path, 0, 0)
            path.chmod(0o755 if path.is_dir() else 0o644)
        for pkg, job in named:
            if pkg in failures:
                f = failures[pkg]
                mine = "\n".join(line for line in (f.stdout + f.stderr).splitlines() if f"src/{pkg}/" in line)
                done(job, result_row(job.program, job.sentinel, RunResult(1, f.timed_out, "", mine or f.stderr,
                                                                          f.duration_s, f.isolated), None, limits))

        def run_one(pkg: str, job: Job) -> None:
            cmd = ["java", *JVM, "-cp", str(root / "classes"), f"{pkg}.CodegeexRunner"]
            with tempfile.TemporaryDirectory(prefix="codegeex-exec-", dir=work_root()) as wd:
                result = run_sandboxed(cmd, Path(wd), limits)
            row = result_row(job.program, job.sentinel, None, result, limits)
            done(job, row)

        with ThreadPoolExecutor(workers) as pool:
            runs = [pool.submit(run_one, pkg, job) for pkg, job in named if pkg not in failures]
            for run in as_completed(runs):
                run.result()


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

    java = [j for j in unique if "Main.java" in j.program.files]
    go = [j for j in unique if j.program.unit]
    others = [j for j in unique if "Main.java" not in j.program.files and not j.program.unit]
    def run_other(job: Job) -> None:
        done(job, run_program(job.program, job.sentinel, limits))

    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(run_other, j) for j in others]
        for i in range(0, len(java), batch_size):  # build batch i while the other languages run
            run_java_batch(java[i:i + batch_size], limits, max(1, workers), done)
        for i in range(0, len(go), batch_size):
            run_go_batch(go[i:i + batch_size], limits, max(1, workers), done)
        for f in as_completed(futures):
            f.result()
    return {"jobs": len(jobs), "unique_programs": len(unique), "seconds": time.perf_counter() - start}


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def ensure_tools(languages: set[str]) -> None:
    """Fail early, naming what is missing and how to get it."""
    need = {"cpp": ["g++"], "java": ["javac", "java"], "js": ["node"], "go": ["go"]}
    missing = [t for lang in sorted(languages) for t in need.get(lang, []) if shutil.which(t) is None]
    if missing:
        raise FileNotFoundError(f"missing toolchain(s): {', '.join(missing)} (`make test` installs them on Debian)")
