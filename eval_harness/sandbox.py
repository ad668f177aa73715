"""Running untrusted programs: nothing of a run outlives it, it sees almost nothing of the host, and it cannot
forge its own success.

Each run, as root (backend ``helper``, see :mod:`eval_harness.sandbox_backends`):
- is the tree under PID 1 of new PID, mount, network, IPC and UTS namespaces. PID 1 is the harness's reaper, not the
  program: when the program's first process exits, times out, or the harness stops, that PID 1 dies and the kernel
  kills every process left in the namespace (``setsid``, double forks and changed process groups cannot leave it).
  The reaper's parent, the helper, has the parent-death signal: whatever kills the harness (SIGKILL too), the helper
  tears the run down;
- sees a root file system made for it: the toolchains read-only (``/usr``, the loader's cache, ``/etc/alternatives``,
  Java's configuration; see ``SYSTEM_READ``) and what the run names (a precompiled header, a batch's build), its work
  directory read-write, private tmpfs on ``/tmp``, ``/var/tmp``, ``/run`` and ``/dev/shm``, five device nodes, its own
  ``/proc``; nothing else of the host (no checkout, no data sets, no home, no host sockets), no network interfaces;
- runs as a uid of its own (drawn per run from an unused range; no account, no groups) with no new privileges, under
  rlimits on CPU time, address space, processes (counted per uid: the run's own), file size (which also caps what it
  can print: its output goes to files), in a minimal environment, against a wall-clock timeout.
Where cgroups can be delegated they would add a memory limit for the whole tree; here (cgroup v1, no delegation) the
address-space limit is per process, so a run's total memory is at most ``processes`` x ``memory_bytes``.

Attestation: a program passes only when the tests ran to their end. The runner's epilogue (after the tests) writes a
request on descriptor 3; the harness answers on descriptor 4 with a random sentinel made for this run, and the
epilogue prints it. The sentinel is in no file, argument or environment of the program, and is handed out once.

Without root (backend ``plain``) only the rlimits, a session of its own and the timeout apply; every result says
``isolated: false``, and the guarantees lost are logged once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import select
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from common.config import option
from eval_harness import sandbox_backends as backends
from eval_harness.sandbox_backends import SandboxError
from eval_harness.stopping import STOP, Stopped
from eval_harness.warm import ZygoteDied, warm_zygote
from eval_harness.workdirs import work_dir

log = logging.getLogger("codegeex.eval")
UID_BASE, UID_SPAN = 200_000, 100_000  # far above the accounts of a Debian system
BACKENDS = ("helper", "bwrap", "plain")
LOST_WITHOUT_CGROUPS = ("no cgroups are used (not delegated here): a run's whole tree has no memory limit (at most "
                        "processes x memory_bytes), its work directory no quota (each file is capped); the PID "
                        "namespace, not cgroup.kill, kills the tree")
LOST_WITHOUT_ROOT = ("no namespaces (not root): a program can read and write what this user can, reach the network, "
                     "and leave processes behind when it leaves its session")


def sandbox_uid() -> int:
    """A fresh uid for one run (two concurrent runs share one with probability 1e-5)."""
    return UID_BASE + secrets.randbelow(UID_SPAN)


@dataclass
class Limits:
    """Per-program limits."""

    timeout_s: float = option(10.0, "wall-clock seconds before the whole process tree is killed")
    compile_timeout_s: float = option(60.0, "compile step's wall clock, stretched by the load (see compile_limits)")
    cpu_s: int = option(20, "CPU seconds (RLIMIT_CPU)")
    memory_bytes: int = option(4 << 30, "address space (RLIMIT_AS)")
    processes: int = option(64, "processes and threads of the sandbox user (RLIMIT_NPROC)")
    file_bytes: int = option(16 << 20, "largest file it may write, its output included (RLIMIT_FSIZE)")
    output_bytes: int = option(4096, "stdout/stderr kept in the result")


@dataclass
class RunResult:
    returncode: int
    timed_out: bool
    stdout: str
    stderr: str
    duration_s: float
    isolated: bool
    attested: bool = False  # the sentinel handed out for this run appeared where it was asked for


def compile_limits(limits: Limits) -> Limits:
    """Compilers get their own timeout, stretched when the machine is busier than it has cores, so a loaded machine
    does not fail correct programs."""
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    return dataclasses.replace(limits, timeout_s=limits.compile_timeout_s * max(1.0, load),
                               cpu_s=max(limits.cpu_s, int(limits.compile_timeout_s * 2)))


_BACKEND: str | None = None


def _probe(backend: str) -> bool:
    with work_dir(True, "codegeex-probe-") as tmp:
        try:
            result = run_sandboxed(["true"], Path(tmp), Limits(timeout_s=10), backend=backend)
        except (OSError, SandboxError, subprocess.SubprocessError) as exc:
            log.debug("sandbox backend %s unavailable: %s", backend, exc)
            return False
    return result.returncode == 0


def default_backend() -> str:
    """``helper`` as root when it works, else ``plain`` (logged once, with what is lost)."""
    global _BACKEND
    if _BACKEND is None:
        chosen = os.environ.get("CODEGEEX_SANDBOX", "")
        if chosen and chosen not in BACKENDS:
            raise ValueError(f"CODEGEEX_SANDBOX={chosen!r}: expected one of {', '.join(BACKENDS)}")
        if not chosen:
            chosen = "helper" if os.geteuid() == 0 and _probe("helper") else "plain"
        if chosen == "plain":
            log.warning("sandbox without isolation: %s", LOST_WITHOUT_ROOT)
        else:
            log.info("sandbox: %s; %s", chosen, LOST_WITHOUT_CGROUPS)
        _BACKEND = chosen
    return _BACKEND


def isolation_available() -> bool:
    return default_backend() != "plain"


def work_root() -> Path:
    """Where this process's work directories go (see :mod:`eval_harness.workdirs`)."""
    from eval_harness.workdirs import run_root

    return run_root(isolation_available())


def _own(workdir: Path, uid: int) -> None:
    os.chown(workdir, uid, uid)
    for p in workdir.rglob("*"):
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        if stat.S_ISDIR(st.st_mode) or st.st_nlink == 1:  # hard links into a shared read-only tree stay root's
            os.chown(p, uid, uid, follow_symlinks=False)


class Handle(Protocol):
    """A started run: :class:`~eval_harness.sandbox_backends.Spawned` or :class:`~eval_harness.warm.WarmRun`."""

    def done_fd(self) -> int: ...

    def teardown(self) -> None: ...

    def returncode(self) -> int: ...


def _wait(handle: Handle, timeout: float, request: int, reply: int, sentinel: str) -> tuple[str, bool]:
    """Wait for the run to end, answering the epilogue's request once; (why it ended: exited | timeout | stopped,
    whether the sentinel was handed out). ``request`` and ``reply`` are non-blocking: a program that fills the reply
    pipe, or drains its own request, cannot block the harness past its timeout."""
    done = handle.done_fd()
    poller = select.poll()
    for fd in (done, STOP.fileno(), request):
        poller.register(fd, select.POLLIN)
    answered = False
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout", answered
        ready = {fd for fd, _ in poller.poll(remaining * 1000)}
        if STOP.fileno() in ready or STOP.is_set():
            return "stopped", answered
        if done in ready:
            return "exited", answered
        if request in ready:
            try:
                asked = os.read(request, 64)
            except BlockingIOError:
                continue  # someone else drained it
            poller.unregister(request)  # one answer per run; EOF (the program closed it) needs none
            if asked and not answered:
                with contextlib.suppress(BrokenPipeError, BlockingIOError):
                    answered = os.write(reply, sentinel.encode() + b"\n") > 0


def _read(fd: int, limit: int, sentinel: str) -> tuple[str, bool]:
    """(the first ``limit`` characters of the output, the sentinel masked; whether the sentinel is anywhere in it).
    The whole output is searched: its size is bounded by the file-size limit."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0) if size else b""
    shown = sentinel.encode() in data
    text = data[:limit + 1 + len(sentinel)].decode("utf-8", "replace").replace(sentinel, "<sentinel>")
    return text[:limit] + ("\n[... output truncated]" if len(text) > limit else ""), shown


def run_sandboxed(cmd: list[str], workdir: Path, limits: Limits, env: dict[str, str] | None = None,
                  readonly: list[str] | tuple[str, ...] = (), attest: str = "", backend: str | None = None,
                  warm: bool = False) -> RunResult:
    """Run ``cmd`` in ``workdir`` (which the caller created and owns), seeing ``readonly`` paths of the host besides
    the toolchains. ``attest`` ("stdout" or "stderr"): where the epilogue prints the sentinel it asks for. ``warm``
    (``cmd`` is ``[python, -I, script]``): fork it from the warm interpreter (:mod:`eval_harness.warm`) where there is
    one. Never raises for what the program does; raises :class:`~eval_harness.stopping.Stopped` (after killing the
    run) when a stop is requested, :class:`SandboxError` when the sandbox itself fails."""
    STOP.check()
    backend = backend or default_backend()
    if warm and backend == "helper" and not readonly:
        try:
            return _run(cmd, workdir, limits, env, readonly, attest, backend, warm=True)
        except ZygoteDied as exc:
            log.warning("%s; running this program cold", exc)
    return _run(cmd, workdir, limits, env, readonly, attest, backend, warm=False)


def _run(cmd: list[str], workdir: Path, limits: Limits, env: dict[str, str] | None, readonly: list[str] | tuple[str, ...],
         attest: str, backend: str, warm: bool) -> RunResult:
    base_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
                "LANG": "C.UTF-8", **(env or {})}
    uid = sandbox_uid()
    if backend != "plain":
        _own(workdir, uid)
    sentinel = f"codegeex-tests-done-{secrets.token_hex(12)}"
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    os.set_blocking(request_r, False)
    os.set_blocking(reply_w, False)
    if backend != "plain":  # Java reopens them through /proc/self/fd, which checks the pipe's owner
        os.fchown(request_w, uid, uid)
        os.fchown(reply_r, uid, uid)
    out, err = os.memfd_create("stdout"), os.memfd_create("stderr")  # no file system; the file-size limit holds
    start = time.perf_counter()
    try:
        zygote = warm_zygote() if warm else None
        handle: Handle
        if zygote is not None:
            handle = zygote.start(cmd[-1], workdir, uid, limits, base_env, (request_w, reply_r), out, err)
        else:
            handle = backends.SPAWN[backend](cmd, workdir, limits, base_env, list(readonly), uid, (request_w, reply_r),
                                             out, err)
        os.close(request_w)
        os.close(reply_r)
        request_w = reply_r = -1
        try:
            why, answered = _wait(handle, limits.timeout_s, request_r, reply_w, sentinel)
        finally:
            handle.teardown()
        returncode = handle.returncode()
        duration = time.perf_counter() - start
        if why == "stopped" or STOP.is_set():  # a run killed by the stop is not a result
            raise Stopped(STOP.reason)
        (stdout, on_out), (stderr, on_err) = (_read(out, limits.output_bytes, sentinel),
                                              _read(err, limits.output_bytes, sentinel))
    finally:
        for fd in (request_r, request_w, reply_r, reply_w, out, err):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
    shown = on_out if attest == "stdout" else on_err if attest == "stderr" else False
    return RunResult(returncode, why == "timeout", stdout, stderr, duration, backend != "plain", answered and shown)
