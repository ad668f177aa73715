"""Scores and the report of ``codegeex eval report``: pass@k against hand-computed values, each dataset its own rows,
overall rows, the k rule (1, 10, 100 and n), bootstrap intervals, labels, fixed colours, and the HTML report rendered
by headless Chromium (tables are tables, every image loads)."""

from __future__ import annotations

import base64
import json
import logging
import random
import shutil
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from eval_harness.execute import summary
from eval_harness.metrics import Bootstrap
from eval_harness.report import distinct_labels
from eval_harness.report_charts import PALETTE, STATUS_COLOURS, checkpoint_colours, series_styles
from eval_harness.scoring import score
from launch.cli import main
from tests.conftest import missing
from tests.headless import CHROMIUM, Chromium

PREFIX = {"python": "Python", "cpp": "CPP", "java": "Java", "js": "JavaScript", "go": "Go"}
BAD = ("failed", "compile_error", "runtime_error", "timeout")


def result(task_id: str, index: int, status: str, kind: str = "generation", language: str = "", source: str = "",
           prefix: int = 0, step: int | None = None) -> dict[str, Any]:
    """A result row as ``codegeex eval execute`` writes it (the fields scores read)."""
    language = language or ("python" if task_id.startswith("MBPP/") else
                            next(k for k, v in PREFIX.items() if task_id.startswith(v + "/")))
    key = {"translation": f"{task_id}|translation|{source}->{language}",
           "incremental": f"{task_id}|incremental|{prefix}"}.get(kind, f"{task_id}|{kind}")
    row = {"task_id": task_id, "key": key, "kind": kind, "language": language, "source_language": source,
           "prefix_lines": prefix, "sample_index": index, "status": status, "passed": status == "passed"}
    return row if step is None else {**row, "checkpoint_step": step}


def problem(task_id: str, n: int, c: int, **kw: Any) -> list[dict[str, Any]]:
    """n samples of one task, the first c passing."""
    return [result(task_id, i, "passed" if i < c else "failed", **kw) for i in range(n)]


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pass_at_k_by_hand_and_each_dataset_its_own_rows():
    rows = (problem("Python/0", 5, 2) + problem("Python/1", 5, 0) + problem("Python/2", 5, 5)
            + problem("CPP/0", 5, 5) + problem("CPP/1", 5, 1) + problem("MBPP/11", 5, 1) + problem("MBPP/12", 5, 4))
    s = score(rows)
    py, cpp = s["generation"]["python"], s["generation"]["cpp"]
    assert set(s["generation"]) == {"python", "cpp"}  # MBPP is not merged into Python
    assert (py["problems"], py["samples"], py["n"], py["n_max"]) == (3, 15, 5, 5)
    assert list(py["pass@k"]) == [1, 5]  # default ks: 1 (10 and 100 exceed n), and n itself
    assert py["pass@k"][1] == pytest.approx((2 / 5 + 0 + 1) / 3)
    assert py["pass@k"][5] == pytest.approx((1 + 0 + 1) / 3)
    assert cpp["pass@k"] == pytest.approx({1: (1 + 1 / 5) / 2, 5: 1.0})
    mbpp = s["mbpp"]["generation"]
    assert mbpp["problems"] == 2 and mbpp["pass@k"][1] == pytest.approx((1 / 5 + 4 / 5) / 2)
    overall = s["generation_overall"]
    assert overall["mean_of_languages"]["pass@k"][1] == pytest.approx((py["pass@k"][1] + cpp["pass@k"][1]) / 2)
    assert overall["all_problems"]["pass@k"][1] == pytest.approx((0.4 + 0 + 1 + 1 + 0.2) / 5)
    assert overall["all_problems"]["problems"] == 5 and overall["mean_of_languages"]["rows"] == [
        "generation cpp", "generation python"]
    explicit = score(rows, ks=[1, 2, 10])
    assert list(explicit["generation"]["python"]["pass@k"]) == [1, 2, 5]  # 10 > n: not scored, shown as "-"
    # pass@2 of 2 correct in 5: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert explicit["generation"]["python"]["pass@k"][2] == pytest.approx((0.7 + 0 + 1) / 3)
    assert explicit["ks"] == [1, 2, 10] and explicit["ks_explicit"] and not s["ks_explicit"]


def test_unequal_samples_per_problem_use_the_smallest_n():
    s = score(problem("MBPP/11", 3, 1) + problem("MBPP/12", 5, 5) + problem("Python/0", 200, 20))
    mbpp = s["mbpp"]["generation"]
    assert (mbpp["n"], mbpp["n_max"]) == (3, 5) and list(mbpp["pass@k"]) == [1, 3]
    assert mbpp["pass@k"][3] == pytest.approx((1 + 1) / 2)
    assert list(s["generation"]["python"]["pass@k"]) == [1, 10, 100, 200]
    assert s["generation"]["python"]["pass@k"][1] == pytest.approx(0.1)


def test_bootstrap_intervals_collapse_contain_narrow_and_match_the_normal_approximation():
    agree = score([r for p in range(6) for r in problem(f"Python/{p}", 5, 2)])["generation"]["python"]
    assert agree["ci95"][1] == [agree["pass@k"][1]] * 2 == [0.4, 0.4]  # every problem the same: a point
    rng = random.Random(0)
    half = [r for p in range(100) for r in problem(f"Python/{p}", 1, int(rng.random() < 0.5))]
    s = score(half)["generation"]["python"]
    p, (lo, hi) = s["pass@k"][1], s["ci95"][1]
    width = 1.96 * (p * (1 - p) / 100) ** 0.5  # the mean of 100 Bernoulli problems
    assert lo < p < hi and lo == pytest.approx(p - width, abs=0.025) and hi == pytest.approx(p + width, abs=0.025)
    small = score(half[:25])["generation"]["python"]["ci95"][1]
    assert small[1] - small[0] > hi - lo  # fewer problems, a wider interval
    assert score(half)["generation"]["python"]["ci95"] == s["ci95"]  # seeded: the same every time
    other = score(half, boot=Bootstrap(seed=1))["generation"]["python"]["ci95"][1]
    assert other != [lo, hi] and other == pytest.approx([lo, hi], abs=0.03)
    both = score(half + [{**r, "task_id": r["task_id"].replace("Python", "CPP"), "language": "cpp",
                          "key": r["key"].replace("Python", "CPP")} for r in half[:50]])
    ov = both["generation_overall"]["all_problems"]
    assert ov["ci95"][1][1] - ov["ci95"][1][0] < hi - lo  # 150 problems: narrower than the 100 alone
    assert all(0 <= v <= 1 for row in both["generation"].values() for b in row["ci95"].values() for v in b)


def test_execute_summary_has_the_same_rows_and_ks(tmp_path):
    path = write(tmp_path / "r.jsonl", problem("Python/0", 5, 2) + problem("CPP/0", 5, 0) + problem("MBPP/11", 5, 5))
    out = summary(path)
    assert list(out["generation"]["python"]["pass@k"]) == [1, 5] and "ci95" in out["generation"]["python"]
    assert out["mbpp"]["generation"]["pass@k"] == {1: 1.0, 5: 1.0}
    assert out["generation_overall"]["mean_of_languages"]["pass@k"][1] == pytest.approx(0.2)
    assert set(out) == {"statuses", "generation", "generation_overall", "mbpp"}


def test_labels_distinct_and_given(tmp_path, caplog):
    paths = [tmp_path / "run1" / "results.jsonl", tmp_path / "run2" / "results.jsonl"]
    assert distinct_labels(paths, ["results", "results"]) == ["run1/results", "run2/results"]
    assert distinct_labels(paths, ["step 5", "step 5"]) == ["step 5 (run1)", "step 5 (run2)"]
    assert distinct_labels([paths[0], paths[0]], ["results"] * 2) == ["results #1", "results #2"]
    for p, c in zip(paths, (1, 3), strict=True):
        write(p, problem("Python/0", 4, c))
    assert main(["eval", "report", *map(str, paths), "--output", str(tmp_path / "rep")]) == 0
    scores = json.loads((tmp_path / "rep" / "scores.json").read_text())
    assert list(scores) == ["run1/results", "run2/results"]
    assert main(["eval", "report", *map(str, paths), "--output", str(tmp_path / "rep2"), "--labels", "base,tuned"]) == 0
    assert list(json.loads((tmp_path / "rep2" / "scores.json").read_text())) == ["base", "tuned"]
    assert "| tuned |" in (tmp_path / "rep2" / "report.md").read_text()
    caplog.set_level(logging.ERROR)
    assert main(["eval", "report", *map(str, paths), "--output", str(tmp_path / "rep3"), "--labels", "one"]) == 1
    assert "--labels gives 1 label(s) for 2 results file(s)" in caplog.text
    assert main(["eval", "report", str(paths[0]), "--output", str(tmp_path / "rep3"), "--ks", "1,x"]) == 1
    assert "--ks '1,x'" in caplog.text


def test_fixed_colours():
    from eval_harness.execution import STATUSES

    assert set(STATUSES) <= set(STATUS_COLOURS) and len(set(STATUS_COLOURS.values())) == len(STATUS_COLOURS)
    assert (STATUS_COLOURS["passed"], STATUS_COLOURS["failed"]) == ("#2ca02c", "#d62728")  # green, red
    labels = [f"step {s}" for s in range(100, 2100, 100)]
    colours = checkpoint_colours(labels)
    assert len(set(colours.values())) == 20  # one each
    own = PALETTE[zlib.crc32(b"step 300") % 20]  # from the label alone: the same in every report
    assert checkpoint_colours(["step 300"]) == {"step 300": own}
    assert checkpoint_colours(["step 300", "step 400"])["step 300"] == own  # moved only if an earlier label took it
    nine = series_styles([f"s{i}" for i in range(9)])
    assert len({s["color"] for s in nine.values()}) == 9 and len({s["marker"] for s in nine.values()}) == 9
    many = series_styles([f"s{i}" for i in range(25)])
    assert len({(s["color"], s["linestyle"]) for s in many.values()}) == 25


def checkpoint_rows(step: int, skill: float) -> list[dict[str, Any]]:
    """One pretend checkpoint: generation in five languages (5 samples), MBPP, example tests, translation, incremental."""
    rng = random.Random(step)
    out = []

    def status() -> str:
        return "passed" if rng.random() < skill else rng.choice(BAD)

    for lang, prefix in PREFIX.items():
        for p in range(6):
            out += [result(f"{prefix}/{p}", i, status(), step=step) for i in range(5)]
            out += [result(f"{prefix}/{p}", 0, status(), kind="example", step=step)]
            out += [result(f"{prefix}/{p}", 0, status(), kind="translation", source=src, step=step)
                    for src in PREFIX if src != lang]
    out += [result(f"MBPP/{11 + p}", i, status(), step=step) for p in range(6) for i in range(5)]
    out += [result(f"Python/{p}", 0, status(), kind="incremental", prefix=pl, step=step)
            for p in range(6) for pl in range(3)]
    return out


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    files = [str(write(tmp / f"run/step{s}/results.jsonl", checkpoint_rows(s, k)))
             for s, k in ((100, 0.2), (200, 0.45), (300, 0.7))]
    assert main(["eval", "report", *files, "--output", str(tmp / "rep"), "--budget", "3"]) == 0
    return tmp / "rep"


class Outline(HTMLParser):
    """The tags of a page in order, and every image's src."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")


def test_report_scores_markdown_and_html(report_dir):
    scores = json.loads((report_dir / "scores.json").read_text())
    assert list(scores) == ["step 100", "step 200", "step 300"]
    last = scores["step 300"]
    assert last["mbpp"]["generation"]["problems"] == 6 and "python" in last["generation"]
    assert last["generation"]["python"]["problems"] == 6  # the MBPP problems are not in the Python row
    assert list(last["generation"]["python"]["pass@k"]) == ["1", "5"] and last["ks"] == [1, 10, 100]
    for row in (last["generation"]["go"], last["generation_overall"]["mean_of_languages"], last["mbpp"]["generation"],
                last["translation"]["python"]["go"], last["translation_overall"]["mean_of_pairs"]):
        for k, (lo, hi) in row["ci95"].items():
            assert lo <= row["pass@k"][k] <= hi
    assert set(last["incremental"]["python"]) >= {"micro", "macro", "prompts"} and last["example"]
    assert last["ci"] == {"method": "percentile bootstrap over problems", "level": 0.95, "resamples": 1000, "seed": 0}
    md = (report_dir / "report.md").read_text()
    assert md.startswith("# Evaluation report\n") and "## step 100" in md and "## step 300" in md
    assert "### generation pass@k (%) — MBPP" in md and "| MBPP | 6 | 30 | 5 |" in md
    assert "| overall (mean of languages) | 30 | 150 | 5 |" in md and "| overall (all problems) |" in md
    assert "| language | problems | samples | n | pass@1 | pass@5 |" in md and "pass@10" not in md.split("## step")[1]
    assert "Pearson correlation" in md and "Multilingual budget allocation (3 samples per problem)" in md
    assert "rows: source language, columns: target language" in md and "micro: every (problem, prefix) prompt" in md
    figures = sorted(p.name for p in (report_dir / "figures").glob("*.png"))
    assert {"statuses.png", "over-checkpoints.png", "translation-over-checkpoints.png", "checkpoints-bars.png",
            "passk-over-checkpoints.png", "02-step-300-passk.png", "02-step-300-translation.png"} <= set(figures)
    assert all(f"(figures/{f})" in md for f in figures)
    page = Outline()
    page.feed((report_dir / "report.html").read_text())
    assert page.tags[:4] == ["html", "head", "meta", "meta"] and page.tags[page.tags.index("body") + 1] == "h1"
    assert "pre" not in page.tags and page.tags.count("table") >= 10 and page.tags.count("img") == len(figures)
    assert page.tags.index("h1") < page.tags.index("img")  # the title first, charts after
    for src in page.images:
        assert base64.b64decode(src.removeprefix("data:image/png;base64,"))[:8] == b"\x89PNG\r\n\x1a\n"


def test_explicit_ks_show_a_dash_where_k_exceeds_n(tmp_path):
    path = write(tmp_path / "r.jsonl", problem("Python/0", 5, 2) + problem("CPP/0", 5, 1))
    assert main(["eval", "report", str(path), "--output", str(tmp_path / "rep"), "--ks", "1,10"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| language | problems | samples | n | pass@1 | pass@5 | pass@10 |" in md
    assert "| python | 1 | 5 | 5 | 40.0 [40.0, 40.0] | 100.0 [100.0, 100.0] | - |" in md


def test_report_renders_in_headless_chromium(report_dir):
    if not Path(CHROMIUM).exists() or not shutil.which("bash"):
        missing(f"{CHROMIUM} is not installed (Debian package chromium; make system installs it)")
    probe = """(() => {
      const imgs = [...document.images];
      const tables = [...document.querySelectorAll('table')];
      const figureAfterHeading = [...document.querySelectorAll('figure')].every(f => {
        const first = f.closest('section').firstElementChild; return /^H[23]$/.test(first.tagName); });
      return {first: document.body.firstElementChild.tagName, title: document.querySelector('h1').textContent,
              tables: tables.map(t => [t.rows.length, t.rows[0].cells.length, t.tBodies.length]),
              images: imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width]),
              pre: document.querySelectorAll('pre').length, figureAfterHeading,
              headings: [...document.querySelectorAll('h2')].map(h => h.textContent)};
    })()"""
    with Chromium(1200) as chromium:
        chromium.open((report_dir / "report.html").as_uri())
        page = chromium.evaluate(probe)
    assert page["first"] == "H1" and page["title"] == "Evaluation report" and page["pre"] == 0
    assert len(page["tables"]) >= 10 and all(rows >= 2 and cols >= 2 and body == 1
                                             for rows, cols, body in page["tables"])
    assert len(page["images"]) >= 7 and all(ok and w > 0 and h > 0 and shown > 0
                                            for ok, w, h, shown in page["images"]), page["images"]
    assert page["figureAfterHeading"]
    assert page["headings"][:2] == ["Inputs", "Statuses"] and "step 300" in page["headings"]
