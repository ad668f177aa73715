"""Corrupt inputs: a file, or an item of one (a line, an archive member, a row group), that cannot be read.

Nothing corrupt stops a build: the item is skipped, counted under its skip reason (``unreadable``,
``malformed_record`` or ``invalid_utf8``) and named. Reading yields a :class:`Corrupt` where it would have yielded a
document; :class:`CorruptTally` sums them per file, in each work unit's stats and again over the whole build (sorted
by file name, so the same whatever the unit size), for the store manifest's ``corrupt_inputs``, the build's warnings
and its summary line.
"""

from __future__ import annotations

import logging
import os
import stat
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("codegeex.data")
WARN_FILES = 50  # files warned about one by one; the manifest lists them all


@dataclass
class Corrupt:
    """One unreadable input or item of an input: skipped and counted as ``count`` items under ``reason``."""

    reason: str  # a skip reason: "unreadable", "malformed_record" or "invalid_utf8"
    file: str  # the input file (the archive or record file for a member or a record)
    where: str = ""  # inside the file: "line 3", "member a/b.py", "row group 2"; empty for the whole file
    detail: str = ""  # what is wrong, e.g. the reader's error
    count: int = 1  # items skipped (the rows of a row group that lacks the text column)

    def describe(self) -> str:
        return f"{self.where}: {self.detail}" if self.where else self.detail

    @classmethod
    def undecodable(cls, source: str, data: bytes) -> Corrupt:
        """A document whose bytes are not UTF-8, named by its source (a path, ``archive.zip!member``) and the
        offset of the first bad byte."""
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = data[exc.start:exc.start + 4]
            return cls("invalid_utf8", source, f"byte {exc.start}", f"not UTF-8 ({exc.reason}: {bad!r})")
        return cls("invalid_utf8", source, "", "not UTF-8")


def error_text(exc: BaseException) -> str:
    """An exception as one short line: its type and first line of message."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


ZIP_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zipfile.LargeZipFile)
# and for a member: a damaged deflate stream, an unknown compression method, a password
MEMBER_ERRORS = (*ZIP_ERRORS, KeyError, zlib.error, NotImplementedError, RuntimeError)
GZIP_ERRORS = (OSError, EOFError, zlib.error)  # BadGzipFile is an OSError; a truncated stream raises EOFError


def arrow_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (OSError, ValueError, pa.ArrowException)  # ArrowInvalid ("magic bytes not found") is a ValueError


def os_error(path: str, exc: OSError) -> str:
    """``No such file or directory`` (``symbolic link to TARGET: ...`` for a link)."""
    text = exc.strerror or error_text(exc)
    if os.path.islink(path):
        try:
            return f"symbolic link to {os.readlink(path)}: {text}"
        except OSError:
            pass
    return text


def not_regular(mode: int) -> str:
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode) else "special")
    return f"not a regular file ({kind})"


LINE_COUNT_LIMIT = 1 << 30  # past this offset a bad line is named by its byte offset, not counted to its line


def lines_before(path: str, offset: int) -> int | None:
    """How many lines start before byte ``offset`` (read once per unit, and only when it holds a bad line)."""
    if offset > LINE_COUNT_LIMIT:
        return None
    n = 0
    with open(path, "rb") as fh:
        while offset > 0:
            block = fh.read(min(offset, 1 << 20))
            if not block:
                break
            n += block.count(b"\n")
            offset -= len(block)
    return n


def record(item: Corrupt) -> dict[str, Any]:
    """One item as a tally record."""
    return {"file": item.file, "items": item.count, "reasons": {item.reason: item.count}, "first": item.describe()}


class CorruptTally:
    """Corrupt items summed per file: ``{"file", "items", "reasons": {reason: n}, "first"}`` records, the files in
    the order first seen and ``first`` the earliest problem found in each."""

    def __init__(self, records: Iterable[Mapping[str, Any]] = ()) -> None:
        self._files: dict[str, dict[str, Any]] = {}
        self.merge(records)

    def add(self, item: Corrupt) -> None:
        self.merge([record(item)])

    def merge(self, records: Iterable[Mapping[str, Any]]) -> None:
        for r in records:
            self._add(str(r["file"]), int(r["items"]), dict(r["reasons"]), str(r["first"]))

    def _add(self, file: str, items: int, reasons: Mapping[str, int], first: str) -> None:
        rec = self._files.setdefault(file, {"file": file, "items": 0, "reasons": {}, "first": first})
        rec["items"] += items
        for reason, n in reasons.items():
            rec["reasons"][reason] = rec["reasons"].get(reason, 0) + n

    def records(self) -> list[dict[str, Any]]:
        return [dict(r, reasons=dict(r["reasons"])) for r in self._files.values()]

    def __len__(self) -> int:
        return len(self._files)


def describe_record(r: Mapping[str, Any]) -> str:
    """``FILE: 3 item(s) skipped (malformed_record 3); first: line 2: invalid JSON ...``"""
    reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(r["reasons"].items()))
    return f"{r['file']}: {r['items']:,} item(s) skipped ({reasons}); first: {r['first']}"


def warn_corrupt(records: list[dict[str, Any]]) -> None:
    """One warning per corrupt file (the first :data:`WARN_FILES`), then how many more the manifest lists."""
    for r in records[:WARN_FILES]:
        log.warning("corrupt input %s", describe_record(r))
    if len(records) > WARN_FILES:
        log.warning("... and %d more corrupt input file(s), listed in the store's manifest.json (corrupt_inputs)",
                    len(records) - WARN_FILES)


def corrupt_summary(files: list[tuple[str, int]], names: int = 5) -> str:
    """The summary line's part from (file, items skipped): ``3 file(s): a.parquet 1, b.jsonl 2, ...``, or ``none``."""
    if not files:
        return "none"
    shown = ", ".join(f"{file} {items:,}" for file, items in files[:names])
    more = f", ... and {len(files) - names} more" if len(files) > names else ""
    return f"{len(files)} file(s): {shown}{more}"
