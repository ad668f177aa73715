"""What ``codegeex data build`` checks before it writes into its output folder: that the folder holds nothing but
this build's store (or is empty), and that no other build writes there at the same time.

- A folder holding another finished store (other inputs or settings), a ``manifest.json`` that is not a store's, or
  files a store does not have is refused, naming what is there; ``--force`` replaces it (the whole folder).
- One lock file per build part (``OUTPUT/.build.lock``, or ``.build-part-I-of-N.lock`` for the parts of a sharded
  build, which run at once by design) held with ``flock`` for the whole build; a second build of the same part stops
  at once, naming the holder (pid, host, start time, command). The kernel drops the lock when its holder dies.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.contracts import MANIFEST, StoreError, load_store_manifest

log = logging.getLogger("codegeex.data")
STORE_ENTRIES = {MANIFEST, "shards", ".work"}  # what a store (finished or in progress) holds


def _lock_name(num_shards: int, shard_index: int) -> str:
    return ".build.lock" if num_shards == 1 else f".build-part-{shard_index}-of-{num_shards}.lock"


def foreign_entries(out: Path) -> list[str]:
    """Names in ``out`` that no store of ours holds."""
    return sorted(p.name for p in out.iterdir() if p.name not in STORE_ENTRIES and not p.name.startswith(".build"))


def check_output(out: Path, force: bool) -> None:
    """Refuse (or, with ``force``, empty) an output folder holding anything but a store this build may replace: the
    caller has already found that a finished store there is not this build's result."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--output {out} is a file, not a folder")
    problems = []
    others = foreign_entries(out)
    if others:
        problems.append(f"files that are not a store's ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''})")
    if (out / MANIFEST).is_file():
        try:
            manifest = load_store_manifest(out)
            problems.append(f"a finished store of other inputs or settings (identity {manifest.identity}, "
                            f"{manifest.total_windows} windows)")
        except StoreError as exc:
            problems.append(f"a {MANIFEST} that is not a store's ({exc})")
    if not problems:
        return
    if not force:
        raise ValueError(f"--output {out} holds {' and '.join(problems)}; use another --output, or --force to "
                         "replace the folder")
    log.warning("--force: replacing %s (it held %s)", out, " and ".join(problems))
    for entry in out.iterdir():
        if entry.name.startswith(".build"):
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


@contextmanager
def build_lock(out: Path, num_shards: int = 1, shard_index: int = 0) -> Iterator[None]:
    """Hold this build part's lock in ``out`` (created) for the block; raise naming the holder if it is taken."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / _lock_name(num_shards, shard_index)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "{}"
            raise ValueError(f"{out} is being built by another `codegeex data build` ({holder}); wait for it or "
                             "use another --output") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        os.close(fd)
