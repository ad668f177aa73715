"""Configuration-key tables in docs/, generated from the config dataclasses so they cannot drift.

A Markdown file marks each table with ``<!-- config: module:Class -->`` and ``<!-- end config -->``;
``python -m launch.docgen FILE...`` rewrites what lies between, and the test suite fails when a file is stale.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

from common.config import describe

_BLOCK = re.compile(r"(<!-- config: (?P<target>[\w.]+:\w+) -->\n)(?P<body>.*?)(<!-- end config -->)", re.S)


def config_table(target: str) -> str:
    """A Markdown table of every key of ``module:Class``."""
    module, name = target.split(":")
    cls = getattr(importlib.import_module(module), name)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tname, default, help_text in describe(cls):
        rows.append(f"| `{key}` | {tname.replace('|', 'or')} | `{default}` | {help_text.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    return _BLOCK.sub(lambda m: m.group(1) + config_table(m.group("target")) + m.group(4), text)


def main(paths: list[str]) -> int:
    for p in paths:
        path = Path(p)
        text = path.read_text()
        new = render(text)
        if new != text:
            path.write_text(new)
            sys.stderr.write(f"updated {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
