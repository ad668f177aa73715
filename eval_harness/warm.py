"""The harness's side of the warm Python interpreter (:mod:`eval_harness.zygote`): one per worker thread, started
in the sandbox helper's namespaces on first use, asked over a socket to fork each Python program.

What a program gets is what the helper gives a cold one (its own PID, mount, network and IPC namespaces, its own uid,
rlimits, private scratch directories, the minimal read-only root, the attestation descriptors), minus the
interpreter's start-up. It differs from ``python3 -I main.py`` in what a fork shares: the standard-library modules the
interpreter loaded (``zygote.py`` lists them), ``random``'s seed and the hash seed are the same for every program.
``CODEGEEX_WARM_PYTHON=0`` turns it off. Where it cannot start (not root, no system python) the cold path runs, as
it does when a zygote dies: logged, never silent.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import select
import signal
import socket
import threading
import weakref
from pathlib import Path
from typing import Any

from eval_harness import sandbox_backends as backends
from eval_harness.workdirs import WARM_DIR, run_root

log = logging.getLogger("codegeex.eval")
SOURCE = Path(__file__).with_name("zygote.py")
PYTHON = "/usr/bin/python3"
START_S = 20.0  # a zygote that does not say ready by then is not used
_LOCAL = threading.local()
_FAILED = threading.Event()  # one failure to start: cold programs from then on


class ZygoteDied(backends.SandboxError):
    """The warm interpreter died under a run (not the program's doing: it cannot reach it); the run is repeated
    cold."""


def _release(sock: socket.socket, spawned: backends.Spawned, log_fd: int) -> None:
    sock.close()
    spawned.teardown()
    backends.read_report(spawned)
    os.close(log_fd)


class Zygote:
    """One warm interpreter, serving one run at a time for the thread that started it (it dies with that thread:
    the helper's parent-death signal; its descriptors are released when the object goes)."""

    def __init__(self) -> None:
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        dummy_r, dummy_w = os.pipe()
        self.log = os.memfd_create("zygote-log")
        try:
            self.spawned = backends.spawn_helper([PYTHON, "-I", "-c", SOURCE.read_text()], warm_root(), None,
                                                 {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, [], 0,
                                                 (child.fileno(), dummy_r), self.log, self.log, as_root=True)
        finally:
            child.close()
            os.close(dummy_r)
            os.close(dummy_w)
        self.close = weakref.finalize(self, _release, self.sock, self.spawned, self.log)
        ready, _, _ = select.select([self.sock], [], [], START_S)
        if not ready or json.loads(self.sock.recv(4096) or b"{}").get("ready") is not True:
            raise backends.SandboxError(f"the warm interpreter did not start: {self.output()}")

    def output(self) -> str:
        size = os.fstat(self.log).st_size
        return os.pread(self.log, min(size, 4096), max(0, size - 4096)).decode(errors="replace").strip()

    def start(self, script: str, workdir: Path, uid: int, limits: Any, env: dict[str, str], fds: tuple[int, int],
              out: int, err: int) -> WarmRun:
        request = {"op": "run", "uid": uid, "workdir": str(workdir), "script": script, "env": env,
                   "limits": [(res, value) for _, res, value in backends.rlimits(limits)]}
        passed = array.array("i", [out, err, *fds])
        try:
            self.sock.sendmsg([json.dumps(request).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, passed)])
        except OSError as exc:  # it died between runs
            _LOCAL.zygote = None
            raise ZygoteDied(f"the warm interpreter is gone ({exc}): {self.output() or 'no output'}") from exc
        return WarmRun(self)


class WarmRun:
    """A program forked by a zygote: what :func:`eval_harness.sandbox.run_sandboxed` waits on."""

    def __init__(self, zygote: Zygote) -> None:
        self.zygote = zygote
        self.reply: dict[str, Any] | None = None

    def done_fd(self) -> int:
        return self.zygote.sock.fileno()

    def teardown(self) -> None:
        """Kill the run unless it ended, and take the zygote's reply (it comes once the namespace is empty)."""
        sock = self.zygote.sock
        if not select.select([sock], [], [], 0)[0]:
            with contextlib.suppress(OSError):
                sock.send(b'{"op": "kill"}')
        select.select([sock], [], [])  # no deadline: the reply comes once the namespace is empty (or EOF: it died)
        try:
            data = sock.recv(4096)
        except OSError:
            data = b""
        self.reply = json.loads(data) if data else {}

    def returncode(self) -> int:
        reply = self.reply or {}
        if "status" in reply:
            return os.waitstatus_to_exitcode(int(reply["status"]))
        if reply.get("killed"):
            return -signal.SIGKILL
        _LOCAL.zygote = None
        output = self.zygote.output()
        self.zygote.close()
        raise ZygoteDied(f"the warm interpreter died: {output or 'no output'}")


def warm_root() -> Path:
    """Where warm programs' work directories go: the one directory of the run root a zygote sees (not the rest:
    batch builds and cold programs' directories stay out of its view)."""
    root = run_root(True) / WARM_DIR
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o711)
    return root


def warm_zygote() -> Zygote | None:
    """This thread's zygote (started on first use), or None where there is none: turned off, not root, or a start
    failed (logged once)."""
    if os.environ.get("CODEGEEX_WARM_PYTHON", "1") == "0" or _FAILED.is_set() or os.geteuid() != 0:
        return None
    zygote = getattr(_LOCAL, "zygote", None)
    if zygote is None:
        if not os.access(PYTHON, os.X_OK):
            _FAILED.set()
            return None
        try:
            zygote = Zygote()
        except (OSError, backends.SandboxError) as exc:
            _FAILED.set()
            log.warning("Python programs start cold (%s)", exc)
            return None
        _LOCAL.zygote = zygote
    return zygote
