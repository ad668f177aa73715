"""Atomic file writes and JSONL reading: a reader never sees half a file, a malformed record names file and line."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

FILE_MODE, DIR_MODE = 0o644, 0o755  # shared: readable by the group and others, whatever the umask


def write_bytes_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """``path`` holds ``data`` completely or keeps what it held (write beside it, then rename over it). ``mode``:
    the file's permissions, whatever the umask (None: what the umask gives)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    if mode is not None:
        tmp.chmod(mode)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), mode)


def write_json_atomic(path: Path, data: Any, mode: int | None = None) -> None:
    """Indented JSON with a final newline, written atomically."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=False) + "\n", mode)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """The hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a ``.jsonl`` or ``.jsonl.gz`` file; a line that is not
    JSON raises naming the file and line."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as raw:
        for lineno, line in enumerate(raw, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: malformed JSON record ({exc.msg})") from None


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a ``.jsonl`` or ``.jsonl.gz`` file; a malformed line raises naming the file and line."""
    for lineno, rec in read_json_lines(path):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        yield rec


def tree(root: Path, skip: Collection[str] = ()) -> Iterator[Path]:
    """``root`` and everything under it, not descending into the top-level entries named in ``skip`` (not listed)."""
    yield root
    for top, dirs, files in os.walk(root):
        if Path(top) == root:
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
        for name in [*dirs, *files]:
            yield Path(top) / name


def make_read_only(root: Path, skip: Collection[str] = ()) -> None:
    """Every file and folder under ``root`` (and ``root``) readable by all, writable by none: directories and
    executables 0o555, other files 0o444. Symbolic links, and the top-level entries of ``root`` named in ``skip``
    (with what they hold), are left alone."""
    for path in tree(root, skip):
        if path.is_symlink():
            continue
        executable = path.is_dir() or bool(path.stat().st_mode & stat.S_IXUSR)
        path.chmod(0o555 if executable else 0o444)


def make_shared(root: Path) -> None:
    """Every file and folder under ``root`` (and ``root``) readable by all, writable by the owner, whatever the
    umask: directories and executables 0o755, other files 0o644. Symbolic links are left alone."""
    for path in tree(root):
        if path.is_symlink():
            continue
        executable = path.is_dir() or bool(path.stat().st_mode & stat.S_IXUSR)
        path.chmod(DIR_MODE if executable else FILE_MODE)
