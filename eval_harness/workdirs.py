"""Where programs' work directories live, and who removes them when the harness dies.

Every work directory of one harness process sits under its own root, ``<base>/run-<pid>-<token>`` (base:
``$CODEGEEX_EXEC_DIR``, else ``/var/lib/codegeex/exec`` when isolated: the sandbox replaces ``/tmp``, so work
directories cannot live there; else the system's temporary directory). With that root a janitor starts: a shell in
its own session (so Ctrl-C to the harness's process group does not reach it) that blocks reading a pipe whose other end
only the harness holds. The pipe reaches end-of-file when the harness exits however it exits (SIGKILL included: the
kernel closes its descriptors), and the janitor then removes the root with everything in it. Roots of harnesses that
died before their janitor could run are removed when the next harness starts.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

JANITOR = ('cat >/dev/null; for i in 1 2 3 4 5; do rm -rf -- "$1" 2>/dev/null; [ -e "$1" ] || exit 0; sleep 0.2; '
           'done')
_LOCK = threading.Lock()
_ROOT: Path | None = None
_JANITOR: subprocess.Popen[bytes] | None = None


def base_dir(isolated: bool) -> Path:
    default = "/var/lib/codegeex/exec" if isolated else str(Path(tempfile.gettempdir()) / "codegeex-exec")
    return Path(os.environ.get("CODEGEEX_EXEC_DIR", default))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(base: Path) -> list[Path]:
    """Remove the roots of harness processes that are gone; returns what was removed."""
    removed = []
    for root in base.glob("run-*-*"):
        pid = root.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root)
    return removed


def run_root(isolated: bool) -> Path:
    """This process's root for work directories, created (with its janitor) on first use."""
    global _ROOT, _JANITOR
    with _LOCK:
        if _ROOT is not None and _ROOT.is_dir() and _ROOT.name.startswith(f"run-{os.getpid()}-"):
            return _ROOT
        base = base_dir(isolated)
        base.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(PermissionError):
            os.chmod(base, 0o711)  # traversable by the sandbox users, not listable
        sweep(base)
        root = base / f"run-{os.getpid()}-{secrets.token_hex(4)}"
        root.mkdir(mode=0o711)
        os.chmod(root, 0o711)
        _JANITOR = subprocess.Popen(["sh", "-c", JANITOR, "codegeex-janitor", str(root)], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        _ROOT = root
        return root


WARM_DIR = "warm"  # the part of a root the warm Python interpreters see (eval_harness.warm)


def work_dir(isolated: bool, prefix: str = "codegeex-exec-", warm: bool = False) -> tempfile.TemporaryDirectory[str]:
    """A fresh work directory under this process's root (``warm``: under its warm part), a context manager that
    removes it."""
    parent = run_root(isolated)
    if warm:
        parent = parent / WARM_DIR
        with contextlib.suppress(FileExistsError):
            parent.mkdir(mode=0o711)
    return tempfile.TemporaryDirectory(prefix=prefix, dir=parent)
