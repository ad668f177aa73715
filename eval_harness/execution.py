"""Executing one sample: assemble the program for its language and kind (:mod:`eval_harness.runners`), compile it
under its own timeout, run it in the sandbox, classify the outcome.

Statuses: passed, failed, compile_error, timeout, runtime_error, sandbox_violation. A program passes only when it
exits 0 *and* its epilogue attested that the tests ran to their end (the sentinel protocol of
:mod:`eval_harness.sandbox`).
"""

from __future__ import annotations

import hashlib
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval_harness.datasets import Problem, is_mbpp
from eval_harness.runners import BUILDERS, WHOLE_PROGRAM, Program, link_tree
from eval_harness.sandbox import Limits, RunResult, compile_limits, isolation_available, run_sandboxed
from eval_harness.tasks import Kind
from eval_harness.workdirs import work_dir

STATUSES = ("passed", "failed", "compile_error", "timeout", "runtime_error", "sandbox_violation")
FAILURE_MARKS = ("AssertionError", "Assertion failed", "Assertion `", "--- FAIL", "Error Trace:")
SYNTAX_MARKS = ("SyntaxError", "IndentationError", "TabError")


def classify(compiled: RunResult | None, result: RunResult | None) -> str:
    if compiled is not None and (compiled.timed_out or compiled.returncode != 0):
        return "timeout" if compiled.timed_out else "compile_error"
    assert result is not None
    if result.timed_out:
        return "timeout"
    if result.returncode == 0 and result.attested:
        return "passed"
    if result.returncode == -signal.SIGXFSZ or "[Errno 27] File too large" in result.stderr:
        return "sandbox_violation"  # wrote or printed more than the file-size limit
    if any(m in result.stderr for m in SYNTAX_MARKS):
        return "compile_error"
    if result.returncode == 0 or any(m in result.stdout + result.stderr for m in FAILURE_MARKS):
        return "failed"  # a wrong answer, or an exit before the tests finished
    return "runtime_error"


def program_digest(program: Program) -> str:
    """Identifies a program: identical programs are run once."""
    text = "\0".join(f"{k}\0{v}" for k, v in sorted(program.files.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def run_program(program: Program, limits: Limits) -> dict[str, Any]:
    """Compile (own timeout, stretched by load) and run one program in fresh directories; the result row."""
    compiled = result = None
    with work_dir(isolation_available(), warm=program.warm) as tmp:
        work = Path(tmp)
        for name, text in program.files.items():
            (work / name).write_text(text)
        for name, tree in program.linked.items():
            link_tree(Path(tree), work / name)
        if program.compile:
            compiled = run_sandboxed(program.compile, work, compile_limits(limits), program.env, program.readonly)
        if compiled is None or (compiled.returncode == 0 and not compiled.timed_out):
            result = run_sandboxed(program.run, work, limits, program.env, program.readonly, attest=program.attest,
                                   warm=program.warm)
    return result_row(compiled, result, limits)


def result_row(compiled: RunResult | None, result: RunResult | None, limits: Limits) -> dict[str, Any]:
    last = result or compiled
    assert last is not None
    return {"status": classify(compiled, result), "exit_code": last.returncode,
            "compile_s": round(compiled.duration_s, 4) if compiled else 0.0,
            "run_s": round(result.duration_s, 4) if result else 0.0,
            "output": (last.stdout + last.stderr)[-limits.output_bytes:], "isolated": last.isolated}


@dataclass
class Job:
    """One sample's program, ready to run: the sample's fields, the program and its digest."""

    sample: dict[str, Any]
    program: Program
    digest: str


def code_and_test(sample: dict[str, Any], problem: Problem) -> tuple[str, str]:
    """The code the completion continues, and the tests, for the sample's kind."""
    kind = sample["kind"]
    if is_mbpp(problem.task_id):
        return "", problem.test
    if kind == Kind.TRANSLATION:
        return problem.declaration, problem.test
    if kind == Kind.INCREMENTAL:
        lines = problem.canonical_solution.splitlines(keepends=True)
        return problem.prompt + "".join(lines[:int(sample.get("prefix_lines", 0))]), problem.test
    if kind == Kind.EXAMPLE:
        if not problem.example_test:
            raise ValueError(f"{problem.task_id} has no example_test for example-test mode")
        return problem.prompt, problem.example_test
    return problem.prompt, problem.test


def make_job(sample: dict[str, Any], problem: Problem) -> Job:
    """The program of ``sample`` (which has at least ``kind`` and ``completion``) for ``problem``. A sample marked
    ``whole_program`` (its completion includes the prompt) gets no code before it, and its builder is told so."""
    code, test = code_and_test(sample, problem)
    extra = problem.extra
    if sample.get("whole_program"):
        code, extra = "", {**extra, WHOLE_PROGRAM: "true"}
    program = BUILDERS[problem.language](code + sample["completion"], test, extra)
    return Job(sample, program, program_digest(program))


def execute(problem: Problem, completion: str, limits: Limits | None = None) -> dict[str, Any]:
    """One generation sample: the problem's prompt (none for MBPP, whose completion is the whole solution) +
    ``completion``, then the problem's tests."""
    job = make_job({"kind": Kind.GENERATION, "completion": completion}, problem)
    row = run_program(job.program, limits or Limits())
    row["program_sha256"] = job.digest
    return row
