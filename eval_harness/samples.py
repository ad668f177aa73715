"""Samples and results files.

``samples.jsonl``: one JSON object per line with at least ``task_id`` and ``completion`` (human-eval's format, so
samples from any model can be scored); our generator adds ``key`` (the task's key, which states its kind),
``kind`` (generation | translation | incremental | example), ``language``, ``source_language``, ``prefix_lines``.
Without ``kind`` a sample is a generation sample in the language its task id names (``CPP/12``, ``MBPP/11``). The
files of human-eval, bigcode-evaluation-harness, CodeGeeX and EvalPlus are read too, into these fields
(:mod:`eval_harness.sample_formats`).

``results.jsonl``: the sample's fields plus ``sample_index`` (its place among the samples of the same task key, in
file order), ``status``, ``passed``, timings and truncated output. Results are appended as they finish; a resumed
run skips every (key, sample_index) already there, so nothing is lost or counted twice.

One process writes a results file at a time (:class:`ResultWriter` holds ``results.jsonl.lock``). A file whose first
line is not a result row is refused, and so is a corrupt line anywhere but a torn last line (a crash mid-write, which
the writer cuts off); in both cases the file is left as it is. Scores count each (key, sample_index) once
(:func:`unique_results`).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from eval_harness.sample_formats import read_sample_records
from eval_harness.tasks import Kind, sample_key

log = logging.getLogger("codegeex.eval")
RESULT_FIELDS = ("key", "sample_index", "status")  # what every result row has (and a samples file lacks)
PREFIX_LANGUAGE = {"python": "python", "cpp": "cpp", "java": "java", "javascript": "js", "js": "js", "go": "go",
                   "rust": "rust", "mbpp": "python"}


def language_of(task_id: str) -> str:
    head = task_id.split("/", 1)[0].lower()
    if head not in PREFIX_LANGUAGE:
        raise ValueError(f"task_id {task_id!r}: cannot tell its language (expected Python/, CPP/, Java/, JavaScript/, "
                         "Go/, Rust/ or MBPP/)")
    return PREFIX_LANGUAGE[head]


def normalise(sample: dict[str, Any], where: str) -> dict[str, Any]:
    for field in ("task_id", "completion"):
        if not isinstance(sample.get(field), str):
            raise ValueError(f"{where}: field {field!r} missing or not a string")
    kind = sample.get("kind", Kind.GENERATION)
    if kind not in tuple(Kind):
        raise ValueError(f"{where}: kind {kind!r} must be one of {', '.join(Kind)}")
    out = dict(sample)
    out["kind"] = Kind(kind)
    if "language" not in out:
        try:
            out["language"] = language_of(sample["task_id"])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    if kind == Kind.TRANSLATION and not sample.get("source_language"):
        raise ValueError(f"{where}: a translation sample needs source_language")
    out.setdefault("key", sample_key(sample["task_id"], kind, out["language"], sample.get("source_language", ""),
                                     sample.get("prefix_lines", 0)))
    return out


def read_samples(path: str | Path, language: str = "", tasks: str = "") -> list[dict[str, Any]]:
    """Every sample, normalised, with its ``sample_index``; errors name the file and line. ``language`` and
    ``tasks`` say what ``HumanEval/N`` ids and a bigcode list hold (:func:`read_located_samples`)."""
    return [sample for _, sample in read_located_samples(path, language, tasks)]


def read_located_samples(path: str | Path, language: str = "", tasks: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(where, sample) for every sample of a file in any format :mod:`eval_harness.sample_formats` reads, normalised,
    with its ``sample_index`` (its place among the samples of its key, in file order)."""
    seen: Counter[str] = Counter()
    out = []
    for rec in read_sample_records(path, language, tasks):
        sample = normalise(rec.fields, rec.where)
        sample["sample_index"] = seen[sample["key"]]
        seen[sample["key"]] += 1
        out.append((rec.where, sample))
    return out


def result_id(row: dict[str, Any]) -> tuple[str, int]:
    return row["key"], int(row["sample_index"])


class ResultsFileError(ValueError):
    """A results file that cannot be used as it is; the message names the file (and line) and why."""


class ResultsFileBusy(ResultsFileError):
    """Another live process holds the results file's lock."""


class ResultsScan(NamedTuple):
    rows: list[dict[str, Any]]
    whole_bytes: int  # the length of the file without a torn last line
    size: int
    ends_in_newline: bool  # of the whole part (False: a last row that parses but lacks its newline)


def _row_problem(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """(the row, '') or (None, what is wrong with the line as a result row)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"is not JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})"
    except ValueError as exc:  # not UTF-8
        return None, f"is not JSON ({exc})"
    if not isinstance(rec, dict):
        return None, f"is JSON but not an object ({type(rec).__name__})"
    missing = [f for f in RESULT_FIELDS if f not in rec]
    if missing:
        return None, "lacks field(s) " + ", ".join(missing)
    if not isinstance(rec["key"], str) or not isinstance(rec["status"], str) or type(rec["sample_index"]) is not int:
        return None, "has a key or status that is not a string, or a sample_index that is not an integer"
    return rec, ""


def scan_results(path: str | Path) -> ResultsScan:
    """Every row of a results file, each line checked. A last line after a row, without its newline, that does not
    parse (a crash mid-write) is left out; any other bad line raises :class:`ResultsFileError` naming ``file:line``
    (on the first line: the file is not a results file of this harness). Reads only."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    whole, newline = 0, True
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                whole += len(line)
                continue
            rec, problem = _row_problem(line)
            if rec is None:
                cut_short = not line.endswith(b"\n") and line.startswith(b"{") and problem.startswith("is not JSON")
                if rows and cut_short:  # torn: the last line, after a row, not parsing
                    return ResultsScan(rows, whole, whole + len(line), newline)
                if not rows:
                    raise ResultsFileError(f"{path} is not a results file of this harness: line {number} {problem}; "
                                           "it was left as it is (name a new or an existing results file)")
                raise ResultsFileError(f"{path}:{number}: corrupt results line: it {problem}; the file was left as it "
                                       "is (only a torn last line is dropped): repair or delete that line, then run "
                                       "again")
            rows.append(rec)
            whole += len(line)
            newline = line.endswith(b"\n")
    return ResultsScan(rows, whole, whole, newline)


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results file (none if it does not exist), as the file holds them (duplicates too: see
    :func:`unique_results`); a torn last line is left out, and the file is never changed (its writer repairs it)."""
    path = Path(path)
    if not path.exists():
        return []
    scan = scan_results(path)
    if scan.whole_bytes < scan.size:
        log.debug("%s: a torn last line (%d bytes) left out", path, scan.size - scan.whole_bytes)
    return scan.rows


def unique_results(rows: list[dict[str, Any]], source: str = "results") -> list[dict[str, Any]]:
    """``rows`` with each (key, sample_index) once, the first kept; what is dropped is logged with ``source``."""
    seen: set[tuple[str, int]] = set()
    out = []
    for row in rows:
        rid = result_id(row)
        if rid not in seen:
            seen.add(rid)
            out.append(row)
    if len(out) < len(rows):
        log.warning("%s: %d duplicate rows of an already-seen (key, sample_index) ignored; the first of each counts",
                    source, len(rows) - len(out))
    return out


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """What scores and reports count: the file's rows, each (key, sample_index) once."""
    return unique_results(read_results(path), str(path))


class WriterLock:
    """An exclusive advisory lock (``flock``) on a sidecar file that says who holds it (pid, host, since, command).
    The kernel drops it when its holder ends, however it ends: a lock file left by a dead process blocks nothing."""

    def __init__(self, path: Path, target: Path, command: str = "") -> None:
        self.path, self.target = path, target
        self.fd = -1
        for _ in range(20):  # the file may be unlinked by a holder releasing it while we open it: lock the new one
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise ResultsFileBusy(f"{target} is being written by {holder} (lock {path}); wait for it to finish "
                                      "or stop it, then run again") from None
            if self._is_current(fd):
                self.fd = fd
                break
            os.close(fd)
        if self.fd < 0:
            raise ResultsFileBusy(f"{target}: could not take its lock {path} (it keeps being replaced)")
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": command or shlex.join(sys.argv)}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(info) + "\n").encode(), 0)

    def _is_current(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no one locks a file about to vanish) and let go."""
        if self.fd < 0:
            return
        if self._is_current(self.fd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1


def _holder(fd: int) -> str:
    """Who holds the lock, from its file (the holder writes it just after locking: wait a moment for it)."""
    for _ in range(25):
        try:
            info = json.loads(os.pread(fd, 65536, 0))
            return (f"pid {info['pid']} on host {info['host']} since {info['since']}, started as "
                    f"`{info['command']}`")
        except (ValueError, KeyError, TypeError):
            time.sleep(0.02)
    return "another process (its lock file does not say which)"


class ResultWriter:
    """The one writer of a results file, from creation to :meth:`close`: takes ``PATH.lock`` first (another writer
    stops at once, naming this one), then reads the rows already there (:attr:`rows`; a file that is not a results
    file, or a corrupt line, raises and leaves the file as it is), cuts a torn last line, and appends rows, one
    flushed line each."""

    def __init__(self, path: str | Path, command: str = "") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = WriterLock(self.path.with_name(self.path.name + ".lock"), self.path, command)
        try:
            self.rows = self._read_and_repair()
            self.fh = open(self.path, "a")  # noqa: SIM115 (kept open while results arrive)
        except BaseException:
            self.lock.release()
            raise

    def _read_and_repair(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        scan = scan_results(self.path)
        if scan.whole_bytes < scan.size:
            log.warning("%s: cut a torn last line (%d bytes, a crash mid-write); its sample runs again", self.path,
                        scan.size - scan.whole_bytes)
            os.truncate(self.path, scan.whole_bytes)
        if not scan.ends_in_newline:  # a whole last row without its newline: end it before appending
            with open(self.path, "a") as fh:
                fh.write("\n")
        return scan.rows

    def write(self, row: dict[str, Any]) -> None:
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        self.lock.release()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

