"""The run directory's record of how a job was started.

Every ``codegeex launch`` writes, before anything starts, into ``RUN_DIR/launch/``:

- ``config.yaml``: the resolved training configuration (file + overrides + preset), which is what the ranks read, so a
  restarted or requeued job trains exactly what was launched even if the original file changes meanwhile;
- ``<UTC time>-<launcher>.json``: the ``codegeex`` command line, the launcher command(s) it ran or submitted, the working
  directory, host, git revision and the environment (values of variables that look like secrets are redacted).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
from pathlib import Path
from typing import Any

import yaml

from common.config import to_dict
from common.revision import git_revision

SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_KEY|PRIVATE", re.IGNORECASE)


def redacted_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if env is None else env)
    return {k: ("<redacted>" if SECRET.search(k) else v) for k, v in sorted(env.items())}


def write_resolved_config(run_dir: Path, cfg: Any) -> Path:
    """``RUN_DIR/launch/config.yaml``: every field, so the ranks need neither the original file nor the overrides."""
    path = run_dir / "launch" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tree = to_dict(cfg)
    tree.pop("model_preset", None)  # the model section is already complete
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path.resolve()


def record_launch(run_dir: Path, launcher: str, argv: list[str], commands: list[list[str]] | list[str],
                  env: dict[str, str] | None = None, **extra: Any) -> Path:
    """Write one launch's record; returns its path."""
    now = datetime.datetime.now(datetime.UTC)
    path = run_dir / "launch" / f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{launcher}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"launcher": launcher, "time": now.isoformat(), "argv": argv, "commands": commands,
              "cwd": os.getcwd(), "host": socket.gethostname(), "git_revision": git_revision(),
              "environment": redacted_environment(env), **extra}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path

