"""Executing samples: assemble the program for its language, run it in the sandbox, classify the outcome.

Statuses: passed, failed, compile_error, timeout, runtime_error, sandbox_violation. A program passes only when it
exits 0 *and* prints a random sentinel that the harness appends after the tests, so exiting early with status 0
(``sys.exit(0)``, ``os._exit(0)``) never passes. Python is implemented here; the compiled languages follow.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from eval_harness.datasets import Problem
from eval_harness.sandbox import Limits, RunResult, run_sandboxed, work_root


def python_interpreter() -> str:
    """The system Python when there is one: the project's virtual environment may live under /tmp, which the sandbox
    replaces with an empty tmpfs (and the tests need only the standard library)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


def python_program(problem: Problem, completion: str, sentinel: str) -> str:
    """HumanEval-X: prompt + completion + tests (which end by calling check); MBPP: solution + setup + asserts."""
    if problem.task_id.startswith("MBPP/"):
        setup = problem.extra.get("test_setup_code", "")
        return f"{completion}\n\n{setup}\n\n{problem.test}\n\nprint({sentinel!r})\n"
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\nprint({sentinel!r})\n"


def classify(result: RunResult, sentinel: str) -> str:
    if result.timed_out:
        return "timeout"
    if result.returncode == 0 and result.stdout.rstrip().endswith(sentinel):
        return "passed"
    if result.returncode == -signal.SIGXFSZ or "[Errno 27] File too large" in result.stderr:
        return "sandbox_violation"  # wrote or printed more than the file-size limit
    if "SyntaxError" in result.stderr or "IndentationError" in result.stderr:
        return "compile_error"
    if "AssertionError" in result.stderr or result.returncode == 0:
        return "failed"  # a wrong answer, or an exit before the tests finished
    return "runtime_error"


def execute_python(problem: Problem, completion: str, limits: Limits | None = None) -> dict[str, Any]:
    """Run one Python sample; the result row (without the sample's own fields)."""
    limits = limits or Limits()
    sentinel = f"codegeex-tests-done-{secrets.token_hex(8)}"
    program = python_program(problem, completion, sentinel)
    with tempfile.TemporaryDirectory(prefix="codegeex-exec-", dir=work_root()) as tmp:
        work = Path(tmp)
        (work / "main.py").write_text(program)
        result = run_sandboxed([python_interpreter(), "-I", "main.py"], work, limits)
    return {"status": classify(result, sentinel), "exit_code": result.returncode, "run_s": round(result.duration_s, 4),
            "output": (result.stdout + result.stderr)[-limits.output_bytes:], "isolated": result.isolated,
            "program_sha256": hashlib.sha256(program.replace(sentinel, "").encode()).hexdigest()}
