"""The bare toolchain for benchmarks/eval_execute.py: the commands our harness runs (``Program.compile`` then
``Program.run``, in a fresh directory with ``Program.files`` written and ``Program.linked`` trees linked, env
``Program.env`` + PATH, HOME, LANG), each spawned directly (posix_spawn, as ``subprocess`` does without a preexec_fn)
with the attestation descriptors the epilogue expects (3: a request pipe, 4: a reply pipe already holding the
sentinel); no sandbox, no harness logic, identical programs once as ours does. "Bare batched" runs our batch builds
(the ``eval_harness.batch`` parts' own prepare / compile / run commands) unsandboxed."""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import os
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from eval_harness import sandbox
from eval_harness.batch import BatchPart
from eval_harness.execution import Job
from eval_harness.executor import BATCHED
from eval_harness.runners import Program, link_tree

COMPILE_TIMEOUT_S, RUN_TIMEOUT_S = 60.0, 10.0  # bare: the harness's default limits, as plain timeouts
BATCH_SIZE = 64  # execute_jobs' default

_LIBC = ctypes.CDLL(None, use_errno=True)
_SPAWN_CHDIR = hasattr(_LIBC, "posix_spawn_file_actions_addchdir_np")  # glibc >= 2.29
_DEVNULL = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


@dataclasses.dataclass
class BareResult:
    returncode: int | None  # None: timed out (killed)
    stdout: bytes
    stderr: bytes


def _executable(cmd0: str, cwd: str, path: str) -> str:
    if "/" in cmd0:
        return cmd0 if os.path.isabs(cmd0) else os.path.join(cwd, cmd0)
    return shutil.which(cmd0, path=path) or cmd0


def _spawn(cmd: list[str], cwd: str, env: dict[str, str], fds: dict[int, int]) -> int:
    """posix_spawn (vfork + exec: no Python runs in the child) with ``fds`` (target -> ours) placed, in ``cwd``.
    Our descriptors are close-on-exec (Python's default), so the program gets exactly 0, 1, 2 and the targets."""
    actions = ctypes.create_string_buffer(512)  # posix_spawn_file_actions_t (80 bytes on glibc x86_64)
    if _LIBC.posix_spawn_file_actions_init(actions):
        raise OSError(ctypes.get_errno(), "posix_spawn_file_actions_init")
    staged = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds.values()]  # sources clear of the targets
    try:
        for target, source in zip(fds, staged):
            _LIBC.posix_spawn_file_actions_adddup2(actions, source, target)
        _LIBC.posix_spawn_file_actions_addchdir_np(actions, os.fsencode(cwd))
        argv = (ctypes.c_char_p * (len(cmd) + 1))(*[os.fsencode(a) for a in cmd], None)
        envp = (ctypes.c_char_p * (len(env) + 1))(*[os.fsencode(f"{k}={v}") for k, v in env.items()], None)
        pid = ctypes.c_int()
        path = os.fsencode(_executable(cmd[0], cwd, env.get("PATH", "")))
        err = _LIBC.posix_spawn(ctypes.byref(pid), path, actions, None, argv, envp)
        if err:
            raise OSError(err, os.strerror(err), cmd[0])
        return pid.value
    finally:
        _LIBC.posix_spawn_file_actions_destroy(actions)
        for fd in staged:
            os.close(fd)


def bare_run(cmd: list[str], cwd: str | Path, env: dict[str, str], timeout: float,
             fds: dict[int, int] | None = None) -> BareResult:
    """Run ``cmd`` and nothing else: spawned directly, its output read from two pipes until both close, then
    reaped; killed at ``timeout``."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        if _SPAWN_CHDIR:
            pid = _spawn(cmd, str(cwd), env, {0: _DEVNULL, 1: out_w, 2: err_w, **(fds or {})})
        else:  # an older libc: subprocess, the descriptors placed before exec
            targets = dict(fds or {})
            pid = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                                   pass_fds=tuple(targets.values()),
                                   preexec_fn=lambda: [os.dup2(s, t) for t, s in targets.items()]).pid  # noqa: PLW1509
    finally:
        os.close(out_w)
        os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    open_fds, deadline, killed = [out_r, err_r], time.monotonic() + timeout, False
    try:
        while open_fds:
            remaining = deadline - time.monotonic()
            ready = select.select(open_fds, [], [], max(0.0, remaining))[0] if remaining > 0 else []
            if not ready:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
            for fd in ready:
                data = os.read(fd, 65536)
                if data:
                    chunks[fd].append(data)
                else:
                    open_fds.remove(fd)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(out_r)
        os.close(err_r)
    return BareResult(None if killed else os.waitstatus_to_exitcode(status), b"".join(chunks[out_r]),
                      b"".join(chunks[err_r]))


def attest_on(program: Program) -> str:
    return getattr(program, "attest", "stderr" if getattr(program, "sentinel_on_stderr", False) else "stdout")


def bare_attested_run(job: Job, cmd: list[str], cwd: str | Path, env: dict[str, str]) -> bool:
    """The run step with the harness's attestation descriptors (see eval_harness.sandbox), answered in advance: a
    request pipe on 3 (its read end held open until the end), a reply pipe on 4 holding this run's sentinel. A pass:
    exit status 0 and the sentinel printed where the Program says."""
    sentinel = getattr(job, "sentinel", None) or f"codegeex-tests-done-{secrets.token_hex(12)}"
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    try:
        os.write(reply_w, sentinel.encode() + b"\n")
        os.close(reply_w)
        reply_w = -1
        out = bare_run(cmd, cwd, env, RUN_TIMEOUT_S, {3: request_w, 4: reply_r})
    finally:
        for fd in (request_r, request_w, reply_r, reply_w):
            if fd >= 0:
                os.close(fd)
    if out.returncode != 0:
        return False
    return sentinel.encode() in (out.stderr if attest_on(job.program) == "stderr" else out.stdout)


def work_dir() -> str | None:
    """Where our harness puts its work directories (bare uses the same file system)."""
    root = getattr(sandbox, "work_root", lambda: None)()
    return None if root is None else str(root)


def bare_env(program: Program, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8", **program.env, **(extra or {})}


def bare_one(job: Job) -> bool:
    """One program as its Program says: files written, linked trees linked, compile, run."""
    program = job.program
    with tempfile.TemporaryDirectory(prefix="codegeex-bare-", dir=work_dir()) as tmp:
        for name, text in program.files.items():
            (Path(tmp) / name).write_text(text)
        for name, tree in program.linked.items():
            try:
                link_tree(Path(tree), Path(tmp) / name)
            except OSError:  # another file system: a copy does the same for the tools
                shutil.copytree(tree, Path(tmp) / name, dirs_exist_ok=True)
        env = bare_env(program)
        if program.compile and bare_run(program.compile, tmp, env, COMPILE_TIMEOUT_S).returncode != 0:
            return False
        return bare_attested_run(job, program.run, tmp, env)


def _run_result(out: BareResult, seconds: float) -> Any:
    """A sandbox.RunResult for a batch part's ``blame`` (whatever fields the sandbox module gives it)."""
    values = {"returncode": -9 if out.returncode is None else out.returncode, "timed_out": out.returncode is None,
              "stdout": out.stdout.decode(errors="replace"), "stderr": out.stderr.decode(errors="replace"),
              "duration_s": seconds, "isolated": False, "attested": False}
    fields = dataclasses.fields(sandbox.RunResult)
    return sandbox.RunResult(**{f.name: values.get(f.name) for f in fields})  # type: ignore[arg-type]


def bare_batch(part: BatchPart, jobs: list[Job], pool: ThreadPoolExecutor) -> dict[str, bool]:
    """Our batch build for one language, unsandboxed: the members built together (the compile loop of
    ``eval_harness.batch.compile_batch``), each then run alone in a fresh directory; the rest as single programs."""
    results: dict[str, bool] = {}
    futures: dict[Future[bool], Job] = {}
    runs_blamed_alone = type(part).blamed_row is BatchPart.blamed_row  # Go; Java's blamed are compile errors
    for start in range(0, len(jobs), BATCH_SIZE):
        chunk = jobs[start:start + BATCH_SIZE]
        members = [(i, j) for i, j in enumerate(chunk) if part.joins(j)]
        joined = {i for i, _ in members}
        futures.update({pool.submit(bare_one, j): j for i, j in enumerate(chunk) if i not in joined})
        with tempfile.TemporaryDirectory(prefix=part.prefix, dir=work_dir()) as tmp:
            root = Path(tmp)
            pending, rounds, built = list(members), 0, False
            if members:
                part.prepare(root, members)
            while pending:
                cmd, env = part.compile_command(root, pending)
                t0 = time.perf_counter()
                out = bare_run(cmd, root, bare_env(pending[0][1].program, env),
                               COMPILE_TIMEOUT_S * max(1.0, len(pending) / 20))
                if out.returncode == 0:
                    built = True
                    break
                rounds += 1
                named = part.blame(root, _run_result(out, time.perf_counter() - t0))[1] & {i for i, _ in pending}
                if not named or out.returncode is None or rounds == part.max_rounds:
                    named = {i for i, _ in pending}
                for i, job in pending:
                    if i in named:
                        if runs_blamed_alone:
                            futures[pool.submit(bare_one, job)] = job
                        else:
                            results[job.digest] = False
                pending = [(i, j) for i, j in pending if i not in named]

            def member(index: int, job: Job, root: Path = root) -> bool:
                with tempfile.TemporaryDirectory(prefix="codegeex-bare-", dir=work_dir()) as wd:
                    return bare_attested_run(job, part.run_command(root, index), wd, bare_env(job.program))

            if built:
                futures.update({pool.submit(member, i, j): j for i, j in pending})
            for future, job in list(futures.items()):  # the batch's directory lives until its members have run
                results[job.digest] = future.result()
            futures.clear()
    return results


def unique_jobs(jobs: list[Job]) -> list[Job]:
    first: dict[str, Job] = {}
    for job in jobs:
        first.setdefault(job.digest, job)
    return list(first.values())


def run_bare(jobs: list[Job], workers: int, batched: bool = False) -> tuple[float, list[bool]]:
    """(seconds, each job's verdict): identical programs once, as our harness runs them."""
    unique = unique_jobs(jobs)
    part = next((p for p in BATCHED if batched and unique and p.claims(unique[0])), None)
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        if part is not None:
            verdicts = bare_batch(part, unique, pool)
        else:
            verdicts = dict(zip([j.digest for j in unique], pool.map(bare_one, unique)))
    seconds = time.perf_counter() - start
    return seconds, [verdicts[j.digest] for j in jobs]


