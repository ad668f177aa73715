"""Programs compiled in batches: one compiler run builds many samples, and each sample then runs alone, in its own
sandbox and fresh directory, against the batch's output.

The loop is the same for every batched language (:mod:`eval_harness.javabatch`, :mod:`eval_harness.gobatch`): write
the members' sources, compile the pending ones (the timeout stretched with the batch), and when the build fails, blame
the members the compiler names and compile the rest again; a failure that names no member, or a timeout, blames every
member left. A language's part says which samples may join, how to write and compile them, whom a failure names, what
becomes of a blamed member (a compile error from the batch's diagnostics, or a run alone as a single program) and how a
member runs. The build is then made root's and read-only, so a program can read it but not change it for the next.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from common.io import make_read_only, tree
from eval_harness.execution import Job, result_row, run_program
from eval_harness.sandbox import Limits, RunResult, compile_limits, isolation_available, run_sandboxed
from eval_harness.workdirs import work_dir

Members = list[tuple[int, Job]]  # (index in the batch, job)
Done = Callable[[Job, dict[str, Any]], None]


class BatchPart(abc.ABC):
    """What one language adds to the batch loop."""

    prefix = "codegeex-batch-"  # of the batch's work directory
    shared: tuple[str, ...] = ()  # top-level folders of the batch linked from a shared cache: left as they are
    max_rounds = 0  # compile rounds before every member left is blamed (0: until the build passes or none is left)

    @abc.abstractmethod
    def claims(self, job: Job) -> bool:
        """Whether the job is this language's (it goes through :func:`run_batch`)."""

    def joins(self, job: Job) -> bool:
        """Whether the job may be built with others; the rest run alone as single programs."""
        return True

    @abc.abstractmethod
    def prepare(self, root: Path, members: Members) -> None:
        """Write every member's sources under ``root``."""

    @abc.abstractmethod
    def compile_command(self, root: Path, pending: Members) -> tuple[list[str], dict[str, str]]:
        """(command, environment) compiling the pending members in ``root`` (files of this round written)."""

    @abc.abstractmethod
    def blame(self, root: Path, out: RunResult) -> tuple[RunResult, set[int]]:
        """(the failed build's result with every diagnostic in it, the member indices it names)."""

    def blamed_row(self, index: int, job: Job, out: RunResult, limits: Limits) -> dict[str, Any] | None:
        """The result of a member the build blamed, or None to run it alone as a single program."""
        return None

    @abc.abstractmethod
    def run_command(self, root: Path, index: int) -> list[str]:
        """Runs member ``index`` of the built batch."""

    @abc.abstractmethod
    def run_reads(self, root: Path, index: int) -> list[str]:
        """What of the build member ``index``'s run may see (read-only): its own part only, so that no member can
        read another's program or run another's tests."""


def compile_batch(part: BatchPart, root: Path, members: Members, limits: Limits) -> tuple[dict[int, RunResult],
                                                                                          RunResult | None]:
    """(blamed member index -> the build result that blamed it, the passing build or None when every member was
    blamed)."""
    blamed: dict[int, RunResult] = {}
    pending = list(members)
    base = compile_limits(limits)
    rounds = 0
    while pending:
        cmd, env = part.compile_command(root, pending)
        scaled = dataclasses.replace(base, timeout_s=base.timeout_s * max(1.0, len(pending) / 20))  # a batch is longer
        out = run_sandboxed(cmd, root, scaled, env)
        if out.returncode == 0 and not out.timed_out:
            return blamed, out
        rounds += 1
        out, named = part.blame(root, out)
        named &= {i for i, _ in pending}
        if not named or out.timed_out or rounds == part.max_rounds:  # nothing to blame, or no round left: every
            named = {i for i, _ in pending}  # member left fails with this output
        blamed.update(dict.fromkeys(named, out))
        pending = [(i, job) for i, job in pending if i not in named]
    return blamed, None


def seal(root: Path, shared: tuple[str, ...] = ()) -> None:
    """``root`` and everything under it owned by root (when we are root) and read-only: the programs that run next
    can read the build, not change it. Folders named in ``shared`` hold hard links into a cache that is read-only
    already and are not walked (changing them would change the cache)."""
    if os.geteuid() == 0:
        for path in tree(root, shared):
            os.chown(path, 0, 0, follow_symlinks=False)
    make_read_only(root, skip=shared)


def run_batch(part: BatchPart, jobs: list[Job], limits: Limits, workers: int, done: Done) -> None:
    """Build the jobs that may join together and run each alone; every other job runs as a single program."""
    members = [(i, job) for i, job in enumerate(jobs) if part.joins(job)]
    joined = {i for i, _ in members}

    def run_alone(job: Job) -> None:
        done(job, run_program(job.program, limits))

    with work_dir(isolation_available(), part.prefix) as tmp, \
            ThreadPoolExecutor(max(1, workers)) as pool:
        root = Path(tmp)
        futures = [pool.submit(run_alone, job) for i, job in enumerate(jobs) if i not in joined]
        blamed: dict[int, RunResult] = {}
        build = None
        if members:
            part.prepare(root, members)
            blamed, build = compile_batch(part, root, members, limits)
        for i, job in members:
            if i in blamed:
                row = part.blamed_row(i, job, blamed[i], limits)
                if row is None:
                    futures.append(pool.submit(run_alone, job))
                else:
                    done(job, row)
        if build is not None:
            seal(root, part.shared)
            built = [(i, job) for i, job in members if i not in blamed]
            futures += _run_members(part, root, built, build.duration_s / len(built), limits, pool, done)
        for future in as_completed(futures):
            future.result()


def _run_members(part: BatchPart, root: Path, built: Members, share_s: float, limits: Limits,
                 pool: ThreadPoolExecutor, done: Done) -> list[Future[None]]:
    def run_one(index: int, job: Job) -> None:
        with work_dir(isolation_available()) as wd:
            result = run_sandboxed(part.run_command(root, index), Path(wd), limits, job.program.env,
                                   [*part.run_reads(root, index), *job.program.readonly], attest=job.program.attest)
        row = result_row(None, result, limits)
        row["compile_s"] = round(share_s, 4)  # the batch build, shared out
        done(job, row)

    return [pool.submit(run_one, i, job) for i, job in built]
