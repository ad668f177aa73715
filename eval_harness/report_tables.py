"""What a report is made of (sections of text, tables and figures, rendered by the templates in
eval_harness/templates/ to Markdown and HTML) and the tables built from the scores of :func:`~eval_harness.scoring.score`.

Cells are percentages with one decimal; a pass@k cell carries its 95 % bootstrap interval, ``12.3 [9.1, 15.6]``;
``-`` where the row has fewer samples per problem than k (only in a column the user asked for, or that another row
of the table has)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from eval_harness.report_charts import STATUS_COLOURS
from eval_harness.tasks import Kind

OVERALL_MACRO = "overall (mean of languages)"
OVERALL_MICRO = "overall (all problems)"


@dataclass
class Text:
    """A paragraph."""

    text: str
    kind: ClassVar[str] = "text"


@dataclass
class Table:
    """A table: the first cell of each row heads it."""

    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    kind: ClassVar[str] = "table"


@dataclass
class Figure:
    """A chart: its PNG, written as ``figures/<name>.png`` and embedded in the HTML."""

    name: str
    caption: str
    png: bytes
    kind: ClassVar[str] = "figure"

    @property
    def path(self) -> str:
        """Where the PNG is, relative to the report's directory."""
        return f"figures/{self.name}.png"

    @property
    def data_uri(self) -> str:
        """The PNG as a data: URI, for the HTML page."""
        return "data:image/png;base64," + base64.b64encode(self.png).decode()


@dataclass
class Section:
    """A heading (level 2 or 3) and what follows it."""

    title: str
    level: int = 2
    blocks: list[Text | Table | Figure] = field(default_factory=list)
    anchor: str = ""


def pct(v: float | None) -> str:
    """A fraction as a percentage with one decimal; ``-`` for none."""
    return "-" if v is None else f"{100 * v:.1f}"


def cell(scores: dict[str, Any], k: int) -> str:
    """``12.3 [9.1, 15.6]`` for pass@k with its interval, ``-`` where the row has no pass@k at this k."""
    v = scores["pass@k"].get(k)
    if v is None:
        return "-"
    lo, hi = scores["ci95"][k]
    return f"{pct(v)} [{pct(lo)}, {pct(hi)}]"


def columns(rows: Sequence[dict[str, Any]], ks: Sequence[int], explicit: bool) -> list[int]:
    """The k columns of a table: the asked ks (by default only those some row's n reaches) and each row's n."""
    ns = {int(r["n"]) for r in rows}
    asked = set(ks) if explicit else {k for k in ks if k <= max(ns)}
    return sorted(asked | ns)


def n_cell(r: dict[str, Any]) -> str:
    """A row's samples per problem: ``5``, or ``3-5`` where its problems have different counts."""
    return str(r["n"]) if r["n"] == r["n_max"] else f"{r['n']}-{r['n_max']}"


def passk_table(head: str, named: list[tuple[str, dict[str, Any]]], overall: list[tuple[str, dict[str, Any]]],
                ks: Sequence[int], explicit: bool, caption: str = "") -> Table:
    """Rows of pass@k (with intervals) and their overall rows."""
    cols = columns([r for _, r in named + overall], ks, explicit)
    rows = [[name, str(r["problems"]), str(r["samples"]), n_cell(r), *(cell(r, k) for k in cols)]
            for name, r in named + overall]
    if any(r["n"] != r["n_max"] for _, r in named):
        caption += (" n: samples per problem; a range where problems have different counts, pass@k then up to the "
                    "smallest.")
    return Table([head, "problems", "samples", "n", *(f"pass@{k}" for k in cols)], rows, caption.strip())


def overall_rows(scores: dict[str, Any], kind: str, count: int) -> list[tuple[str, dict[str, Any]]]:
    """The overall rows of a table of ``count`` rows: none for one row (they would repeat it)."""
    ov = scores.get(f"{kind}_overall")
    if not ov or count < 2:
        return []
    macro = next(key for key in ov if key.startswith("mean_of_"))
    name = OVERALL_MACRO if macro == "mean_of_languages" else "overall (mean of directions)"
    return [(name, ov[macro]), (OVERALL_MICRO, ov["all_problems"])]


def translation_table(matrix: dict[str, dict[str, Any]]) -> Table:
    """pass@1 (interval) per direction: rows source, columns target."""
    tgts = sorted({t for row in matrix.values() for t in row})
    rows = [[src, *(cell(row[t], 1) if t in row else "" for t in tgts)] for src, row in matrix.items()]
    return Table(["source \\ target", *tgts], rows)


def incremental_table(scores: dict[str, Any], ks: Sequence[int], explicit: bool) -> Table:
    """Micro and macro incremental pass@k per language, and their mean over languages."""
    inc = scores[Kind.INCREMENTAL]
    cols = columns(list(inc.values()), ks, explicit)
    rows = [[lang, str(r["problems"]), str(r["prompts"]), str(r["samples"]), n_cell(r),
             *(cell(r[avg], k) for avg in ("micro", "macro") for k in cols)] for lang, r in inc.items()]
    if len(inc) > 1:
        ov = scores[f"{Kind.INCREMENTAL}_overall"]["mean_of_languages"]
        rows.append([OVERALL_MACRO, "", "", "", "", *(cell(ov[avg], k) for avg in ("micro", "macro") for k in cols)])
    return Table(["language", "problems", "prompts", "samples", "n",
                  *(f"{avg} pass@{k}" for avg in ("micro", "macro") for k in cols)], rows)


def statuses_table(labels: Sequence[str], scores: Sequence[dict[str, Any]]) -> Table:
    """Samples per status (and their share) for each results file."""
    known = [s for s in STATUS_COLOURS if any(s in sc["statuses"] for sc in scores)]
    statuses = known + sorted({s for sc in scores for s in sc["statuses"]} - set(known))
    rows = [[st, *(f"{sc['statuses'].get(st, 0)} ({100 * sc['statuses'].get(st, 0) / max(1, sc['samples']):.1f}%)"
                   for sc in scores)] for st in statuses]
    rows.append(["all", *(str(sc["samples"]) for sc in scores)])
    return Table(["status", *labels], rows)


def benchmarks_of(scores: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every benchmark row of one scores dict by name: HumanEval-X per language and overall, MBPP, translation per
    direction and overall."""
    out = {f"HumanEval-X {lang}": v for lang, v in scores.get(Kind.GENERATION, {}).items()}
    if len(out) > 1:
        out[f"HumanEval-X {OVERALL_MACRO}"] = scores[f"{Kind.GENERATION}_overall"]["mean_of_languages"]
    if Kind.GENERATION in scores.get("mbpp", {}):
        out["MBPP"] = scores["mbpp"][Kind.GENERATION]
    for src, row in scores.get(Kind.TRANSLATION, {}).items():
        out.update({f"translate {src}->{tgt}": v for tgt, v in row.items()})
    if Kind.TRANSLATION in scores:
        out["translation (mean of directions)"] = scores[f"{Kind.TRANSLATION}_overall"]["mean_of_pairs"]
    return out


def across_table(labels: Sequence[str], per: Sequence[dict[str, dict[str, Any]]], names: Sequence[str]) -> Table:
    """pass@1 (interval) of each benchmark in each results file."""
    return Table(["benchmark", *labels], [[n, *(cell(b[n], 1) for b in per)] for n in names])


def correlation_table(corr: dict[tuple[str, str], float]) -> Table:
    """Pearson r of pass@1 between two benchmarks across checkpoints."""
    return Table(["benchmark", "benchmark", "Pearson r"], [[a, b, f"{r:+.3f}"] for (a, b), r in sorted(corr.items())])


def budget_table(alloc: dict[str, Any]) -> Table:
    """The budget allocation's strategies and the share of problems each solves."""
    best = alloc["best_single"]
    rows = [[f"best single language ({best['language']})", f"{best['language']}: {alloc['budget']}",
             pct(best["solved"])],
            ["uniform", ", ".join(f"{k}: {v}" for k, v in alloc["uniform"]["allocation"].items()),
             pct(alloc["uniform"]["solved"])],
            ["weighted by pass rate", ", ".join(f"{k}: {v}" for k, v in alloc["weighted"]["allocation"].items()),
             pct(alloc["weighted"]["solved"])]]
    rows += [[f"{lang} alone", f"{lang}: {alloc['budget']}", pct(v)] for lang, v in alloc["single"].items()]
    return Table(["strategy", "samples per problem", "problems solved (%)"], rows)
