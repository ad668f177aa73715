"""The report's charts: matplotlib figures rendered by the Agg canvas (no display, no pyplot state) to PNG bytes.

Colours are fixed so that every report reads the same: one colour per status (:data:`STATUS_COLOURS`), per language
(:data:`LANGUAGE_COLOURS`) and per checkpoint (:func:`checkpoint_colours`: from the label's CRC32, so the same label
has the same colour in every report). A chart with many lines gives each its own colour, marker and line style
(:func:`series_styles`). Legends are placed in the figure (constrained layout), never cut off. matplotlib is imported
inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Sequence
from typing import Any

STATUS_COLOURS = {"passed": "#2ca02c", "failed": "#d62728", "timeout": "#ff7f0e", "compile_error": "#9467bd",
                  "runtime_error": "#8c564b", "sandbox_violation": "#e377c2"}
OTHER_STATUS_COLOUR = "#7f7f7f"  # a status this table does not know
LANGUAGE_COLOURS = {"python": "#1f77b4", "cpp": "#ff7f0e", "java": "#8c564b", "js": "#bcbd22", "go": "#17becf",
                    "rust": "#e377c2", "MBPP": "#9467bd", "overall": "#000000"}
# matplotlib's tab20, the dark shade of each hue first: 20 distinct colours
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
           "#dbdb8d", "#9edae5")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")
LINESTYLES = ("-", "--", "-.", ":")
K_COLOURS = ("#08519c", "#3182bd", "#6baed6", "#9ecae1", "#c6dbef")  # pass@k columns, small k darkest


def status_colour(status: str) -> str:
    """The fixed colour of a status."""
    return STATUS_COLOURS.get(status, OTHER_STATUS_COLOUR)


def checkpoint_colours(labels: Sequence[str]) -> dict[str, str]:
    """Each checkpoint's colour: PALETTE[crc32(label) % 20], the next free one only where two labels of this report
    would share it."""
    out: dict[str, str] = {}
    for label in labels:
        i = zlib.crc32(label.encode()) % len(PALETTE)
        for step in range(len(PALETTE)):
            if PALETTE[(i + step) % len(PALETTE)] not in out.values():
                i = (i + step) % len(PALETTE)
                break
        out[label] = PALETTE[i]
    return out


def series_styles(names: Sequence[str], fixed: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """A colour, marker and line style per series: ``fixed`` colours where given, the others from PALETTE in order
    (skipping the fixed ones while colours last); markers cycle too, and the line style changes each time the colours
    run out, so no two of up to 80 series share colour and line style."""
    fixed = fixed or {}
    taken = {fixed[n] for n in names if n in fixed}
    free = [c for c in PALETTE if c not in taken] or list(PALETTE)
    out, j = {}, 0
    for i, name in enumerate(names):
        if name in fixed:
            colour = fixed[name]
        else:
            colour, j = free[j % len(free)], j + 1
        out[name] = {"color": colour, "marker": MARKERS[i % len(MARKERS)],
                     "linestyle": LINESTYLES[(i // len(PALETTE)) % len(LINESTYLES)]}
    return out


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def bar_chart(title: str, groups: dict[str, dict[str, tuple[float, float, float]]], colours: dict[str, str],
              ylabel: str = "pass@k (%)", xlabel: str = "") -> bytes:
    """Grouped bars: group (x label) -> series -> (value, ci low, ci high) as fractions, drawn in %, each bar with
    its value on top and its interval as an error bar; series absent from a group leave a gap."""
    series = list(colours)
    bars = len(groups) * len(series)
    fig = _figure(min(16.0, max(6.5, 0.42 * bars + 2.5)), 4.6)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    for si, name in enumerate(series):
        xs = [gi + (si - (len(series) - 1) / 2) * width for gi, g in enumerate(groups.values()) if name in g]
        vals = [g[name] for g in groups.values() if name in g]
        if not xs:
            continue
        ys = [100 * v for v, _, _ in vals]
        err = [[max(0.0, 100 * (v - lo)) for v, lo, _ in vals], [max(0.0, 100 * (hi - v)) for v, _, hi in vals]]
        ax.bar(xs, ys, width * 0.92, color=colours[name], label=name, yerr=err, capsize=2,
               error_kw={"elinewidth": 0.8, "ecolor": "#333333"})
        for x, y, (_, _, hi) in zip(xs, ys, vals, strict=True):  # the value above its interval, clear of the cap
            ax.text(x, max(y, 100 * hi) + 1.5, f"{y:.1f}", ha="center", va="bottom", fontsize=7,
                    rotation=90 if len(series) > 3 else 0)
    ax.set_xticks(range(len(groups)), list(groups), rotation=30 if len(groups) > 6 else 0,
                  ha="right" if len(groups) > 6 else "center")
    ax.set_ylim(0, 118 if len(series) > 3 else 110)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8, title="error bars:\n95% CI", title_fontsize=7)
    return _png(fig)


def status_chart(labels: Sequence[str], counts: Sequence[dict[str, int]]) -> bytes:
    """One horizontal bar per results file, split by status in the fixed status colours, counts on the segments."""
    statuses = [s for s in STATUS_COLOURS if any(s in c for c in counts)]
    statuses += sorted({s for c in counts for s in c} - set(statuses))
    fig = _figure(10.0, 1.6 + 0.45 * len(labels))
    ax = fig.add_subplot()
    left = [0.0] * len(labels)
    for status in statuses:
        widths = [float(c.get(status, 0)) for c in counts]
        rects = ax.barh(list(labels), widths, left=left, color=status_colour(status), label=status)
        total = [sum(c.values()) or 1 for c in counts]
        ax.bar_label(rects, labels=[f"{int(w)}" if w / t > 0.04 else "" for w, t in zip(widths, total, strict=True)],
                     label_type="center", fontsize=8, color="white")
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("samples")
    ax.set_title("outcomes of the samples, by status")
    ax.set_xlim(0, max(left + [1.0]))
    fig.legend(loc="outside lower center", ncols=min(len(statuses), 6), fontsize=8)
    return _png(fig)


def heatmap(title: str, rows: Sequence[str], cols: Sequence[str], values: dict[tuple[str, str], float]) -> bytes:
    """Rows x columns of fractions in %, each cell with its value, a colour bar; absent cells blank."""
    import numpy as np

    grid = np.array([[100 * values.get((r, c), math.nan) for c in cols] for r in rows])
    fig = _figure(0.95 * len(cols) + 2.8, 0.75 * len(rows) + 1.6)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="Greens", vmin=0, vmax=100)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=9,
                        color="white" if grid[i, j] > 60 else "black")
    ax.set_xticks(range(len(cols)), list(cols))
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_xlabel("target language")
    ax.set_ylabel("source language")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="pass@1 (%)", shrink=0.9)
    fig.supxlabel("rows: source language, columns: target language", fontsize=9, color="#444444")
    return _png(fig)


def line_chart(title: str, x_labels: Sequence[str], series: dict[str, list[float]],
               styles: dict[str, dict[str, str]], steps: Sequence[int] | None = None,
               bands: dict[str, tuple[list[float], list[float]]] | None = None, ylabel: str = "pass@1 (%)") -> bytes:
    """Lines over checkpoints (fractions drawn in %): x at the training steps where each file has its own, else
    evenly spaced, ticks labelled with the checkpoints' labels; optional bands (95% CI); the legend right of the
    axes, inside the figure."""
    xs = list(steps) if steps is not None else list(range(len(x_labels)))
    legend_cols = 1 if len(series) <= 14 else 2
    fig = _figure(min(16.0, max(6.0, 0.5 * len(xs) + 4.0) + 2.6 * legend_cols), 4.8)
    ax = fig.add_subplot()
    for name, ys in series.items():
        st = styles[name]
        ax.plot(xs, [100 * y for y in ys], label=name, color=st["color"], marker=st["marker"],
                linestyle=st["linestyle"], markersize=5, linewidth=1.5)
        if bands and name in bands:
            lo, hi = bands[name]
            ax.fill_between(xs, [100 * v for v in lo], [100 * v for v in hi], color=st["color"], alpha=0.12)
    rotate = len(xs) > 5 or max((len(x) for x in x_labels), default=0) > 10
    ax.set_xticks(xs, list(x_labels), rotation=35 if rotate else 0, ha="right" if rotate else "center")
    ax.set_xlabel("training step" if steps is not None else "results file")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.legend(loc="outside right upper", fontsize=8, ncols=legend_cols)
    return _png(fig)
