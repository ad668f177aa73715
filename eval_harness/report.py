"""Reports: Markdown and one self-contained HTML page (inline SVG plots, no external files) for one or more results
files. Several files are compared side by side (e.g. checkpoints of one run): pass@k over training steps and the
Pearson correlation of pass@1 between benchmarks across checkpoints (PanGu-Coder's Table 4)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from eval_harness.samples import load_results
from eval_harness.scoring import budget_allocation, score
from eval_harness.tasks import Kind

COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1"]


def checkpoint_label(path: Path, rows: list[dict[str, Any]]) -> tuple[int, str]:
    """(step, label): the ``checkpoint_step`` the generator wrote into every sample, else the file's position."""
    steps = {r.get("checkpoint_step") for r in rows if r.get("checkpoint_step") is not None}
    step = int(str(next(iter(steps)))) if len(steps) == 1 else -1
    return step, (f"step {step}" if step >= 0 else path.stem)


def benchmarks_of(scores: dict[str, Any]) -> dict[str, float]:
    """pass@1 of every benchmark in one scores dict: generation per language, translation per pair."""
    out = {f"HumanEval-X {lang}": v["pass@k"].get(1, np.nan)
           for lang, v in scores.get(Kind.GENERATION, {}).items()}
    for src, row in scores.get(Kind.TRANSLATION, {}).items():
        out.update({f"translate {src}->{tgt}": v.get(1, np.nan) for tgt, v in row.items()})
    return out


def correlations(per_ckpt: list[dict[str, float]]) -> dict[tuple[str, str], float]:
    names = sorted(set.intersection(*(set(b) for b in per_ckpt))) if per_ckpt else []
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            x, y = np.array([c[a] for c in per_ckpt]), np.array([c[b] for c in per_ckpt])
            if len(x) >= 3 and x.std() > 0 and y.std() > 0:
                out[(a, b)] = float(np.corrcoef(x, y)[0, 1])
    return out


def svg_bars(title: str, groups: dict[str, dict[str, float]], percent: bool = True) -> str:
    """Grouped bars: groups (x labels) -> series -> value."""
    series = sorted({s for g in groups.values() for s in g})
    w, h, pad = max(320, 90 * len(groups) * max(1, len(series)) // 2), 220, 40
    vmax = max([v for g in groups.values() for v in g.values()] + [1e-9]) if not percent else 1.0
    bw = (w - 2 * pad) / max(1, len(groups)) / (len(series) + 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 40}" role="img">',
             f'<text x="{pad}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{pad}" y1="{h}" x2="{w - pad}" y2="{h}" stroke="#333"/>']
    for gi, (label, vals) in enumerate(groups.items()):
        x0 = pad + gi * bw * (len(series) + 1)
        for si, s in enumerate(series):
            v = vals.get(s, 0.0)
            bh = (h - 40) * (v / vmax)
            parts.append(f'<rect x="{x0 + si * bw:.1f}" y="{h - bh:.1f}" width="{bw * 0.9:.1f}" height="{bh:.1f}" '
                         f'fill="{COLORS[si % len(COLORS)]}"><title>{html.escape(f"{label} {s}: {v:.3g}")}</title></rect>')
        parts.append(f'<text x="{x0:.1f}" y="{h + 14}" font-size="11">{html.escape(label)}</text>')
    for si, s in enumerate(series):
        parts.append(f'<rect x="{pad + 110 * si}" y="{h + 24}" width="10" height="10" fill="{COLORS[si % len(COLORS)]}"/>'
                     f'<text x="{pad + 14 + 110 * si}" y="{h + 33}" font-size="11">{html.escape(s)}</text>')
    return "".join(parts) + "</svg>"


def svg_heatmap(title: str, matrix: dict[str, dict[str, float]]) -> str:
    langs = sorted(set(matrix) | {t for row in matrix.values() for t in row})
    cell, pad = 56, 70
    size = pad + cell * len(langs) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size + 20}" role="img">',
             f'<text x="4" y="14" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    for i, src in enumerate(langs):
        parts.append(f'<text x="4" y="{pad + cell * i + cell / 2 + 4}" font-size="11">{src}</text>')
        parts.append(f'<text x="{pad + cell * i + 8}" y="{pad - 6}" font-size="11">{src}</text>')
        for j, tgt in enumerate(langs):
            v = matrix.get(src, {}).get(tgt)
            shade = "#eee" if v is None else f"rgb({int(255 - 180 * v)},{int(255 - 90 * v)},{int(255 - 180 * v)})"
            text = "" if v is None else f"{v:.0%}"
            parts.append(f'<rect x="{pad + cell * j}" y="{pad + cell * i}" width="{cell - 2}" height="{cell - 2}" '
                         f'fill="{shade}"/><text x="{pad + cell * j + 12}" y="{pad + cell * i + cell / 2 + 4}" '
                         f'font-size="12">{text}</text>')
    parts.append(f'<text x="{pad}" y="{size + 14}" font-size="11">rows: source language, columns: target</text>')
    return "".join(parts) + "</svg>"


def svg_lines(title: str, steps: list[int], series: dict[str, list[float]]) -> str:
    w, h, pad = 520, 240, 40
    xs = steps if len(set(steps)) == len(steps) and min(steps) >= 0 else list(range(len(steps)))
    x_min, x_max = min(xs), max(max(xs), min(xs) + 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 30}" role="img">',
             f'<text x="{pad}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    for si, (name, ys) in enumerate(series.items()):
        pts = " ".join(f"{pad + (w - 2 * pad) * (x - x_min) / (x_max - x_min):.1f},{h - (h - 40) * y:.1f}"
                       for x, y in zip(xs, ys, strict=True) if not np.isnan(y))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{COLORS[si % len(COLORS)]}" stroke-width="2">'
                     f"<title>{html.escape(name)}</title></polyline>")
        parts.append(f'<text x="{pad + 130 * (si % 4)}" y="{h + 14 + 12 * (si // 4)}" font-size="11" '
                     f'fill="{COLORS[si % len(COLORS)]}">{html.escape(name)}</text>')
    return "".join(parts) + "</svg>"


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}"


def markdown(labels: list[str], scores: list[dict[str, Any]], ks: list[int], extra: list[str]) -> str:
    lines = ["# Evaluation report", ""]
    for label, s in zip(labels, scores, strict=True):
        lines += [f"## {label}", "", f"{s['samples']} samples; statuses: " +
                  ", ".join(f"{k} {v}" for k, v in sorted(s["statuses"].items())), ""]
        for kind in (Kind.GENERATION, Kind.EXAMPLE):
            if kind in s:
                lines += [f"### {kind} pass@k (%)", "", "| language | problems | samples | " +
                          " | ".join(f"pass@{k}" for k in ks) + " |", "|---|---|---|" + "---|" * len(ks)]
                lines += [f"| {lang} | {v['problems']} | {v['samples']} | " +
                          " | ".join(_pct(v["pass@k"].get(k)) for k in ks) + " |" for lang, v in s[kind].items()]
                lines.append("")
        if Kind.TRANSLATION in s:
            tgts = sorted({t for row in s[Kind.TRANSLATION].values() for t in row})
            lines += ["### translation pass@1 (%), rows: source, columns: target", "",
                      "| source \\ target | " + " | ".join(tgts) + " |", "|---|" + "---|" * len(tgts)]
            lines += [f"| {src} | " + " | ".join(_pct(row.get(t, {}).get(1)) for t in tgts) + " |"
                      for src, row in s[Kind.TRANSLATION].items()]
            lines.append("")
        if Kind.INCREMENTAL in s:
            lines += ["### incremental pass@k (%) — micro: every (problem, prefix) prompt weighs the same; macro: "
                      "each problem's prompts averaged first", ""]
            lines += [f"- {lang}: micro " + ", ".join(f"pass@{k} {_pct(v)}" for k, v in inc["micro"].items()) +
                      "; macro " + ", ".join(f"pass@{k} {_pct(v)}" for k, v in inc["macro"].items())
                      for lang, inc in s[Kind.INCREMENTAL].items()]
            lines.append("")
    return "\n".join(lines + extra) + "\n"


def write_report(paths: list[Path], out: Path, ks: list[int], budget: int = 0) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for p in paths:
        rows = load_results(p)  # each (key, sample_index) once, duplicates logged
        if not rows:
            raise ValueError(f"{p}: no results")
        runs.append((checkpoint_label(p, rows), score(rows, ks), rows))
    runs.sort(key=lambda r: r[0][0])
    labels, scores = [r[0][1] for r in runs], [r[1] for r in runs]
    extra: list[str] = []
    figures: list[str] = []
    last = scores[-1]
    if Kind.GENERATION in last:
        figures.append(svg_bars(f"pass@k by language — {labels[-1]}",
                                {lang: {f"pass@{k}": v for k, v in val["pass@k"].items()}
                                 for lang, val in last[Kind.GENERATION].items()}))
    if Kind.TRANSLATION in last:
        figures.append(svg_heatmap(f"translation pass@1 — {labels[-1]}",
                                   {s: {t: v.get(1, 0.0) for t, v in row.items()} for s, row in last[Kind.TRANSLATION].items()}))
    figures.append(svg_bars("outcomes", {labels[-1]: {k: float(v) for k, v in last["statuses"].items()}}, percent=False))
    if len(runs) > 1:
        per = [benchmarks_of(s) for s in scores]
        names = sorted(set.intersection(*(set(b) for b in per)))
        figures.append(svg_lines("pass@1 over checkpoints", [r[0][0] for r in runs], {n: [b[n] for b in per] for n in names}))
        corr = correlations(per)
        extra += ["## pass@1 across checkpoints", "", "| benchmark | " + " | ".join(labels) + " |",
                  "|---|" + "---|" * len(labels)]
        extra += [f"| {n} | " + " | ".join(_pct(b[n]) for b in per) + " |" for n in names]
        extra += ["", "## Pearson correlation of pass@1 between benchmarks across checkpoints", ""]
        extra += [f"- {a} vs {b}: {r:+.3f}" for (a, b), r in sorted(corr.items())] or ["- (needs 3+ checkpoints)"]
        extra.append("")
    if budget:
        alloc = budget_allocation(runs[-1][2], budget)
        extra += [f"## Multilingual budget allocation ({budget} samples per problem)", "",
                  f"- best single language ({alloc['best_single']['language']}): {_pct(alloc['best_single']['solved'])}% "
                  "of problems solved", f"- uniform {alloc['uniform']['allocation']}: {_pct(alloc['uniform']['solved'])}%",
                  f"- weighted by pass rate {alloc['weighted']['allocation']}: {_pct(alloc['weighted']['solved'])}%", ""]
    md = markdown(labels, scores, ks, extra)
    (out / "report.md").write_text(md)
    (out / "scores.json").write_text(json.dumps({lb: s for lb, s in zip(labels, scores, strict=True)}, indent=1,
                                                default=str) + "\n")
    body = re.sub(r"^(#+) (.*)$", lambda m: f"<h{len(m[1])}>{html.escape(m[2])}</h{len(m[1])}>", html.escape(md, quote=False),
                  flags=re.M)
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>Evaluation report</title><style>body{font-family:"
            "sans-serif;max-width:1100px;margin:2em auto}pre{white-space:pre-wrap}</style></head><body>"
            + "".join(f"<figure>{f}</figure>" for f in figures) + f"<pre>{body}</pre></body></html>\n")
    (out / "report.html").write_text(page)
    return out / "report.md", out / "report.html"
