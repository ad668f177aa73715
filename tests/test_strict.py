"""Under CI=true a missing prerequisite fails the test instead of skipping it (the suite in CI means what it says)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = '''
from tests.conftest import shared_path, require_module

def test_needs_shared():
    shared_path("humaneval-x")

def test_needs_a_module():
    require_module("no_such_module_here")
'''


def _run(tmp_path: Path, ci: str) -> subprocess.CompletedProcess[str]:
    probe = tmp_path / f"test_probe_{ci or 'unset'}.py"
    probe.write_text(PROBE)
    env = {"PATH": "/usr/bin:/bin", "CODEGEEX_SHARED": str(tmp_path / "absent"), "CI": ci, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           str(probe)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_missing_shared_data_fails_under_ci_and_skips_elsewhere(tmp_path):
    strict = _run(tmp_path, "true")
    assert strict.returncode == 1 and "2 failed" in strict.stdout, strict.stdout[-2000:]
    assert "CI=true: a missing prerequisite fails instead of skipping" in strict.stdout
    relaxed = _run(tmp_path, "")
    assert relaxed.returncode == 0 and "2 skipped" in relaxed.stdout, relaxed.stdout[-2000:]
