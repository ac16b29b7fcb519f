"""The report's charts, drawn with matplotlib's Agg canvas straight to PNG bytes.

`matplotlib.figure.Figure` + `FigureCanvasAgg` is used instead of pyplot: no global figure
state and no backend switch, so the report is safe to build inside another program.
Every function takes plain numbers (None = missing, drawn as nothing) and returns PNG bytes.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

TEACHER_COLOR = "#4d4d4d"
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
DPI = 110
WIDTH_IN = 9.6


def model_colors(labels: Sequence[str], reference: Optional[str]) -> dict[str, str]:
    """One colour per model, the same in every chart; the teacher is dark grey."""
    colors, i = {}, 0
    for label in labels:
        if label == reference:
            colors[label] = TEACHER_COLOR
        else:
            colors[label] = _PALETTE[i % len(_PALETTE)]
            i += 1
    return colors


@dataclass
class Series:
    label: str
    values: list[Optional[float]]  # one per group
    color: str


@dataclass
class BarPanel:
    title: str
    groups: list[str]
    series: list[Series]
    ylabel: str
    hline: Optional[float] = None  # e.g. 100 % of the teacher
    value_format: str = "{:.1f}"


@dataclass
class Point:
    label: str
    x: float
    y: float
    color: str


@dataclass
class ScatterPanel:
    xlabel: str
    points: list[Point]
    log_x: bool = False
    x_is_count: bool = False  # format ticks as 12M / 1.1B


@dataclass
class LinePanel:
    title: str
    xlabel: str
    ylabel: str
    lines: list[tuple[str, list[float], list[float], dict]] = field(default_factory=list)  # (label, x, y, style)
    hlines: list[tuple[str, float, dict]] = field(default_factory=list)


def _figure(n_panels: int, ncols: int, row_height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(WIDTH_IN, row_height * nrows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _style(ax) -> None:
    ax.grid(axis="y", color="#e3e6eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=9)


def grouped_bars(panels: list[BarPanel], *, ncols: int = 2, row_height: float = 3.6) -> bytes:
    """Grouped bar charts: per panel, one cluster per group and one bar per series, values written on the bars."""
    ncols = min(ncols, len(panels))
    fig, axes = _figure(len(panels), ncols, row_height)
    for ax, panel in zip(axes, panels):
        n = max(len(panel.series), 1)
        width = 0.8 / n
        for i, series in enumerate(panel.series):
            xs = [g + (i - (n - 1) / 2) * width for g in range(len(panel.groups))]
            heights = [math.nan if v is None else v for v in series.values]
            bars = ax.bar(xs, heights, width * 0.92, label=series.label, color=series.color)
            labels = ["" if v is None else panel.value_format.format(v) for v in series.values]
            ax.bar_label(bars, labels=labels, fontsize=7, padding=1.5, rotation=90 if n * len(panel.groups) > 12 else 0)
        if panel.hline is not None:
            ax.axhline(panel.hline, color="#444", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(panel.groups)), panel.groups)
        ax.set_title(panel.title, fontsize=10.5)
        ax.set_ylabel(panel.ylabel, fontsize=9)
        ax.margins(y=0.18)
        values = [v for s in panel.series for v in s.values if v is not None] + ([panel.hline] if panel.hline is not None else [])
        if values and min(values) >= 0:
            ax.set_ylim(bottom=0)
        _style(ax)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=9, frameon=False)
    return _png(fig)


def pareto_front(points: list[Point], *, higher_is_better: bool) -> list[Point]:
    """Points no other point beats on both axes (smaller x, better y), sorted by x."""
    def better_or_equal(a: Point, b: Point) -> bool:  # a at least as good as b on both axes
        return a.x <= b.x and (a.y >= b.y if higher_is_better else a.y <= b.y)

    front = [p for p in points
             if not any(better_or_equal(q, p) and (q.x, q.y) != (p.x, p.y) for q in points)]
    return sorted(front, key=lambda p: (p.x, -p.y if higher_is_better else p.y))


def pareto_scatter(panels: list[ScatterPanel], *, ylabel: str, higher_is_better: bool,
                   hline: Optional[float] = None) -> bytes:
    """Quality against cost: every model a point, the Pareto-optimal ones ringed and joined by a line."""
    from matplotlib.ticker import FuncFormatter

    fig, axes = _figure(len(panels), len(panels), 4.2)
    for ax, panel in zip(axes, panels):
        front = pareto_front(panel.points, higher_is_better=higher_is_better)
        if len(front) > 1:
            ax.plot([p.x for p in front], [p.y for p in front], color="#888", linestyle="-", linewidth=1.2, zorder=1,
                    label="Pareto front")
        ax.scatter([p.x for p in front], [p.y for p in front], s=190, facecolors="none", edgecolors="#222",
                   linewidths=1.4, zorder=3, label="Pareto-optimal")
        for p in panel.points:
            ax.scatter([p.x], [p.y], s=55, color=p.color, zorder=4)
            ax.annotate(p.label, (p.x, p.y), textcoords="offset points", xytext=(7, 6), fontsize=8.5)
        if hline is not None:
            ax.axhline(hline, color="#999", linestyle=":", linewidth=1)
        if panel.log_x:
            ax.set_xscale("log")
        if panel.x_is_count:
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: short_count(v)))
        ax.set_xlabel(panel.xlabel, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.margins(x=0.18, y=0.15)
        ax.legend(fontsize=8, frameon=False, loc="best")
        _style(ax)
    return _png(fig)


def line_panels(panels: list[LinePanel]) -> bytes:
    """Curves against training step, one panel per quantity family (losses, validation)."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(len(panels), len(panels), 3.6)  # one row: losses, validation, agreement
    steps = [x for panel in panels for _, xs, _, _ in panel.lines for x in xs]
    lo, hi = min(steps + [0]), max(steps + [1])
    pad = 0.04 * (hi - lo)
    for ax, panel in zip(axes, panels):
        ax.set_xlim(lo - pad, hi + pad)  # the same step axis in every panel, from step 0
        for label, xs, ys, style in panel.lines:
            ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 12 else None, markersize=3.5, **style)
        for label, y, style in panel.hlines:
            ax.axhline(y, label=label, linewidth=1, **style)
        ax.set_title(panel.title, fontsize=10.5)
        ax.set_xlabel(panel.xlabel, fontsize=9)
        ax.set_ylabel(panel.ylabel, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.legend(fontsize=8, frameon=False)
        ax.grid(axis="x", color="#f0f1f4", linewidth=0.6)
        _style(ax)
    return _png(fig)


def short_count(value: float, *, strip: bool = True) -> str:
    """134515008 -> 134.5M, 1.7e9 -> 1.7B; strip=True (axis ticks) drops a trailing .0 (54M, not 54.0M)."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= div:
            text = f"{value / div:.1f}"
            if strip:
                text = text.rstrip("0").rstrip(".")
            return f"{text}{suffix}"
    return f"{value:g}"
