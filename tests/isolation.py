"""Whether the sandbox must be isolated here, decided without asking the code under test."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from eval_harness.sandbox import isolation_available


def namespaces_possible() -> bool:
    """Root, and the kernel lets us make the namespaces (asked with util-linux's unshare, not our sandbox)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "--net", "--mount", "true"], capture_output=True).returncode == 0


def require_isolation() -> None:
    """Fail when isolation could be had and is not (as root with namespaces: CI); skip only where it cannot be had
    (not root, or no namespaces), where the sandbox logs what is lost."""
    if namespaces_possible():
        assert isolation_available(), "root with namespaces available, yet the sandbox runs without isolation"
    elif not isolation_available():
        from tests.conftest import missing

        missing("not root or no namespaces: containment cannot be had here (the sandbox says so in its log)")


def live_processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live (not zombie) host process."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            found[int(proc.name)] = (int(fields[1]), cmd)
    return found
