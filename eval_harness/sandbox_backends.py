"""How a sandboxed program is started, per backend (:mod:`eval_harness.sandbox` runs the common part: the files,
the wait, the attestation protocol, the teardown, the result).

- ``helper``: our own small C program (``sandbox_init.c``, compiled once per machine), as root: new PID, mount,
  network, IPC and UTS namespaces whose PID 1 is the helper's reaper, a minimal read-only root, the program as a uid
  of its own. One exec from the harness, no shell.
- ``bwrap``: bubblewrap with the same root and namespaces (its user namespace, the program as the same own uid);
  measured beside ``helper`` (docs/benchmarks.md) and kept as the second way to get every guarantee.
- ``plain``: no namespaces (not root, or neither of the above works): its own session and rlimits only; results say
  ``isolated: false`` and the guarantees lost are logged once.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import resource
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval_harness.runners import build_once

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "sandbox_init.c"
# what a program may read of the host: the toolchains (everything under /usr), the dynamic loader's cache, the
# alternatives' links into /usr, and Java's configuration (its conf/ links to /etc/java-N); /bin, /lib, ... as the
# host has them. Nothing else: no checkout, no data sets, no home, no /var, no /run, no host /tmp, no /sys.
SYSTEM_READ = ["/usr", "/etc/alternatives", "/etc/ld.so.cache", *sorted(glob.glob("/etc/java-*"))]
TOP_LEVEL = ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
SCRATCH_SIZE = "64m"  # each of /tmp, /var/tmp, /dev/shm


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): the run cannot be judged."""


@dataclass
class Spawned:
    """A started sandbox: the process the harness waits on, and how to read its report. The harness waits for
    :meth:`done_fd` to become readable, then calls :meth:`teardown` and :meth:`returncode` (the same three methods as
    :class:`eval_harness.warm.WarmRun`)."""

    proc: subprocess.Popen[bytes]
    backend: str
    report_fd: int = -1  # helper: its one-line report
    info_fd: int = -1  # bwrap: its JSON info (the sandbox's PID 1)
    pidfd: int = -1

    def done_fd(self) -> int:
        """Readable once the sandbox's process has exited (a pidfd)."""
        if self.pidfd < 0:
            self.pidfd = os.pidfd_open(self.proc.pid)
        return self.pidfd

    def teardown(self) -> None:
        """Kill the run's whole tree and reap it; returns once nothing of it is left (helper, bwrap) or its session
        was killed (plain)."""
        proc = self.proc
        if proc.poll() is None:
            if self.backend == "helper":
                proc.send_signal(signal.SIGTERM)  # the helper kills its PID 1 and waits for the namespace to empty
            elif self.backend == "bwrap":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(bwrap_child(self) or proc.pid, signal.SIGKILL)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            if self.backend == "helper":
                proc.wait()  # no deadline: its wait for PID 1 returns once the namespace is empty, the guarantee
            else:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for fd in (self.pidfd, self.info_fd):
            if fd >= 0:
                os.close(fd)
        self.pidfd = self.info_fd = -1

    def returncode(self) -> int:
        """The program's exit status as ``Popen.returncode`` gives it (negative: killed by that signal)."""
        report = read_report(self)
        if self.backend != "helper":
            return int(self.proc.returncode)
        if report.startswith("exit "):
            return os.waitstatus_to_exitcode(int(report.split()[1]))
        if report == "killed":
            return -signal.SIGKILL
        raise SandboxError(f"the sandbox helper failed: {report or f'exit status {self.proc.returncode}, no report'}")


def helper_path() -> Path:
    """The compiled helper, built once per machine (and again when its source changes)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    base = Path(os.environ.get("CODEGEEX_SANDBOX_DIR", "/var/lib/codegeex"))

    def build(staging: Path) -> None:
        binary = ["gcc", "-O2", "-Wall", "-o", str(staging / "codegeex-sandbox"), str(SOURCE)]
        # static when the C library allows: no dynamic loading, ~1 ms less a run here
        if subprocess.run([*binary, "-static"], capture_output=True).returncode != 0:
            subprocess.run(binary, check=True, capture_output=True)
        (staging / "root").mkdir()  # the mount point of each run's new root (a tmpfs inside its own namespace)

    return build_once(base / f"sandbox-{digest}", build)


def rlimits(limits: Any) -> list[tuple[str, int, int]]:
    """(helper name, resource, value) for a :class:`~eval_harness.sandbox.Limits`."""
    out = [("cpu", resource.RLIMIT_CPU, limits.cpu_s), ("as", resource.RLIMIT_AS, limits.memory_bytes),
           ("fsize", resource.RLIMIT_FSIZE, limits.file_bytes), ("core", resource.RLIMIT_CORE, 0)]
    if os.geteuid() == 0 or os.getuid() != os.geteuid():
        out.append(("nproc", resource.RLIMIT_NPROC, limits.processes))
    return out


def spawn_helper(cmd: list[str], workdir: Path, limits: Any, env: dict[str, str], readonly: list[str], uid: int,
                 fds: tuple[int, int], out: int, err: int, as_root: bool = False) -> Spawned:
    helper = helper_path()
    report_r, report_w = os.pipe()
    args = [str(helper / "codegeex-sandbox"), "-p", str(os.getpid()), "-u", str(uid), "-r", str(helper / "root"),
            "-w", str(workdir), "-f", f"{fds[0]},{fds[1]},{report_w}", "-s", SCRATCH_SIZE, *(["-R"] if as_root else [])]
    for path in SYSTEM_READ + readonly:
        args += ["-b", path]
    for name, _, value in rlimits(limits) if limits is not None else []:
        args += ["-l", f"{name}={value}"]
    try:
        # its own session: a Ctrl-C to the terminal's process group reaches the harness, which stops its runs; the
        # helper's parent-death signal still covers the harness's death
        proc = subprocess.Popen([*args, "--", *cmd], cwd="/", env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                pass_fds=(fds[0], fds[1], report_w), start_new_session=True)
    finally:
        os.close(report_w)
    return Spawned(proc, "helper", report_fd=report_r)


def bwrap_args(cmd: list[str], workdir: Path, readonly: list[str], info_fd: int) -> list[str]:
    args = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--hostname", "sandbox",
            "--info-fd", str(info_fd)]
    for top in TOP_LEVEL:
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for path in SYSTEM_READ + readonly:
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    args += ["--bind", str(workdir), str(workdir), "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
             "--tmpfs", "/var/tmp", "--tmpfs", "/run", "--tmpfs", "/dev/shm", "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", str(workdir),
             "--", *cmd]
    return args


def _place(fds: tuple[int, ...]) -> None:
    """In the child: ``fds`` moved to 3, 4, ... whatever numbers they had (moved out of the way first), the only
    inheritable descriptors besides 0-2 (Python's own are not inheritable; Popen runs with close_fds=False because it
    would close these after this function)."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in fds]  # free numbers from 10 up: none is a target
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)
    for fd in high:
        os.close(fd)


def spawn_bwrap(cmd: list[str], workdir: Path, limits: Any, env: dict[str, str], readonly: list[str], uid: int,
                fds: tuple[int, int], out: int, err: int) -> Spawned:
    info_r, info_w = os.pipe()
    limited = rlimits(limits)

    def pre_exec() -> None:  # after the drop to uid (Popen's user=): fds at 3, 4 and 5, the limits
        _place((fds[0], fds[1], info_w))
        for _, res, value in limited:
            resource.setrlimit(res, (value, value))

    try:
        proc = subprocess.Popen(bwrap_args(cmd, workdir, readonly, 5), cwd="/", env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, close_fds=False, user=uid, group=uid, extra_groups=[],
                                start_new_session=True, preexec_fn=pre_exec)  # noqa: PLW1509 (must be pre-exec)
    finally:
        os.close(info_w)
    return Spawned(proc, "bwrap", info_fd=info_r)


def spawn_plain(cmd: list[str], workdir: Path, limits: Any, env: dict[str, str], readonly: list[str], uid: int,
                fds: tuple[int, int], out: int, err: int) -> Spawned:
    limited = rlimits(limits)

    def pre_exec() -> None:
        _place(fds)
        for _, res, value in limited:
            resource.setrlimit(res, (value, value))

    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                            close_fds=False, start_new_session=True, preexec_fn=pre_exec)  # noqa: PLW1509
    return Spawned(proc, "plain")


SPAWN = {"helper": spawn_helper, "bwrap": spawn_bwrap, "plain": spawn_plain}


def read_report(spawned: Spawned) -> str:
    """The helper's report line ("" for the other backends); closes the descriptor."""
    if spawned.report_fd < 0:
        return ""
    chunks = []
    while chunk := os.read(spawned.report_fd, 4096):
        chunks.append(chunk)
    os.close(spawned.report_fd)
    return b"".join(chunks).decode(errors="replace").strip()


def bwrap_child(spawned: Spawned) -> int:
    """bwrap's PID 1 of the sandbox (from --info-fd), 0 when it has not started."""
    try:
        data = os.read(spawned.info_fd, 4096)
    except OSError:
        return 0
    try:
        child = int(json.loads(data.decode()).get("child-pid", 0)) if data else 0
    except ValueError:
        return 0
    try:  # only bwrap's own child: what the descriptor says is not trusted beyond that
        stat = Path(f"/proc/{child}/stat").read_text()
    except OSError:
        return 0
    return child if int(stat.rsplit(")", 1)[1].split()[1]) == spawned.proc.pid else 0
