"""``codegeex eval report`` as a library: one or more results files in; ``report.md``, ``report.html``, ``scores.json``
and ``figures/*.png`` out.

Each results file gets a label (``--labels``, else ``step N`` from the samples' ``checkpoint_step``, else the file's
stem; labels that would clash are told apart by their parent directories). Several files are compared side by side
(e.g. checkpoints of one run): pass@k over training steps and the Pearson correlation of pass@1 between benchmarks
across checkpoints (PanGu-Coder's Table 4). Both documents come from jinja2 templates (eval_harness/templates/) over
one list of sections, so they say the same. The charts are matplotlib PNGs (:mod:`eval_harness.report_charts`),
written to ``figures/`` (which report.md links) and embedded in report.html as data: URIs, so that the page is one
file that can be mailed or attached as it is."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eval_harness import report_charts as charts
from eval_harness.report_tables import (
    OVERALL_MACRO,
    Figure,
    Section,
    Table,
    Text,
    across_table,
    benchmarks_of,
    budget_table,
    correlation_table,
    incremental_table,
    overall_rows,
    passk_table,
    statuses_table,
    translation_table,
)
from eval_harness.samples import load_results
from eval_harness.scoring import budget_allocation, score
from eval_harness.tasks import Kind

log = logging.getLogger("codegeex.eval")
TEMPLATES = Path(__file__).with_name("templates")
FIGURED_RUNS = 10  # the last this many results files get their own charts (every one its tables)


@dataclass
class Run:
    """One results file: its label, training step (-1: unknown), rows and scores."""

    path: Path
    step: int
    label: str
    rows: list[dict[str, Any]]
    scores: dict[str, Any]
    where: str = ""  # the path as the report shows it: relative to the report's directory

    def __post_init__(self) -> None:
        self.where = self.where or str(self.path)


def checkpoint_label(path: Path, rows: list[dict[str, Any]]) -> tuple[int, str]:
    """(step, label): the ``checkpoint_step`` the generator wrote into every sample, else the file's stem."""
    steps = {r.get("checkpoint_step") for r in rows if r.get("checkpoint_step") is not None}
    step = int(str(next(iter(steps)))) if len(steps) == 1 else -1
    return step, (f"step {step}" if step >= 0 else path.stem)


def distinct_labels(paths: list[Path], labels: list[str]) -> list[str]:
    """``labels`` with those that clash told apart by the fewest parent directories that do
    (run1/results.jsonl, run2/results.jsonl: ``run1/results``, ``run2/results``; ``step 5 (run1)``), else numbered."""
    out = list(labels)
    for label in sorted(set(labels)):
        same = [i for i, lb in enumerate(labels) if lb == label]
        if len(same) < 2:
            continue
        parents = [paths[i].resolve().parent.parts for i in same]
        for depth in range(1, max(len(p) for p in parents) + 1):
            tails = ["/".join(p[-depth:]) for p in parents]
            if len(set(tails)) == len(tails):
                for i, tail in zip(same, tails, strict=True):
                    out[i] = f"{tail}/{paths[i].stem}" if label == paths[i].stem else f"{label} ({tail})"
                break
    qualified = list(out)
    for i, lb in enumerate(qualified):
        if qualified.count(lb) > 1:  # the same file given twice
            out[i] = f"{lb} #{qualified[:i + 1].count(lb)}"
    return out


def load_runs(paths: list[Path], ks: list[int] | None, labels: list[str] | None = None) -> list[Run]:
    """Every results file read and scored, labelled, in step order (files without a step keep their place)."""
    if labels is not None:
        if len(labels) != len(paths):
            raise ValueError(f"--labels gives {len(labels)} label(s) for {len(paths)} results file(s): one per file")
        if len(set(labels)) != len(labels) or not all(labels):
            raise ValueError(f"--labels {','.join(labels)}: each label must be non-empty and different")
    runs = []
    for p in paths:
        rows = load_results(p)  # each (key, sample_index) once, duplicates logged
        if not rows:
            raise ValueError(f"{p}: no results")
        step, label = checkpoint_label(p, rows)
        runs.append(Run(p, step, label, rows, score(rows, ks)))
    names = labels if labels is not None else distinct_labels(paths, [r.label for r in runs])
    for run, name in zip(runs, names, strict=True):
        run.label = name
    return sorted(runs, key=lambda r: r.step)


def correlations(per_ckpt: list[dict[str, float]]) -> dict[tuple[str, str], float]:
    """Pearson r of every two benchmarks' values across checkpoints (3 checkpoints at least, neither constant)."""
    names = sorted(set.intersection(*(set(b) for b in per_ckpt))) if per_ckpt else []
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            x, y = np.array([c[a] for c in per_ckpt]), np.array([c[b] for c in per_ckpt])
            if len(x) >= 3 and x.std() > 0 and y.std() > 0:
                out[(a, b)] = float(np.corrcoef(x, y)[0, 1])
    return out


def _slug(i: int, label: str, what: str) -> str:
    return f"{i:02d}-{re.sub(r'[^A-Za-z0-9]+', '-', label).strip('-')}-{what}"


def _ci(row: dict[str, Any], k: int) -> tuple[float, float, float]:
    lo, hi = row["ci95"][k]
    return row["pass@k"][k], lo, hi


def passk_figure(i: int, run: Run) -> Figure | None:
    """Bars of pass@k (95% CI) per HumanEval-X language, their mean, and MBPP."""
    s = run.scores
    groups = {lang: v for lang, v in s.get(Kind.GENERATION, {}).items()}
    if len(groups) > 1:
        groups["overall"] = s[f"{Kind.GENERATION}_overall"]["mean_of_languages"]
    if Kind.GENERATION in s.get("mbpp", {}):
        groups["MBPP"] = s["mbpp"][Kind.GENERATION]
    if not groups:
        return None
    ks = sorted({k for v in groups.values() for k in v["pass@k"]})
    colours = {f"pass@{k}": charts.K_COLOURS[j % len(charts.K_COLOURS)] for j, k in enumerate(ks)}
    data = {g: {f"pass@{k}": _ci(v, k) for k in v["pass@k"]} for g, v in groups.items()}
    png = charts.bar_chart(f"pass@k by benchmark — {run.label}", data, colours,
                           xlabel="HumanEval-X language (overall: their mean), MBPP")
    return Figure(_slug(i, run.label, "passk"), f"pass@k (%) by benchmark, {run.label}; error bars: 95% CI", png)


def run_sections(i: int, run: Run, figures: bool) -> list[Section]:
    """One results file's tables (and charts): generation, example tests, MBPP, translation, incremental."""
    s, ks, explicit = run.scores, run.scores["ks"], run.scores["ks_explicit"]
    out = [Section(run.label, 2, [Text(f"{run.where}: {s['samples']} samples; statuses: " +
                                       ", ".join(f"{k} {v}" for k, v in s["statuses"].items()))])]
    for kind, title in ((Kind.GENERATION, "HumanEval-X"), (Kind.EXAMPLE, "HumanEval-X example tests")):
        if kind in s:
            named = list(s[kind].items())
            table = passk_table("language", named, overall_rows(s, kind, len(named)), ks, explicit)
            sec = Section(f"{kind} pass@k (%) — {title}", 3, [table])
            fig = passk_figure(i, run) if figures and kind == Kind.GENERATION else None
            out.append(sec)
            sec.blocks += [fig] if fig else []
    if "mbpp" in s:
        named = [("MBPP" if kind == Kind.GENERATION else f"MBPP {kind}", v) for kind, v in s["mbpp"].items()]
        out.append(Section("generation pass@k (%) — MBPP", 3, [passk_table("dataset", named, [], ks, explicit)]))
        if figures and Kind.GENERATION not in s and (fig := passk_figure(i, run)):
            out[-1].blocks.append(fig)
    if Kind.TRANSLATION in s:
        sec = Section("translation pass@1 (%) — rows: source language, columns: target language", 3,
                      [translation_table(s[Kind.TRANSLATION])])
        cells = [(src, tgt) for src, row in s[Kind.TRANSLATION].items() for tgt in row]
        sec.blocks.append(passk_table("directions", [], overall_rows(s, Kind.TRANSLATION, 2), ks, explicit,
                                      f"the mean of the {len(cells)} directions (each weighs the same) and of all "
                                      "their problems"))
        if figures:
            srcs, tgts = sorted({a for a, _ in cells}), sorted({b for _, b in cells})
            values = {(a, b): s[Kind.TRANSLATION][a][b]["pass@k"][1] for a, b in cells}
            png = charts.heatmap(f"translation pass@1 (%) — {run.label}", srcs, tgts, values)
            sec.blocks.append(Figure(_slug(i, run.label, "translation"), f"translation pass@1 (%), {run.label}: "
                                     "rows: source language, columns: target language", png))
        out.append(sec)
    if Kind.INCREMENTAL in s:
        out.append(Section("incremental pass@k (%) — micro: every (problem, prefix) prompt weighs the same; macro: "
                           "each problem's prompts averaged first", 3, [incremental_table(s, ks, explicit)]))
    return out


def across_sections(runs: list[Run]) -> list[Section]:
    """pass@1 across checkpoints (table and charts), pass@k of the headline benchmark over checkpoints, Pearson r."""
    labels = [r.label for r in runs]
    per = [benchmarks_of(r.scores) for r in runs]
    names = [n for n in per[0] if all(n in b for b in per)]
    steps = [r.step for r in runs]
    xs = steps if min(steps) >= 0 and len(set(steps)) == len(steps) else None
    sec = Section("pass@1 across checkpoints", 2, [across_table(labels, per, names)])
    main = [n for n in names if not n.startswith("transl")]
    fixed = {n: charts.LANGUAGE_COLOURS.get(n.removeprefix("HumanEval-X ").split(" ")[0], "") for n in main}
    fixed = {n: c for n, c in fixed.items() if c}
    fixed.update({n: charts.LANGUAGE_COLOURS["overall"] for n in names if "overall" in n or "mean of" in n})
    bands = {n: ([b[n]["ci95"][1][0] for b in per], [b[n]["ci95"][1][1] for b in per]) for n in main if "overall" in n}
    for title, group, what in (("pass@1 over checkpoints", main, "over-checkpoints"),
                               ("translation pass@1 over checkpoints", [n for n in names if n.startswith("transl")],
                                "translation-over-checkpoints")):
        if group:
            png = charts.line_chart(title, labels, {n: [b[n]["pass@k"][1] for b in per] for n in group},
                                    charts.series_styles(group, fixed), xs, bands)
            sec.blocks.append(Figure(what, f"{title}; shaded: 95% CI of the overall rows", png))
    head = next((n for n in (f"HumanEval-X {OVERALL_MACRO}", *main) if n in names), "")
    if head:
        ks = [k for k in per[0][head]["pass@k"] if all(k in b[head]["pass@k"] for b in per)]
        series = {f"pass@{k}": [b[head]["pass@k"][k] for b in per] for k in ks}
        png = charts.line_chart(f"{head}: pass@k over checkpoints", labels, series, charts.series_styles(list(series)),
                                xs, {f"pass@{k}": ([b[head]["ci95"][k][0] for b in per],
                                                   [b[head]["ci95"][k][1] for b in per]) for k in ks}, "pass@k (%)")
        sec.blocks.append(Figure("passk-over-checkpoints", f"{head}: pass@k over checkpoints; shaded: 95% CI", png))
    if len(runs) <= 12 and main:
        colours = charts.checkpoint_colours(labels)
        data = {n: {r.label: _ci(b[n], 1) for r, b in zip(runs, per, strict=True)} for n in main}
        png = charts.bar_chart("pass@1 by benchmark and checkpoint", data, colours, "pass@1 (%)")
        sec.blocks.append(Figure("checkpoints-bars", "pass@1 (%) by benchmark, one colour per checkpoint; error "
                                 "bars: 95% CI", png))
    measured = [n for n in names if "overall" not in n and "mean of" not in n]  # not the averages of the others
    corr = correlations([{n: b[n]["pass@k"][1] for n in measured} for b in per])
    blocks: list[Text | Table | Figure] = [correlation_table(corr)] if corr else [Text("(needs 3+ checkpoints)")]
    return [sec, Section("Pearson correlation of pass@1 between benchmarks across checkpoints", 2, blocks)]


def budget_sections(run: Run, budget: int) -> list[Section]:
    """CodeGeeX's multilingual budget allocation on the last results file."""
    title = f"Multilingual budget allocation ({budget} samples per problem)"
    try:
        alloc = budget_allocation(run.rows, budget)
    except ValueError as exc:
        return [Section(title, 2, [Text(str(exc))])]
    return [Section(title, 2, [Text(f"{run.label}: the share of HumanEval-X problems solved in at least one language "
                                    f"when {budget} samples per problem are spread over the languages."),
                               budget_table(alloc)])]


def sections_of(runs: list[Run], budget: int) -> list[Section]:
    """The whole report after its title: the inputs, the statuses, the comparison, then each file's tables."""
    s = runs[-1].scores
    ks = ", ".join(map(str, s["ks"])) + ("" if s["ks_explicit"] else " (the default)")
    intro = Section("Inputs", 2, [
        Text(f"pass@k in %, the unbiased estimator of Chen et al. (2021); in brackets its 95% confidence interval, "
             f"the percentile bootstrap over problems ({s['ci']['resamples']} resamples, seed {s['ci']['seed']}). "
             f"k: {ks}, and each row's n (samples per problem); '-' where a row has fewer samples than k. "
             f"{OVERALL_MACRO}: each language weighs the same, as the CodeGeeX paper averages; {'overall (all problems)'}"
             ": each problem weighs the same. Each dataset (HumanEval-X, MBPP) has its own rows."),
        Table(["label", "results file (from this report's directory)", "checkpoint step", "samples"],
              [[r.label, r.where, str(r.step) if r.step >= 0 else "-", str(r.scores["samples"])] for r in runs])])
    statuses = Section("Statuses", 2, [statuses_table([r.label for r in runs], [r.scores for r in runs]),
                                       Figure("statuses", "samples by status, one bar per results file",
                                              charts.status_chart([r.label for r in runs],
                                                                  [r.scores["statuses"] for r in runs]))])
    out = [intro, statuses]
    if len(runs) > 1:
        out += across_sections(runs)
    if budget:
        out += budget_sections(runs[-1], budget)
    for i, run in enumerate(runs):
        out += run_sections(i, run, figures=i >= len(runs) - FIGURED_RUNS)
    return out


def render(sections: list[Section], title: str) -> tuple[str, str]:
    """(Markdown, HTML) from the templates."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=jinja2.select_autoescape(["html"]),
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["mdcell"] = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
    for i, sec in enumerate(sections):
        sec.anchor = f"s{i}-" + re.sub(r"[^a-z0-9]+", "-", sec.title.lower()).strip("-")[:40]
    context = {"title": title, "sections": sections}
    return env.get_template("report.md.j2").render(context), env.get_template("report.html.j2").render(context)


def write_report(paths: list[Path], out: Path, ks: list[int] | None = None, budget: int = 0,
                 labels: list[str] | None = None) -> tuple[Path, Path]:
    """report.md, report.html, scores.json (label -> :func:`~eval_harness.scoring.score`) and figures/ under ``out``;
    ``ks`` None: 1, 10, 100 and each row's n; ``labels``: one per file (else from steps or file names)."""
    runs = load_runs(paths, ks, labels)
    for run in runs:
        run.where = os.path.relpath(run.path, out)
    sections = sections_of(runs, budget)
    md, page = render(sections, "Evaluation report")
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    figs = [b for s in sections for b in s.blocks if isinstance(b, Figure)]
    for stale in set(figdir.glob("*.png")) - {out / f.path for f in figs}:
        stale.unlink()
    for f in figs:
        (out / f.path).write_bytes(f.png)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(page)
    (out / "scores.json").write_text(json.dumps({r.label: r.scores for r in runs}, indent=1, default=str) + "\n")
    log.info("report of %d results file(s): %s (%d figures)", len(runs), out, len(figs))
    return out / "report.md", out / "report.html"
