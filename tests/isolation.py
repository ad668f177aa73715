"""Whether the sandbox must be isolated here, decided without asking the code under test."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

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
        pytest.skip("not root or no namespaces: containment cannot be had here (the sandbox says so in its log)")
