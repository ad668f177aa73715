"""Running untrusted programs: one fresh directory, limits, no network, the whole process tree killed at timeout.

Each program runs:
- in its own process group and, where ``unshare`` works (as root here), in new network, PID and mount namespaces:
  no network interfaces, every descendant dies with it, its own ``/proc`` (no other process is visible), private
  empty ``/tmp``, ``/var/tmp`` and ``/dev/shm`` (so
  work directories live under ``/var/lib/codegeex/exec``, or ``$CODEGEEX_EXEC_DIR``, see :func:`work_root`);
- as an unprivileged user of its own (a uid drawn per run from an unused range, no account, no groups) when started
  as root, so it cannot write outside its work directory, cannot touch a concurrent sample's files or processes, and
  its process limit is its own (RLIMIT_NPROC counts every process of a uid; root ignores it);
- under rlimits on CPU time, address space, processes and file size (which also caps what it can print: its output
  goes to files), with a minimal environment and a wall-clock timeout that kills the process group.
When the namespaces are not available the result says ``isolated: False``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common.config import option

UID_BASE, UID_SPAN = 200_000, 100_000  # far above the accounts of a Debian system


def sandbox_uid() -> int:
    """A fresh uid for one run (two concurrent runs share one with probability 1e-5)."""
    return UID_BASE + secrets.randbelow(UID_SPAN)


@dataclass
class Limits:
    """Per-program limits."""

    timeout_s: float = option(10.0, "wall-clock seconds before the process group is killed")
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


def compile_limits(limits: Limits) -> Limits:
    """Compilers get their own timeout, stretched when the machine is busier than it has cores, so a loaded machine
    does not fail correct programs."""
    import dataclasses

    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    return dataclasses.replace(limits, timeout_s=limits.compile_timeout_s * max(1.0, load),
                               cpu_s=max(limits.cpu_s, int(limits.compile_timeout_s * 2)))


def _namespaces_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--kill-child", "--setgid=65534", "--setuid=65534", "true"],
                           capture_output=True, preexec_fn=_enter_namespaces)  # noqa: PLW1509
    return probe.returncode == 0


_ISOLATION: bool | None = None


def isolation_available() -> bool:
    global _ISOLATION
    if _ISOLATION is None:
        _ISOLATION = _namespaces_available()
    return _ISOLATION


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child only calls into it
CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_REC, MS_PRIVATE = 0x4000, 0x40000
PR_SET_NO_NEW_PRIVS = 38
PRIVATE_DIRS = (b"/tmp", b"/var/tmp", b"/dev/shm")


def _enter_namespaces() -> None:
    """In the child, before exec: new network and mount namespaces (mounts made private first, so nothing propagates
    back to the host), an empty tmpfs on each shared scratch directory, and no gaining privileges by exec. Done with
    system calls here rather than by `unshare`/`mount`/`setpriv` processes: each exec saved is ~1-2 ms a sample."""
    calls: list[tuple[str, tuple[object, ...]]] = [
        ("prctl", (PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)), ("unshare", (CLONE_NEWNS | CLONE_NEWNET,)),
        ("mount", (b"none", b"/", None, MS_REC | MS_PRIVATE, None))]
    calls += [("mount", (b"tmpfs", d, b"tmpfs", 0, b"size=64m")) for d in PRIVATE_DIRS]
    for name, args in calls:
        if getattr(_LIBC, name)(*args) != 0:
            os._exit(97)


def _limit(limits: Limits, isolated: bool) -> None:
    """In the child, before exec."""
    os.setsid()
    for res, value in ((resource.RLIMIT_CPU, limits.cpu_s), (resource.RLIMIT_AS, limits.memory_bytes),
                       (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))
    if os.geteuid() == 0:  # counted for the sandbox uid once unshare switches to it
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
    if isolated:
        _enter_namespaces()


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for ``proc`` up to ``timeout`` seconds; True when it timed out. A pidfd wakes us the moment it exits
    (``Popen.wait(timeout)`` polls with growing sleeps, adding up to ~10 ms to a short program)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout)
            return False
        except subprocess.TimeoutExpired:
            return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    return not ready


def work_root() -> Path | None:
    """Where work directories go: outside /tmp (which the sandbox replaces), traversable but not listable."""
    if not isolation_available():
        return None
    root = Path(os.environ.get("CODEGEEX_EXEC_DIR", "/var/lib/codegeex/exec"))
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o711)
    return root


def run_sandboxed(cmd: list[str], workdir: Path, limits: Limits, env: dict[str, str] | None = None) -> RunResult:
    """Run ``cmd`` in ``workdir`` (which the caller created and owns); never raises for what the program does."""
    isolated = isolation_available()
    base_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
                "LANG": "C.UTF-8", **(env or {})}
    if isolated:
        uid = sandbox_uid()
        os.chown(workdir, uid, uid)
        for p in workdir.rglob("*"):
            if p.is_dir() or p.stat().st_nlink == 1:  # hard links into a shared read-only tree stay root's
                os.chown(p, uid, uid)
        # network and mount namespaces come from _limit; `unshare` adds the PID namespace (every descendant dies
        # with its first process) and drops to the uid (setgroups, setgid, setuid) in the forked child
        cmd = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", f"--setgid={uid}", f"--setuid={uid}", *cmd]
    with tempfile.TemporaryDirectory() as out_dir:
        out, err = Path(out_dir) / "stdout", Path(out_dir) / "stderr"
        start = time.perf_counter()
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(cmd, cwd=workdir, env=base_env, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                    preexec_fn=lambda: _limit(limits, isolated))  # noqa: PLW1509 (must be pre-exec)
            timed_out = False
            try:
                timed_out = _wait(proc, limits.timeout_s)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        duration = time.perf_counter() - start

        def tail(path: Path) -> str:
            with open(path, "rb") as fh:
                data = fh.read(limits.output_bytes + 1)
            text = data[:limits.output_bytes].decode("utf-8", "replace")
            return text + ("\n[... output truncated]" if len(data) > limits.output_bytes else "")

        return RunResult(proc.returncode, timed_out, tail(out), tail(err), duration, isolated)
