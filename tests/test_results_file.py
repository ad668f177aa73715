"""The results file of `codegeex eval execute` (one writer at a time, refusals, corrupt and torn lines, duplicates
counted once) and stopping `codegeex eval generate` with a signal; the concurrency and the signal with real
processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from eval_harness.datasets import load_humaneval_x
from eval_harness.execute import summary
from eval_harness.samples import ResultsFileBusy, ResultWriter, read_results, read_samples
from eval_harness.stopping import STOP
from launch.cli import main
from tests.conftest import shared_path
from tests.test_eval_generate import save_tiny

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "launch.cli"]


def python_samples(path: Path, problems: int, tail: str = "") -> list[str]:
    """Samples of the first HumanEval-X Python problems (the reference solutions, then ``tail`` at top level);
    returns their keys."""
    probs = load_humaneval_x(shared_path("humaneval-x"), ["python"])["python"][:problems]
    path.write_text("".join(json.dumps({"task_id": p.task_id, "completion": p.canonical_solution + tail}) + "\n"
                            for p in probs))
    return [s["key"] for s in read_samples(path)]


def execute(samples: Path, output: Path, *extra: str) -> int:
    return main(["eval", "execute", str(samples), "--data", str(shared_path("humaneval-x")), "--output", str(output),
                 "--workers", "2", *extra])


def request_stop_at(path: Path, lines: int, reason: str, give_up: threading.Event) -> None:
    """Request a stop (as the signal ``reason`` does) once ``path`` holds ``lines`` lines, unless told to give up."""
    while path.read_bytes().count(b"\n") < lines:
        if give_up.wait(0.005):
            return
    STOP.request(reason)


def errors(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


@pytest.mark.slow
def test_a_second_writer_stops_at_once_naming_the_first(tmp_path):
    samples, results = tmp_path / "samples.jsonl", tmp_path / "results.jsonl"
    keys = python_samples(samples, 8, "\nimport time\ntime.sleep(1.0)\n")  # ~4 s with 2 workers
    cmd = [*CLI, "eval", "execute", str(samples), "--data", str(shared_path("humaneval-x")), "--output", str(results),
           "--workers", "2"]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "results.jsonl.lock"
    try:
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.read_text().strip()):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.02)
        holder = json.loads(lock.read_text())
        assert holder["pid"] == first.pid and holder["host"] == os.uname().nodename and "execute" in holder["command"]
        second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert first.poll() is None  # it failed while the first was still running: it did not wait for the lock
    finally:
        _, first_err = first.communicate(timeout=120)
    assert second.returncode == 1, second.stderr
    assert f"{results} is being written by pid {first.pid} on host {holder['host']} since {holder['since']}, " \
           "started as `" in second.stderr, second.stderr
    assert first.returncode == 0, first_err
    ids = [(r["key"], r["sample_index"]) for r in read_results(results)]
    assert sorted(ids) == sorted((k, 0) for k in keys) and len(set(ids)) == 8  # each exactly once
    assert all(r["status"] == "passed" for r in read_results(results))
    assert not lock.exists()  # removed by its holder on closing
    # a lock file left by a dead process blocks nothing; in one process two writers still exclude each other
    lock.write_text(json.dumps({"pid": 999999999, "host": "gone", "since": "then", "command": "killed"}) + "\n")
    before = results.read_bytes()
    assert execute(samples, results) == 0 and results.read_bytes() == before and not lock.exists()
    with ResultWriter(results, "held here"), pytest.raises(ResultsFileBusy, match=f"pid {os.getpid()} .*`held here`"):
        ResultWriter(results)



def assert_refused(samples: Path, path: Path, by_execute: str, by_report: str, tmp_path: Path, caplog) -> None:
    """``execute`` and ``report`` both refuse ``path`` with their messages, and leave it byte for byte."""
    before = path.read_bytes()
    caplog.clear()
    assert execute(samples, path) == 1
    assert by_execute in errors(caplog), errors(caplog)
    assert main(["eval", "report", str(path), "--output", str(tmp_path / "rep")]) == 1
    assert by_report in errors(caplog)
    assert path.read_bytes() == before

@pytest.mark.slow
def test_an_output_that_is_not_a_results_file_is_refused_untouched(tmp_path, caplog):
    samples = tmp_path / "samples.jsonl"
    python_samples(samples, 2)
    text = tmp_path / "notes.txt"
    text.write_bytes(b"my notes\nnot results\n")
    one_line = tmp_path / "one.jsonl"
    one_line.write_bytes(b'{"key": "x", "sample')  # no newline, no row before it: not taken for a torn row
    for path, why in ((samples, "line 1 lacks field(s) key, sample_index, status"), (text, "line 1 is not JSON"),
                      (one_line, "line 1 is not JSON")):
        assert_refused(samples, path, f"{path} is not a results file of this harness: {why}",
                       f"{path} is not a results file", tmp_path, caplog)
        assert not Path(f"{path}.lock").exists()
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    assert execute(samples, empty) == 0 and len(read_results(empty)) == 2  # an empty file is a results file


@pytest.mark.slow
def test_corrupt_lines_stop_the_run_and_a_torn_last_line_is_run_again(tmp_path, caplog):
    samples, good = tmp_path / "samples.jsonl", tmp_path / "good.jsonl"
    keys = python_samples(samples, 4)
    assert execute(samples, good) == 0
    lines = good.read_bytes().splitlines(keepends=True)
    order = [json.loads(line)["key"] for line in lines]  # as the programs finished
    assert sorted(order) == sorted(keys)
    bad_row = json.dumps({k: v for k, v in json.loads(lines[2]).items() if k != "sample_index"}).encode() + b"\n"
    for number, replacement, why in ((2, b'{"key": "Python/1|gen\n', "is not JSON"),
                                     (3, bad_row, "lacks field(s) sample_index")):
        corrupt = tmp_path / f"corrupt{number}.jsonl"
        corrupt.write_bytes(b"".join([*lines[:number - 1], replacement, *lines[number:]]))
        assert_refused(samples, corrupt, f"{corrupt}:{number}: corrupt results line: it {why}",
                       f"{corrupt}:{number}: corrupt", tmp_path, caplog)  # nothing cut, nothing re-run
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(b"".join(lines[:3]) + lines[3][:len(lines[3]) // 2])  # a crash in the middle of the last row
    assert [r["key"] for r in read_results(torn)] == order[:3]
    assert main(["eval", "report", str(torn), "--output", str(tmp_path / "rep")]) == 0
    assert torn.read_bytes().endswith(lines[3][:len(lines[3]) // 2])  # a reader never cuts
    assert execute(samples, torn) == 0
    data = torn.read_bytes()
    assert data.startswith(b"".join(lines[:3])) and data.count(b"\n") == 4
    rows = read_results(torn)
    assert [r["key"] for r in rows] == order and all(r["status"] == "passed" for r in rows)  # only the torn one again
    unended = tmp_path / "unended.jsonl"  # a whole last row whose newline was lost: kept, and ended before appending
    unended.write_bytes(b"".join(lines[:2]).rstrip(b"\n"))
    assert execute(samples, unended) == 0
    assert sorted(r["key"] for r in read_results(unended)) == sorted(keys)


def test_duplicates_count_once_in_scores_and_reports(tmp_path, caplog):
    def row(num: int, index: int, status: str) -> dict[str, object]:
        return {"task_id": f"Python/{num}", "key": f"Python/{num}|generation", "kind": "generation",
                "language": "python", "sample_index": index, "status": status, "passed": status == "passed"}

    clean = [row(0, 0, "passed"), row(0, 1, "failed"), row(1, 0, "failed"), row(1, 1, "failed")]
    dups = [*clean, row(1, 0, "passed"), row(0, 1, "passed"), row(0, 1, "failed")]  # the first of each counts
    files = {}
    for name, rows in (("clean", clean), ("dup", dups)):
        (tmp_path / name).mkdir()
        files[name] = tmp_path / name / "results.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    caplog.set_level(logging.WARNING)
    assert summary(files["dup"]) == summary(files["clean"])
    assert summary(files["clean"])["generation"]["python"]["pass@k"] == {1: 0.25, 2: 0.5}  # k 1 and n
    assert f"{files['dup']}: 3 duplicate rows" in caplog.text
    for name, path in files.items():
        assert main(["eval", "report", str(path), "--output", str(tmp_path / name / "rep"), "--ks", "1,2",
                     "--budget", "2"]) == 0
    for out in ("report.md", "scores.json"):
        assert (tmp_path / "dup" / "rep" / out).read_text() == (tmp_path / "clean" / "rep" / out).read_text()
    scores = json.loads((tmp_path / "dup" / "rep" / "scores.json").read_text())["results"]
    assert scores["samples"] == 4 and scores["generation"]["python"]["pass@k"] == {"1": 0.25, "2": 0.5}


@pytest.mark.slow
def test_generate_stops_on_sigint_keeping_whole_samples_and_resumes(tmp_path, tokenizer_model):
    save_tiny(tmp_path / "ckpt", tokenizer_model, 3, 0)
    out = tmp_path / "samples.jsonl"
    args = ["eval", "generate", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(shared_path("humaneval-x")),
            "--languages", "python", "--problems", "6", "--n", "4", "--max-new-tokens", "64", "--batch-size", "1",
            "--output", str(out)]
    proc = subprocess.Popen([*CLI, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not out.exists() or out.read_bytes().count(b"\n") < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "no samples written"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - sent
    assert proc.returncode == 130, err
    assert took < 2.0, took
    assert "Traceback" not in err, err
    kept = read_samples(out)  # every line whole (a torn one would not parse)
    assert out.read_bytes().endswith(b"\n") and 2 <= len(kept) < 20
    assert f"stopped by SIGINT after {len(kept)} samples" in err and "run the same command again to resume" in err
    before = out.read_bytes()
    give_up = threading.Event()
    watcher = threading.Thread(target=request_stop_at, args=(out, len(kept) + 1, "SIGTERM", give_up), daemon=True)
    watcher.start()  # in this process: a SIGTERM's request, once one more sample is written
    try:
        assert main(args) == 143
    finally:
        give_up.set()
        watcher.join()
        STOP.clear()  # no stop left standing for the tests after this one
    assert len(read_samples(out)) < 24 and out.read_bytes().startswith(before)
    before = out.read_bytes()
    assert main(args) == 0
    final = read_samples(out)
    assert out.read_bytes().startswith(before)
    assert Counter(s["key"] for s in final) == {k: 4 for k in {s["key"] for s in final}} and len(final) == 24
