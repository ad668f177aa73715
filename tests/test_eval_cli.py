"""`codegeex eval`: the full canonical run (820 programs, five languages) passes within 5 minutes; translation
directions; an interrupted execution resumes without losing or double-counting; reports; generation from a
checkpoint with stop rules and resumption; watch."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from eval_harness.canonical import KNOWN_DATA_BUGS
from eval_harness.samples import language_of, read_results, read_samples
from eval_harness.stops import truncate
from launch.cli import main
from tests.conftest import shared_path
from tests.isolation import namespaces_possible

REPO = Path(__file__).resolve().parents[1]


def codegeex(*args: str) -> int:
    return main(list(args))


@pytest.fixture(scope="module")
def canonical_results(tmp_path_factory):
    """Every language's reference solutions executed once (the suite's full canonical run), with its duration."""
    data = shared_path("humaneval-x")
    tmp = tmp_path_factory.mktemp("canonical")
    assert codegeex("eval", "canonical", "--data", str(data), "--output", str(tmp / "samples.jsonl")) == 0
    start = time.perf_counter()
    assert codegeex("eval", "execute", str(tmp / "samples.jsonl"), "--data", str(data), "--output",
                    str(tmp / "results.jsonl")) == 0
    return tmp / "results.jsonl", time.perf_counter() - start


@pytest.mark.slow
def test_all_820_canonical_programs_pass_within_5_minutes(canonical_results):
    path, seconds = canonical_results
    rows = read_results(path)
    print(f"820 canonical programs in {seconds:.1f} s on {os.cpu_count()} cores")
    flaky = {t for kind, t in KNOWN_DATA_BUGS if kind == "generation"}  # Go/95: passes by chance, see canonical.py
    failures = {r["task_id"]: (r["status"], r["output"][-300:]) for r in rows
                if r["status"] != "passed" and r["task_id"] not in flaky}
    assert len(rows) == 820 and not failures, failures
    assert Counter(r["language"] for r in rows) == dict.fromkeys(["python", "cpp", "java", "js", "go"], 164)
    assert seconds < 300
    if namespaces_possible():  # as root with namespaces (CI): every row isolated, or the run is wrong
        assert all(r["isolated"] is True for r in rows), Counter(r["isolated"] for r in rows)


@pytest.mark.slow
def test_translation_directions_pass_with_the_targets_canonical_solution(tmp_path):
    """All 20 directions on the first 12 problems (the full 3,280 is the documented run in docs/evaluation.md)."""
    data = shared_path("humaneval-x")
    samples = tmp_path / "samples.jsonl"
    assert codegeex("eval", "canonical", "--data", str(data), "--tasks", "translation", "--output", str(samples)) == 0
    rows = [r for r in read_samples(samples) if int(r["task_id"].rsplit("/", 1)[1]) < 12]
    samples.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "sample_index"}) + "\n" for r in rows))
    assert codegeex("eval", "execute", str(samples), "--data", str(data), "--output", str(tmp_path / "r.jsonl")) == 0
    results = read_results(tmp_path / "r.jsonl")
    failing = {r["task_id"] for r in results if r["status"] != "passed"}
    assert failing <= {t for kind, t in KNOWN_DATA_BUGS if kind == "translation"}, failing
    pairs = Counter((r["source_language"], r["language"]) for r in results if r["task_id"] not in failing)
    assert len(pairs) == 20 and all(n == 12 - sum(language_of(t) == tgt for t in failing)
                                    for (_, tgt), n in pairs.items()), pairs
    assert sum(r["cached"] for r in results) == 12 * 5 * 3  # one program per target, whatever the source
    assert codegeex("eval", "report", str(tmp_path / "r.jsonl"), "--output", str(tmp_path / "rep")) == 0
    assert "translation pass@1 (%)" in (tmp_path / "rep" / "report.md").read_text()


def test_stop_rules():
    assert truncate("python", "def f():\n", "    return 1\n\ndef g():\n    pass") == ("    return 1\n", True)
    assert truncate("python", "def f():\n", "    return 1\nprint(f())") == ("    return 1", True)
    assert truncate("python", "def f():\n", "    x = 1\n    return x") == ("    x = 1\n    return x", False)
    java = "class Solution {\n    public int f() {\n"
    assert truncate("java", java, "        return 1;\n    }\n}\nclass X {}") == ("        return 1;\n    }\n}\n", True)
    assert truncate("cpp", "int f(){\n", "  if (a) { b; }\n  return 1;\n}\nint main") == (
        "  if (a) { b; }\n  return 1;\n}\n", True)
    assert truncate("go", "func F() int {\n", "    return 1") == ("    return 1", False)


@pytest.mark.slow
def test_interrupted_execution_resumes_without_loss_or_double_counting(tmp_path):
    data = shared_path("humaneval-x")
    samples = tmp_path / "samples.jsonl"
    assert codegeex("eval", "canonical", "--data", str(data), "--languages", "python,js", "--output", str(samples)) == 0
    rows = read_samples(samples)[:40] + read_samples(samples)[164:204]
    wrong = [{**r, "completion": "    return None\n" if r["language"] == "python" else "  return null\n}\n"}
             for r in rows[:10] + rows[40:50]]
    samples.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "sample_index"}) + "\n"
                               for r in rows + wrong))
    results = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "launch.cli", "eval", "execute", str(samples), "--data", str(data), "--output",
           str(results), "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not results.exists() or len(results.read_text().splitlines()) < 15:
        assert proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(results, "a") as fh:
        fh.write('{"key": "torn')  # a line cut short by the crash
    first = len(read_results(results))
    assert 15 <= first < 100
    assert subprocess.run(cmd, cwd=REPO, capture_output=True).returncode == 0
    final = read_results(results)
    ids = [(r["key"], r["sample_index"]) for r in final]
    assert len(ids) == len(set(ids)) == 100
    by_index = Counter((r["passed"], r["sample_index"]) for r in final)  # wrong answers fail or raise
    assert by_index == {(True, 0): 80, (False, 1): 20}, by_index


@pytest.mark.slow
def test_report_compares_checkpoints_with_correlations(canonical_results, tmp_path):
    path, _ = canonical_results
    rows = read_results(path)
    files = []
    for step, keep in ((100, 40), (200, 90), (300, 150)):  # checkpoints solving more problems as training goes on
        f = tmp_path / f"ckpt{step}.jsonl"
        f.write_text("".join(json.dumps({**r, "checkpoint_step": step, "status": r["status"] if int(
            r["task_id"].rsplit("/", 1)[1]) < keep + 5 * (r["language"] == "go") else "failed"}) + "\n" for r in rows))
        files.append(str(f))
    assert codegeex("eval", "report", *files, "--output", str(tmp_path / "rep"), "--ks", "1", "--budget", "5") == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## step 100" in md and "## step 300" in md and "Pearson correlation" in md
    assert "| HumanEval-X cpp | HumanEval-X python | +1.000 |" in md
    assert "Multilingual budget allocation (5 samples per problem)" in md
    page = (tmp_path / "rep" / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') >= 3 and not re.search(r'(src|href)="(https?:)?//', page)


@pytest.mark.slow
def test_example_tests_and_incremental_prompts_with_reference_completions_pass(tmp_path):
    data = shared_path("humaneval-x")
    samples = tmp_path / "samples.jsonl"
    assert codegeex("eval", "canonical", "--data", str(data), "--tasks", "example,incremental", "--output",
                    str(samples)) == 0
    rows = [r for r in read_samples(samples) if int(r["task_id"].rsplit("/", 1)[1]) < 8]
    samples.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "sample_index"}) + "\n" for r in rows))
    assert codegeex("eval", "execute", str(samples), "--data", str(data), "--output", str(tmp_path / "r.jsonl")) == 0
    results = read_results(tmp_path / "r.jsonl")
    assert {r["kind"] for r in results} == {"example", "incremental"}
    assert [r for r in results if r["status"] != "passed"] == []
    assert codegeex("eval", "report", str(tmp_path / "r.jsonl"), "--output", str(tmp_path / "rep")) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "### example pass@k" in md and "micro: every (problem, prefix) prompt" in md


def test_mbpp_samples_through_the_cli(tmp_path):
    from eval_harness.datasets import load_mbpp

    path = shared_path("mbpp", "mbpp.jsonl")
    problems = load_mbpp(path)[:6]
    rows = [{"task_id": p.task_id, "completion": p.canonical_solution} for p in problems]
    rows.append({"task_id": problems[0].task_id, "completion": "def nothing():\n    return None\n"})
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert codegeex("eval", "execute", str(samples), "--mbpp", str(path), "--output", str(tmp_path / "r.jsonl")) == 0
    results = read_results(tmp_path / "r.jsonl")
    assert [r["passed"] for r in results if r["sample_index"] == 0] == [True] * 6
    assert [r["status"] for r in results if r["sample_index"] == 1] in (["failed"], ["runtime_error"])
    with pytest.raises(ValueError, match="--mbpp FILE is needed"):
        from eval_harness.execute import ExecuteConfig, execute_file

        execute_file(ExecuteConfig(samples, tmp_path / "r2.jsonl"))
