"""The warm Python interpreter: started once per worker thread inside the sandbox helper's namespaces (as root
there, standard library only, run by the system ``python3 -I`` from this file's text), it forks one process tree per
program instead of starting an interpreter (~20 ms here) for each.

Per program (a request from :mod:`eval_harness.warm` on the socket at fd 3, with the program's stdout, stderr and
attestation descriptors passed along):
- a first child makes new PID, mount, network and IPC namespaces and forks PID 1 of them, which mounts the run's own
  ``/proc`` and private tmpfs on ``/tmp``, ``/var/tmp`` and ``/dev/shm``, and forks the program;
- the program's process starts a session, takes the rlimits, drops to the run's own uid (no groups, no new
  privileges), closes every descriptor but 0-4, enters its work directory and runs ``main.py`` as ``__main__``
  , exiting as ``python3 main.py`` would;
- when it exits, PID 1 reports its wait status and exits, and the kernel kills what is left in the namespace; to stop
  a run (timeout, stop) the first child kills PID 1 and waits for it, which returns once the namespace is empty.
Replies on the socket: ``{"ready": true}`` once at start, then one per run, ``{"status": <wait status>}`` or
``{"killed": true}``.
"""

from __future__ import annotations

import array
import builtins
import ctypes
import gc
import json
import os
import resource
import select
import signal
import socket
import sys
import traceback
import types
from typing import Any

# what solutions commonly import: loaded once here, inherited by every program
WARM = ("bisect", "collections", "copy", "decimal", "fractions", "functools", "hashlib", "heapq", "itertools", "math",
        "operator", "random", "re", "statistics", "string", "typing")

LIBC = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWIPC = 0x00020000, 0x20000000, 0x40000000, 0x08000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")


def _call(name: str, *args: Any) -> None:
    if getattr(LIBC, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    sys.stderr.write(f"{exc.code}\n")
    return 1


def _run_main(script: str) -> None:
    """``script`` as ``python3 script`` runs it: a fresh ``__main__`` module (``runpy.run_path`` costs 13 ms a first
    call here, importing what finds loaders)."""
    with open(script, "rb") as fh:
        code = compile(fh.read(), script, "exec")
    main = types.ModuleType("__main__")
    main.__file__ = os.path.abspath(script)
    main.__dict__.update(__builtins__=builtins, __spec__=None, __loader__=None, __cached__=None)
    sys.modules["__main__"] = main
    exec(code, main.__dict__)  # noqa: S102 (the sample, in its sandbox: what this process is for)


def _program(req: dict[str, Any], fds: list[int]) -> None:
    """The program's own process; never returns."""
    code = 1
    try:
        os.setsid()
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for res, value in req["limits"]:
            resource.setrlimit(int(res), (value, value))
        uid = int(req["uid"])
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        _call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        _call("prctl", PR_SET_DUMPABLE, 1, 0, 0, 0)  # its /proc/self is its own, as after an exec
        null = os.open("/dev/null", os.O_RDONLY)
        for target, fd in zip((0, 1, 2, 3, 4), (null, *fds)):
            os.dup2(fd, target)
        os.closerange(5, 1 << 16)
        os.chdir(req["workdir"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = [req["script"]]
        try:
            _run_main(req["script"])
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        except BaseException as exc:  # noqa: BLE001 (what `python3 main.py` does: traceback, status 1)
            tb = exc.__traceback__
            while tb is not None and tb.tb_frame.f_code.co_filename != req["script"]:
                tb = tb.tb_next  # from the program's own frames on, as python3 main.py shows it
            traceback.print_exception(type(exc), exc, tb)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                code = code or 120
    finally:
        os._exit(code)


def _init(req: dict[str, Any], fds: list[int], status_w: int, alive_r: int) -> None:
    """PID 1 of the run's namespaces; never returns."""
    try:
        _call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if select.select([alive_r], [], [], 0)[0]:
            os._exit(3)  # the first child died before the death signal was armed
        _call("mount", b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        for path in SCRATCH:
            _call("mount", b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64m,mode=1777")
        pid = os.fork()
        if pid == 0:
            os.close(status_w)
            _program(req, fds)
        while True:
            done, status = os.waitpid(-1, 0)
            if done == pid:
                os.write(status_w, str(status).encode())
                os._exit(0)  # the kernel kills what the program left behind
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        os._exit(4)


def _first_child(req: dict[str, Any], fds: list[int], status_w: int) -> None:
    """Makes the namespaces, forks their PID 1, tears it down on SIGTERM; never returns."""
    try:
        alive_r, alive_w = os.pipe()
        _call("unshare", CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC)
        _call("mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # a kill before the handler waits for it
        pid = os.fork()
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            os.close(alive_w)
            _init(req, fds, status_w, alive_r)

        def stop(signum: int, frame: object) -> None:
            os.kill(pid, signal.SIGKILL)

        signal.signal(signal.SIGTERM, stop)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.waitpid(pid, 0)  # returns once nothing of the run is left
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    os._exit(0)


def _start(req: dict[str, Any], fds: list[int]) -> tuple[int, int, int]:
    """(the first child's pid, a pidfd on it, the read end of its status pipe)."""
    status_r, status_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(status_r)
        _first_child(req, fds, status_w)
    os.close(status_w)
    for fd in fds:
        os.close(fd)
    return pid, os.pidfd_open(pid), status_r


def serve(sock: socket.socket) -> None:
    """One run at a time: start it, kill it when asked, report how it ended."""
    running: tuple[int, int, int] | None = None
    killed = False
    while True:
        watched = [sock.fileno()] + ([running[1]] if running else [])
        ready, _, _ = select.select(watched, [], [])
        if running and running[1] in ready:
            pid, pidfd, status_r = running
            os.waitpid(pid, 0)
            status = os.read(status_r, 64).decode()
            os.close(pidfd)
            os.close(status_r)
            reply = {"killed": True} if killed or not status else {"status": int(status)}
            sock.send(json.dumps(reply).encode())
            running, killed = None, False
        if sock.fileno() in ready:
            fds = array.array("i")
            msg, ancdata, _, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(8 * fds.itemsize))
            if not msg:
                return  # the harness has gone
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            req = json.loads(msg)
            if req.get("op") == "kill" and running:
                os.kill(running[0], signal.SIGTERM)
                killed = True
            elif req.get("op") == "run" and running is None and len(fds) == 4:
                running = _start(req, list(fds))
            elif req.get("op") == "run":  # never run a program without its own four descriptors
                for fd in fds:
                    os.close(fd)
                sock.send(b'{"killed": true}')


def main() -> None:
    for name in WARM:
        __import__(name)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sock = socket.socket(fileno=3)
    gc.freeze()  # what is loaded now is never scanned again: a program's collections do not copy its pages
    sock.send(b'{"ready": true}')
    serve(sock)


if __name__ == "__main__":
    main()
