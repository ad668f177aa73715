"""Reading inputs: directory trees, ``.zip`` archives, ``.jsonl(.gz)`` and Parquet, split into work units.

Enumeration is deterministic (sorted paths, fixed unit sizes that do not depend on the number of workers), so
the same inputs always give the same units, in the same order, on every machine of a SLURM array. A unit is the
grain of parallelism and of resumption: a worker reads one unit and writes one spool file for it.

Nothing here crashes on bad input: symlink loops and oversized files are counted by reason, and a corrupt input (a
dangling link, a FIFO, a read error, a truncated or garbage archive, Parquet file or gzip stream, a bad archive
member, row group or record) is a :class:`~data_pipeline.corrupt.Corrupt`: skipped, counted and named.
"""

from __future__ import annotations

import gzip
import json
import os
import stat
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import option
from data_pipeline.corrupt import (
    GZIP_ERRORS,
    MEMBER_ERRORS,
    ZIP_ERRORS,
    Corrupt,
    arrow_errors,
    error_text,
    lines_before,
    not_regular,
    os_error,
)
from data_pipeline.languages import Language, get_language, language_for_path


@dataclass
class RawDocument:
    """One document as read, before any filter: bytes from a file, or text from a record."""

    source: str  # where it came from: a path, "archive.zip!member" or "file.jsonl@BYTE_OFFSET"
    path: str  # the name used to classify by extension
    data: bytes
    language: Language | None = None  # set when the input says so (a record field, a root's override)


@dataclass
class Unit:
    """A slice of the input read by one worker: files of a tree, members of a zip, or a byte range of a JSONL."""

    index: int
    kind: str  # "files" | "zip" | "jsonl" | "jsonl.gz" | "parquet"
    path: str = ""  # the archive or record file (kinds other than "files")
    items: list[Any] = field(default_factory=list)  # files: [path, lang]; zip: [member, lang]; parquet: row groups
    start: int = 0  # jsonl: byte range [start, end) of line starts
    end: int = 0


@dataclass
class RecordFields:
    """Field names in ``.jsonl`` and Parquet records."""

    content: str = option("content", "field holding the document's text")
    language: str = option("language", "field naming its language (optional; else the path's extension decides)")
    path: str = option("path", "field holding its file name (optional; used to classify by extension)")


def _record_language(rec: dict[str, Any], fields: RecordFields) -> Language | None:
    name = rec.get(fields.language)
    if isinstance(name, str) and name:
        try:
            return get_language(name)
        except ValueError:
            return None
    return None


class _Enumerator:
    """Walks the inputs once, grouping files into units of about ``unit_bytes`` and counting what it skips."""

    def __init__(self, unit_bytes: int, max_file_bytes: int, max_bytes_per_language: int,
                 on_file: Callable[[], None] | None = None) -> None:
        self.on_file = on_file
        self.unit_bytes = unit_bytes
        self.max_file_bytes = max_file_bytes
        self.cap = max_bytes_per_language
        self.per_language: Counter[str] = Counter()
        self.skips: Counter[str] = Counter()
        self.corrupt: list[Corrupt] = []
        self.units: list[Unit] = []
        self._pending: list[list[Any]] = []
        self._pending_bytes = 0
        self.roots: set[str] = set()  # directories given as inputs: another root's walk does not enter them

    def bad(self, path: str, detail: str) -> None:
        """An input that cannot be read at all: skipped, counted as ``unreadable`` and named."""
        self.skips["unreadable"] += 1
        self.corrupt.append(Corrupt("unreadable", path, "", detail))

    def _add_file(self, path: str, size: int, lang: Language | None) -> None:
        if self.on_file is not None:
            self.on_file()
        if size > self.max_file_bytes:
            self.skips["too_large"] += 1
            return
        if lang is None:
            head = b""
            if "." not in os.path.basename(path):
                try:
                    with open(path, "rb") as fh:
                        head = fh.read(128)
                except OSError as exc:
                    self.bad(path, os_error(path, exc))
                    return
            lang = language_for_path(path, head)
        if lang is None:
            self.skips["not_a_training_language"] += 1
            return
        if self.cap and self.per_language[lang.name] + size > self.cap:
            self.skips["over_language_cap"] += 1
            return
        self.per_language[lang.name] += size
        self._pending.append([path, lang.name])
        self._pending_bytes += size
        if self._pending_bytes >= self.unit_bytes:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.units.append(Unit(len(self.units), "files", items=self._pending))
            self._pending, self._pending_bytes = [], 0

    def walk(self, root: str, lang: Language | None) -> None:
        """Depth-first in sorted order; follows symlinks but never enters a directory twice.

        A link back to a directory being walked is a ``symlink_loop``; a second way into a directory already
        walked is a ``duplicate_directory``; both are counted and not entered.
        """
        visited: set[tuple[int, int]] = set()
        own = os.path.realpath(root)
        stack: list[tuple[str, frozenset[tuple[int, int]]]] = [(root, frozenset())]
        while stack:
            top, ancestors = stack.pop()
            try:
                st = os.stat(top)
            except OSError as exc:
                self.bad(top, os_error(top, exc))
                continue
            key = (st.st_dev, st.st_ino)
            if key in ancestors:
                self.skips["symlink_loop"] += 1
                continue
            if key in visited:
                self.skips["duplicate_directory"] += 1
                continue
            visited.add(key)
            try:
                entries = sorted(os.scandir(top), key=lambda e: e.name)
            except OSError as exc:
                self.bad(top, os_error(top, exc))
                continue
            subdirs = []
            for entry in entries:
                if entry.name in ("__pycache__", ".git", "site-packages", "node_modules") and entry.is_dir():
                    continue
                try:
                    est = entry.stat(follow_symlinks=True)
                except OSError as exc:  # dangling link, permission, or a link loop the kernel caught (ELOOP)
                    self.bad(entry.path, os_error(entry.path, exc))
                    continue
                if stat.S_ISDIR(est.st_mode):
                    real = os.path.realpath(entry.path)
                    if real == own or real not in self.roots:  # another input walks that one
                        subdirs.append(entry.path)
                elif stat.S_ISREG(est.st_mode):
                    self._add_file(entry.path, est.st_size, lang)
                else:  # reading a FIFO would block, a device would never end
                    self.bad(entry.path, not_regular(est.st_mode))
            inner = ancestors | {key}
            stack.extend((d, inner) for d in reversed(subdirs))

    def zip_members(self, path: str, lang: Language | None) -> None:
        self.flush()
        try:
            with zipfile.ZipFile(path) as zf:
                infos = sorted((i for i in zf.infolist() if not i.is_dir()), key=lambda i: i.filename)
        except ZIP_ERRORS as exc:  # truncated (no central directory), not a zip, unreadable
            self.bad(path, error_text(exc))
            return
        items: list[list[Any]] = []
        size = 0
        for info in infos:
            mlang = lang or language_for_path(info.filename)
            if mlang is None:
                self.skips["not_a_training_language"] += 1
                continue
            if info.file_size > self.max_file_bytes:
                self.skips["too_large"] += 1
                continue
            if self.cap and self.per_language[mlang.name] + info.file_size > self.cap:
                self.skips["over_language_cap"] += 1
                continue
            self.per_language[mlang.name] += info.file_size
            items.append([info.filename, mlang.name])
            size += info.file_size
            if size >= self.unit_bytes:
                self.units.append(Unit(len(self.units), "zip", path=path, items=items))
                items, size = [], 0
        if items:
            self.units.append(Unit(len(self.units), "zip", path=path, items=items))

    def jsonl(self, path: str) -> None:
        self.flush()
        if path.endswith(".gz"):  # not seekable: one unit per file
            self.units.append(Unit(len(self.units), "jsonl.gz", path=path))
            return
        total = os.path.getsize(path)
        for start in range(0, max(total, 1), self.unit_bytes):
            self.units.append(Unit(len(self.units), "jsonl", path=path, start=start, end=min(start + self.unit_bytes, total)))

    def parquet(self, path: str) -> None:
        import pyarrow.parquet as pq

        self.flush()
        try:
            meta = pq.ParquetFile(path).metadata
        except arrow_errors() as exc:  # truncated, garbage or unreadable: no footer to list row groups from
            self.bad(path, error_text(exc))
            return
        group, size = [], 0
        for g in range(meta.num_row_groups):
            group.append(g)
            size += meta.row_group(g).total_byte_size
            if size >= self.unit_bytes:
                self.units.append(Unit(len(self.units), "parquet", path=path, items=group))
                group, size = [], 0
        if group:
            self.units.append(Unit(len(self.units), "parquet", path=path, items=group))


def enumerate_units(
    inputs: list[tuple[str, Language | None]], unit_bytes: int, max_file_bytes: int, max_bytes_per_language: int = 0,
    on_file: Callable[[], None] | None = None, corrupt: list[Corrupt] | None = None,
) -> tuple[list[Unit], Counter[str]]:
    """Turn inputs (path, optional language override) into work units and the skip counts of enumeration;
    ``on_file`` is called for every file seen (for a progress bar); the corrupt inputs found are appended to
    ``corrupt``. An input that does not exist is an error (a mistyped path); one that is corrupt is skipped."""
    en = _Enumerator(unit_bytes, max_file_bytes, max_bytes_per_language, on_file)
    en.roots = {os.path.realpath(p) for p, _ in inputs if os.path.isdir(p)}
    for raw, lang in inputs:
        path = str(Path(raw))
        if os.path.isdir(path):
            en.walk(path, lang)
        elif not os.path.exists(path):
            raise FileNotFoundError(f"input {path} does not exist")
        elif not stat.S_ISREG(os.stat(path).st_mode):
            en.bad(path, not_regular(os.stat(path).st_mode))
        elif path.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
            en.jsonl(path)
        elif path.endswith(".parquet"):
            en.parquet(path)
        elif path.endswith(".zip"):
            en.zip_members(path, lang)
        else:
            en._add_file(path, os.path.getsize(path), lang)
    en.flush()
    if corrupt is not None:
        corrupt.extend(en.corrupt)
    return en.units, en.skips


def _iter_jsonl_lines(unit: Unit) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) for every line that starts inside [start, end) of the file (of the whole stream, .gz)."""
    if unit.kind == "jsonl.gz":
        with gzip.open(unit.path, "rb") as gz:
            pos = 0
            for line in gz:
                yield pos, line
                pos += len(line)
        return
    with open(unit.path, "rb") as fh:
        pos = unit.start
        if pos:
            fh.seek(pos - 1)
            if fh.read(1) != b"\n":  # the line straddling `start` belongs to the previous unit
                pos += len(fh.readline())
        while pos < unit.end:
            line = fh.readline()
            if not line:
                break
            yield pos, line
            pos += len(line)


def _record_problem(rec: Any, fields: RecordFields) -> str:
    """Why a parsed record holds no document ("" when it does)."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    content = rec.get(fields.content)
    if content is None:
        return f"no field {fields.content!r}" if fields.content not in rec else f"field {fields.content!r} is null"
    return "" if isinstance(content, str) else f"field {fields.content!r} is {type(content).__name__}, not a string"


def _record_doc(rec: dict[str, Any], source: str, fields: RecordFields) -> RawDocument:
    name = rec.get(fields.path) if isinstance(rec.get(fields.path), str) else ""
    return RawDocument(source, name or source, rec[fields.content].encode("utf-8", "surrogatepass"),
                       _record_language(rec, fields))


def _read_files(unit: Unit) -> Iterator[RawDocument | Corrupt]:
    for path, lang in unit.items:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            yield Corrupt("unreadable", path, "", os_error(path, exc))
            continue
        yield RawDocument(path, path, data, get_language(lang))


def _read_zip(unit: Unit) -> Iterator[RawDocument | Corrupt]:
    try:
        zf = zipfile.ZipFile(unit.path)
    except ZIP_ERRORS as exc:
        yield Corrupt("unreadable", unit.path, "", error_text(exc), count=len(unit.items))
        return
    with zf:
        for member, lang in unit.items:
            try:
                data = zf.read(member)  # checks the member's CRC-32
            except MEMBER_ERRORS as exc:
                yield Corrupt("unreadable", unit.path, f"member {member}", error_text(exc))
                continue
            yield RawDocument(f"{unit.path}!{member}", member, data, get_language(lang))


def _read_jsonl(unit: Unit, fields: RecordFields) -> Iterator[RawDocument | Corrupt]:
    first, number = -1, 0  # offset of the unit's first line, lines read so far
    base: list[int | None] = [] if unit.start else [0]  # lines before the unit: counted at its first bad line

    def where(offset: int) -> str:
        if not base:
            base.append(lines_before(unit.path, first))
        return f"line {base[0] + number}" if base[0] is not None else f"the line at byte {offset}"

    try:
        for offset, line in _iter_jsonl_lines(unit):
            first = offset if first < 0 else first
            number += 1
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield Corrupt("malformed_record", unit.path, where(offset), f"invalid JSON ({error_text(exc)})")
                continue
            problem = _record_problem(rec, fields)
            if problem:
                yield Corrupt("malformed_record", unit.path, where(offset), problem)
                continue
            yield _record_doc(rec, f"{unit.path}@{offset}", fields)
    except GZIP_ERRORS as exc:  # a truncated or garbage .gz (or a read error): the lines before it are kept
        yield Corrupt("unreadable", unit.path, f"line {number + 1}" if unit.kind == "jsonl.gz" else "",
                      error_text(exc))


def _read_parquet(unit: Unit, fields: RecordFields) -> Iterator[RawDocument | Corrupt]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(unit.path)
        names = pf.schema_arrow.names
    except arrow_errors() as exc:
        yield Corrupt("unreadable", unit.path, "", error_text(exc), count=len(unit.items))
        return
    rows = [pf.metadata.row_group(g).num_rows for g in unit.items]
    if fields.content not in names:  # every row is malformed: counted as such, named once per row group
        for g, n in zip(unit.items, rows):
            yield Corrupt("malformed_record", unit.path, f"row group {g}",
                          f"no column {fields.content!r} (columns: {', '.join(names)})", count=n)
        return
    columns = [c for c in dict.fromkeys((fields.content, fields.language, fields.path)) if c in names]
    for g, n in zip(unit.items, rows):
        try:
            records = pf.read_row_group(g, columns=columns).to_pylist()
        except arrow_errors() as exc:  # a damaged page: this row group's rows are lost, the others read
            yield Corrupt("unreadable", unit.path, f"row group {g}", error_text(exc), count=n)
            continue
        for i, rec in enumerate(records):
            problem = _record_problem(rec, fields)
            if problem:
                yield Corrupt("malformed_record", unit.path, f"row group {g} row {i}", problem)
                continue
            yield _record_doc(rec, f"{unit.path}#rg{g}:{i}", fields)


def read_unit(unit: Unit, fields: RecordFields) -> Iterator[RawDocument | Corrupt]:
    """The documents of a unit, in order; a :class:`Corrupt` in the stream is one item (or, for a whole unreadable
    file, ``count`` items) that could not be read, skipped and counted under its reason."""
    if unit.kind == "files":
        yield from _read_files(unit)
    elif unit.kind == "zip":
        yield from _read_zip(unit)
    elif unit.kind in ("jsonl", "jsonl.gz"):
        yield from _read_jsonl(unit, fields)
    elif unit.kind == "parquet":
        yield from _read_parquet(unit, fields)
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")
