"""The git revision of the code that is running, recorded in launch records and checkpoint manifests."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path


@cache
def git_revision() -> str:
    """The checkout's commit, or ``unknown`` outside a git checkout (asked once per process)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
