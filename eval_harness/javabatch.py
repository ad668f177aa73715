"""Java programs compiled in batches (the loop: :mod:`eval_harness.batch`): every program goes into its own package
(``package cgN;`` before its imports) and one ``javac`` compiles the batch in the sandbox, saving a JVM start and the
compiler's warm-up per program. The files javac names are compile errors, with their own lines of its diagnostics;
the rest is compiled again. Each program then runs with the batch's classes on its class path.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from eval_harness.batch import BatchPart, Members
from eval_harness.execution import Job, result_row
from eval_harness.runners import JVM
from eval_harness.sandbox import Limits, RunResult

BLAMED = re.compile(r"src/cg(\d+)/Main\.java:\d+: error")


class JavaBatch(BatchPart):
    """javac over many packages; a member javac names is a compile error."""

    prefix = "codegeex-javac-"

    def claims(self, job: Job) -> bool:
        return "Main.java" in job.program.files

    def prepare(self, root: Path, members: Members) -> None:
        for i, job in members:
            (root / "src" / f"cg{i}").mkdir(parents=True, exist_ok=True)
            (root / "src" / f"cg{i}" / "Main.java").write_text(f"package cg{i};\n" + job.program.files["Main.java"])
        (root / "classes").mkdir(exist_ok=True)

    def compile_command(self, root: Path, pending: Members) -> tuple[list[str], dict[str, str]]:
        # every diagnostic to a file: the run's captured output is capped, and javac stops at 100 errors by default
        return ["javac", *(f"-J{o}" for o in JVM[:1] + JVM[2:]), "-nowarn", "-Xmaxerrs", "100000", "-Xstdout",
                "javac.log", "-encoding", "UTF-8", "-d", "classes", *(f"src/cg{i}/Main.java" for i, _ in pending)], {}

    def blame(self, root: Path, out: RunResult) -> tuple[RunResult, set[int]]:
        log = root / "javac.log"
        out = dataclasses.replace(out, stderr=out.stderr + (log.read_text(errors="replace") if log.exists() else ""))
        return out, {int(n) for n in BLAMED.findall(out.stdout + out.stderr)}

    def blamed_row(self, index: int, job: Job, out: RunResult, limits: Limits) -> dict[str, Any]:
        mine = "\n".join(line for line in (out.stdout + out.stderr).splitlines() if f"src/cg{index}/" in line)
        compiled = RunResult(1, out.timed_out, "", mine or out.stderr, out.duration_s, out.isolated)
        return result_row(compiled, None, limits)

    def run_command(self, root: Path, index: int) -> list[str]:
        return ["java", *JVM, "-cp", str(root / "classes"), f"cg{index}.CodegeexRunner"]

    def run_reads(self, root: Path, index: int) -> list[str]:
        return [str(root / "classes" / f"cg{index}")]  # its own package: no other member's classes or sources
