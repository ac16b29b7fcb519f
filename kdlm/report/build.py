"""Turn loaded inputs into the report `Document`, and write it (Markdown + PNGs, one HTML page) atomically.

Section order, each omitted with a one-line note when its data are absent:

    Method comparison (one per `kdlm compare` folder; compare_section.py) -> Comparison (methods x metrics)
    -> Retention -> Quality vs size and latency (Pareto) -> Agreement with the teacher -> Robustness
    -> Out-of-distribution -> Efficiency -> Harness -> Task metrics -> Training runs
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Optional, Sequence

from kdlm.errors import OutputError
from kdlm.report import plots
from kdlm.report.document import Bullets, Cell, Document, Figure, Note, Paragraph, Section, Table, to_html, to_markdown
from kdlm.report.inputs import EvalData, Inputs, RunData, load_inputs, number

ASR_KINDS = ("char", "word", "sentence", "overall")
_EFFICIENCY_NAMES = {"parameters": "params", "disk_mb": "disk", "peak_memory_mb": "peak memory",
                     "latency_ms_p50": "latency p50", "latency_ms_p95": "latency p95", "throughput_tok_s": "throughput"}

# Metric-name words that mean "lower is better"; everything else is taken as higher-is-better.
_LOWER_WORDS = {"perplexity", "ppl", "loss", "ce", "nll", "kl", "ece", "error", "err", "wer", "cer", "bpb", "bits",
                "mse", "latency", "ms", "asr", "drop", "memory", "disk", "mb", "time", "seconds"}


def lower_is_better(metric: str, task_type: Optional[str] = None) -> bool:
    words = set(re.split(r"[^a-z0-9]+", metric.lower()))
    return bool(words & _LOWER_WORDS) or (task_type == "perplexity" and "accuracy" not in words)


def arrow(lower: bool) -> str:
    return "↓" if lower else "↑"


# ----------------------------------------------------------------------------- number formatting


def fmt_num(value: Optional[float]) -> str:
    """Metric values: 3 decimals below 10, 2 below 100, 1 below 1000, then whole numbers with separators."""
    if value is None:
        return "n/a"
    a = abs(value)
    if a == 0:
        return "0"
    if a < 0.001:
        return f"{value:.2e}"
    if a < 10:
        return f"{value:.3f}"
    if a < 100:
        return f"{value:.2f}"
    if a < 1000:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def fmt_pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def fmt_ratio(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def fmt_count(value: Optional[float]) -> str:
    return "n/a" if value is None else plots.short_count(value, strip=False)


def fmt_signed(value: Optional[float]) -> str:
    return "n/a" if value is None else ("+" if value > 0 else "") + fmt_num(value)


def mean(values: Sequence[Optional[float]]) -> Optional[float]:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


# ----------------------------------------------------------------------------- ranked tables


@dataclass
class Col:
    """One numeric column: header, how to get its value for a row key, how to format it, which way is better."""

    header: str
    get: Callable[[Any], Optional[float]]
    fmt: Callable[[Optional[float]], str] = fmt_num
    lower: Optional[bool] = None  # None: not ranked (no bold)
    suffix: Optional[Callable[[Any], str]] = None  # text after a known value (an interval), outside the ranking


@dataclass
class Row:
    lead: list[str]  # the leading text cells (model, method, ...)
    key: Any  # handed to every Col.get
    group: Hashable = None  # best values are found within a group (e.g. one task's rows)
    ranked: bool = True  # the reference (teacher) row is shown but not ranked


def ranked_table(lead_headers: list[str], rows: list[Row], cols: list[Col], *, caption: str = "",
                 drop_empty: bool = True) -> Table:
    """A table whose best value in each ranked column (per group, among ranked rows) is bold.

    Ties are judged on the displayed value (without a column's suffix), so every cell that reads like the
    best one is bold too. Columns with no value in any row are dropped.
    """
    values = [[col.get(row.key) for col in cols] for row in rows]
    keep = [j for j in range(len(cols)) if not drop_empty or any(values[i][j] is not None for i in range(len(rows)))]
    best: dict[tuple[int, Hashable], str] = {}
    for j in keep:
        col = cols[j]
        if col.lower is None:
            continue
        for group in {row.group for row in rows}:
            candidates = [values[i][j] for i, row in enumerate(rows)
                          if row.group == group and row.ranked and values[i][j] is not None]
            if candidates:
                best[(j, group)] = col.fmt(min(candidates) if col.lower else max(candidates))
    table_rows = []
    for i, row in enumerate(rows):
        cells = [Cell(text) for text in row.lead]
        for j in keep:
            text = cols[j].fmt(values[i][j])
            bold = row.ranked and values[i][j] is not None and best.get((j, row.group)) == text
            if cols[j].suffix is not None and values[i][j] is not None:
                text += cols[j].suffix(row.key)
            cells.append(Cell(text, bold=bold, numeric=values[i][j] is not None))
        table_rows.append(cells)
    return Table(headers=lead_headers + [cols[j].header for j in keep], rows=table_rows, caption=caption)


def _dig(node: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


# ----------------------------------------------------------------------------- the report


class ReportBuilder:
    """Builds the Document from Inputs; each `_section_*` returns its Section (or a note when data are absent)."""

    def __init__(self, inputs: Inputs, title: str = "kdlm report"):
        self.inputs = inputs
        self.title = title
        self.ev: Optional[EvalData] = inputs.evals
        self.labels = self.ev.labels() if self.ev else []
        self.reference = self.ev.reference if self.ev else None
        self.colors = plots.model_colors(self.labels, self.reference)
        self.tasks = self.ev.task_names() if self.ev else []

    # -- helpers over the merged summary

    def is_ref(self, label: str) -> bool:
        return label == self.reference

    def rank_students_only(self, labels: Sequence[str]) -> bool:
        return self.reference in labels and any(not self.is_ref(label) for label in labels)

    def rows_for(self, labels: Sequence[str], lead: Callable[[str], list[str]], group: Hashable = None) -> list[Row]:
        students_only = self.rank_students_only(labels)
        return [Row(lead(label), label, group, ranked=not (students_only and self.is_ref(label))) for label in labels]

    def primary(self, task: str) -> Optional[str]:
        return self.ev.primary_metric(task) if self.ev else None

    def task_type(self, task: str) -> Optional[str]:
        return self.ev.tasks.get(task, {}).get("type") if self.ev else None

    def result(self, label: str, task: str, metric: Optional[str]) -> Optional[float]:
        return number(_dig(self.ev.section("results"), label, task, metric)) if metric else None

    def retention(self, label: str, task: str) -> Optional[float]:
        """Retention (% of the teacher) of the task's primary metric; the only metric given when there is one."""
        per_metric = _dig(self.ev.section("retention"), label, task)
        if not isinstance(per_metric, dict) or not per_metric:
            return None
        metric = self.primary(task)
        if metric in per_metric:
            return number(per_metric[metric])
        return number(next(iter(per_metric.values()))) if len(per_metric) == 1 else None

    # The means of the comparison table are taken over the keys (tasks, or task x OOD set) that EVERY model
    # concerned has a value for, so that two rows always average the same things: a student whose only
    # correct GSM8K answer flipped (ASR 1.0 over n = 1) must not be averaged against a teacher that has no
    # GSM8K ASR at all.

    def retention_by_task(self, label: str) -> dict[str, Optional[float]]:
        return {task: self.retention(label, task) for task in self.tasks}

    def asr_by_task(self, label: str) -> dict[str, Optional[float]]:
        per_task = self.ev.section("robustness").get(label, {})
        return {task: number(_dig(per_task, task, "asr", "overall")) for task in per_task}

    def ood_drop_by_set(self, label: str) -> dict[tuple[str, str], Optional[float]]:
        per_task = self.ev.section("ood").get(label, {})
        return {(task, name): number(v) for task in per_task for name, v in (_dig(per_task, task, "drop") or {}).items()}

    def common_keys(self, values: Callable[[str], dict], labels: Sequence[str]) -> list:
        """The keys that every model in `labels` with any value has a value for, in first-seen order."""
        tables = [values(lb) for lb in labels]
        tables = [t for t in tables if any(v is not None for v in t.values())]
        keys = list(dict.fromkeys(k for t in tables for k in t))
        return [k for k in keys if all(t.get(k) is not None for t in tables)]

    def students(self) -> list[str]:
        return [lb for lb in self.labels if not self.is_ref(lb)]

    def mean_retention(self, label: str) -> Optional[float]:
        if self.is_ref(label):
            return 100.0  # the teacher retains all of itself
        by_task = self.retention_by_task(label)
        return mean([by_task[k] for k in self.common_keys(self.retention_by_task, self.students())])

    def asr_overall(self, label: str) -> Optional[float]:
        by_task = self.asr_by_task(label)
        return mean([by_task.get(k) for k in self.common_keys(self.asr_by_task, self.labels)])

    def ood_drop(self, label: str) -> Optional[float]:
        by_set = self.ood_drop_by_set(label)
        return mean([by_set.get(k) for k in self.common_keys(self.ood_drop_by_set, self.labels)])

    def means_note(self) -> str:
        """Which tasks the comparison table's means are over."""
        parts = []
        for name, keys in (("retention", self.common_keys(self.retention_by_task, self.students())),
                           ("ASR", self.common_keys(self.asr_by_task, self.labels)),
                           ("OOD drop", self.common_keys(self.ood_drop_by_set, self.labels))):
            shown = [k if isinstance(k, str) else "/".join(k) for k in keys]
            if shown:
                parts.append(f"{name} over {', '.join(shown)}")
        return ("Means are over the tasks that every model has a value for (" + "; ".join(parts) + ")."
                if parts else "Means are over the tasks that every model has a value for.")

    def efficiency(self, label: str, key: str) -> Optional[float]:
        return number(_dig(self.ev.section("efficiency"), label, key))

    def method(self, label: str) -> str:
        if self.is_ref(label):
            return "teacher (reference)"
        run = self.inputs.run_of_model.get(label)
        return run.method() if run else "—"

    def section_labels(self, name: str) -> list[str]:
        present = self.ev.section(name)
        return [label for label in self.labels if present.get(label)]

    # -- the document

    def build(self) -> Document:
        doc = Document(title=self.title, intro=self._intro())
        doc.sections += self._method_comparison()
        compares = self.inputs.compares
        if self.ev is not None:
            builders = [self._comparison, self._retention, self._pareto, self._agreement, self._robustness,
                        self._ood, self._efficiency, self._harness, self._task_metrics]
            for make in builders:
                section = make()
                if section is not None:
                    doc.sections.append(section)
        elif not compares:  # a compare folder alone is a complete report: no notes about what it does not need
            doc.sections.append(Section("Evaluation", [Note(
                "No evaluation folder given (no summary.json): comparison, retention, Pareto, robustness and "
                "efficiency sections omitted. Run `kdlm eval` and pass its folder too.")]))
        if self.inputs.runs or not compares:
            doc.sections += self._training()
        return doc

    def _method_comparison(self) -> list[Section]:
        """One "Method comparison" section (with its subsections) per `kdlm compare` folder, first in the report."""
        from kdlm.report.compare_section import compare_sections  # it builds on this module's tables

        compares = self.inputs.compares
        sections: list[Section] = []
        for i, data in enumerate(compares):
            several = len(compares) > 1
            sections += compare_sections(data, figure=f"compare_training{f'_{i + 1}' if several else ''}.png",
                                         titled=several)
        return sections

    def _intro(self) -> list:
        now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
        blocks: list = [Paragraph(f"Generated by kdlm report on {now} from:")]
        items = []
        for src in self.ev.sources if self.ev else []:
            details = ", ".join(f"{k} {src[k]}" for k in ("created", "device", "reference") if src.get(k))
            items.append(f"evaluation {src['path']}" + (f" ({details})" if details else ""))
        for data in self.inputs.compares:
            details = ", ".join(f"{k} {data.raw[k]}" for k in ("grid", "created") if data.raw.get(k))
            items.append(f"comparison {data.path}" + (f" ({details})" if details else ""))
        for run in self.inputs.runs:
            items.append(f"run {run.path}")
        blocks.append(Bullets(items))
        if self.ev and len(self.ev.references) > 1:
            blocks.append(Note(f"The evaluation folders name different reference teachers ({', '.join(self.ev.references)}); "
                               f"{self.reference} is used as the reference row, and each retention value is relative "
                               f"to its own folder's teacher."))
        return blocks

    def _comparison(self) -> Section:
        section = Section("Comparison")
        if not self.labels:
            section.blocks.append(Note("The evaluation summaries list no models: comparison table omitted."))
            return section
        cols = []
        for task in self.tasks:
            metric = self.primary(task)
            if metric:
                lower = lower_is_better(metric, self.task_type(task))
                cols.append(Col(f"{task}: {metric} {arrow(lower)}", lambda lb, t=task, m=metric: self.result(lb, t, m),
                                lower=lower))
        cols += [
            Col("retention % (mean) ↑", self.mean_retention, fmt_pct, lower=False),
            Col("ASR overall (mean) ↓", self.asr_overall, lower=True),
            Col("OOD drop (mean) ↓", self.ood_drop, lower=True),
            Col("latency p50 ms ↓", lambda lb: self.efficiency(lb, "latency_ms_p50"), lower=True),
            Col("throughput tok/s ↑", lambda lb: self.efficiency(lb, "throughput_tok_s"), lower=False),
        ]
        rows = self.rows_for(self.labels, lambda lb: [lb, fmt_count(self.ev.parameters(lb)), self.method(lb)])
        ranked = "the best student per column" if self.rank_students_only(self.labels) else "the best value per column"
        section.blocks.append(ranked_table(["model", "params", "method"], rows, cols, caption=(
            f"Bold: {ranked} (↑ higher is better, ↓ lower is better); the teacher row is the reference. "
            f"Each task column is that task's primary metric. {self.means_note()}")))
        return section

    def _retention(self) -> Section:
        section = Section("Retention")
        students = [lb for lb in self.section_labels("retention") if not self.is_ref(lb)]
        if not students:
            section.blocks.append(Note("No retention results in the inputs: section omitted."))
            return section
        tasks = [t for t in self.tasks if any(self.retention(lb, t) is not None for lb in students)]
        panel = plots.BarPanel(
            title="Retention of the teacher's primary metric", groups=[f"{t}\n({self.primary(t)})" for t in tasks],
            series=[plots.Series(lb, [self.retention(lb, t) for t in tasks], self.colors[lb]) for lb in students],
            ylabel="% of teacher", hline=100.0)
        section.blocks.append(Paragraph(
            "Each bar is a student's score on a task's primary metric as a percentage of the teacher's "
            "(the dashed line is 100 %, parity with the teacher; for lower-is-better metrics kdlm eval "
            "computes retention so that higher is still better)."))
        section.blocks.append(Figure("retention.png", plots.grouped_bars([panel], ncols=1, row_height=4.0),
                                     alt="Retention bars per task and student", caption="Retention, % of teacher, per task."))
        cols = [Col(f"{t}: {self.primary(t)} % ↑", lambda lb, t=t: self.retention(lb, t), fmt_pct, lower=False) for t in tasks]
        cols.append(Col("mean % ↑", self.mean_retention, fmt_pct, lower=False))
        section.blocks.append(ranked_table(["student"], self.rows_for(students, lambda lb: [lb]), cols,
                                           caption="Retention (% of teacher) per task; bold: best student."))
        return section

    def _pareto(self) -> Section:
        section = Section("Quality vs size and latency")
        labels = self.labels
        if any(self.mean_retention(lb) is not None for lb in labels if not self.is_ref(lb)):
            quality = self.mean_retention
            ylabel, higher, hline = "mean retention (% of teacher)", True, 100.0
        else:
            task = next((t for t in self.tasks
                         if sum(self.result(lb, t, self.primary(t)) is not None for lb in labels) >= 2), None)
            if task is None:
                section.blocks.append(Note("No quality figure shared by two models (retention or a task's primary "
                                           "metric): Pareto view omitted."))
                return section
            metric = self.primary(task)
            def quality(lb: str, t: str = task, m: str = metric) -> Optional[float]:
                return self.result(lb, t, m)
            ylabel, higher, hline = f"{task}: {metric}", not lower_is_better(metric, self.task_type(task)), None
        panels = []
        for xlabel, get_x, count in (("parameters", self.ev.parameters, True),
                                     ("latency p50 (ms)", lambda lb: self.efficiency(lb, "latency_ms_p50"), False)):
            points = [plots.Point(lb, get_x(lb), quality(lb), self.colors[lb]) for lb in labels
                      if get_x(lb) is not None and quality(lb) is not None]
            if len(points) >= 2:
                xs = [p.x for p in points]
                log_x = min(xs) > 0 and max(xs) / min(xs) > 20
                panels.append(plots.ScatterPanel(xlabel, points, log_x=log_x, x_is_count=count))
        if not panels:
            section.blocks.append(Note("Fewer than two models have both a size or latency and a quality figure: "
                                       "Pareto view omitted."))
            return section
        section.blocks.append(Paragraph(
            f"Each point is a model; y = {ylabel}. Ringed points are Pareto-optimal (no other model is both "
            f"smaller/faster and {'better' if higher else 'lower'}), joined by the front line."))
        section.blocks.append(Figure("pareto.png", plots.pareto_scatter(panels, ylabel=ylabel, higher_is_better=higher,
                                                                        hline=hline),
                                     alt="Quality against parameters and latency, Pareto front marked",
                                     caption="Quality vs size (left) and latency (right)."
                                     if len(panels) == 2 else f"Quality vs {panels[0].xlabel}."))
        return section

    def _agreement(self) -> Section:
        section = Section("Agreement with the teacher")
        labels = self.section_labels("agreement")
        if not labels:
            section.blocks.append(Note("No agreement results (KL to teacher, top-1 agreement, ECE) in the inputs: section omitted."))
            return section
        agreement = self.ev.section("agreement")
        tasks = [t for t in self.tasks if any(_dig(agreement, lb, t) for lb in labels)]
        cols = []
        for t in tasks:
            cols += [Col(f"{t}: KL to teacher ↓", lambda lb, t=t: number(_dig(agreement, lb, t, "kl_to_teacher")), lower=True),
                     Col(f"{t}: top-1 agreement ↑", lambda lb, t=t: number(_dig(agreement, lb, t, "top1_agreement")), lower=False),
                     Col(f"{t}: ECE ↓", lambda lb, t=t: number(_dig(agreement, lb, t, "ece")), lower=True)]
        section.blocks.append(ranked_table(["model"], self.rows_for(labels, lambda lb: [lb]), cols, caption=(
            "KL(teacher ‖ student) per token and top-1 agreement with the teacher's next-token choice; "
            "ECE = expected calibration error. Bold: best student.")))
        return section

    def _robustness(self) -> Section:
        section = Section("Robustness")
        robustness = self.ev.section("robustness")
        labels = self.section_labels("robustness")
        if not labels:
            section.blocks.append(Note("No robustness results in the inputs: section omitted."))
            return section
        tasks = [t for t in self.tasks if any(_dig(robustness, lb, t) for lb in labels)]
        kinds = list(ASR_KINDS)
        for lb in labels:
            for t in tasks:
                kinds += [k for k in (_dig(robustness, lb, t, "asr") or {}) if k not in kinds]
        kinds = [k for k in kinds if any(_dig(robustness, lb, t, "asr", k) is not None for lb in labels for t in tasks)]
        panels = []
        for t in tasks:
            task_labels = [lb for lb in labels if _dig(robustness, lb, t)]
            panels.append(plots.BarPanel(
                title=f"{t}: attack success rate", groups=kinds,
                series=[plots.Series(lb, [number(_dig(robustness, lb, t, "asr", k)) for k in kinds], self.colors[lb])
                        for lb in task_labels],
                ylabel="ASR (lower is better)", value_format="{:.2f}"))
        section.blocks.append(Paragraph(
            "Attack success rate (ASR): among the examples a model answers correctly when clean, the share whose "
            "answer a perturbation of the input flips, by perturbation kind (character, word, sentence) and overall."))
        section.blocks.append(Figure("robustness_asr.png", plots.grouped_bars(panels),
                                     alt="ASR per perturbation kind per model", caption="ASR per perturbation kind, per task."))
        cols = [Col("clean accuracy ↑", lambda key: number(_dig(robustness, key[0], key[1], "clean_accuracy")), lower=False)]
        cols += [Col(f"ASR {k} ↓", lambda key, k=k: number(_dig(robustness, key[0], key[1], "asr", k)), lower=True) for k in kinds]
        cols.append(Col("n correct (clean)", lambda key: number(_dig(robustness, key[0], key[1], "n_correct_clean")),
                        lambda v: "n/a" if v is None else f"{v:.0f}"))
        rows = []
        for t in tasks:
            task_labels = [lb for lb in labels if _dig(robustness, lb, t)]
            rows += [Row(r.lead, (r.key, t), t, r.ranked) for r in self.rows_for(task_labels, lambda lb, t=t: [t, lb])]
        section.blocks.append(ranked_table(["task", "model"], rows, cols,
                                           caption="Bold: best student within each task."))
        return section

    def _ood(self) -> Section:
        section = Section("Out-of-distribution")
        ood = self.ev.section("ood")
        labels = self.section_labels("ood")
        if not labels:
            section.blocks.append(Note("No out-of-distribution results in the inputs: section omitted."))
            return section
        tasks = [t for t in self.tasks if any(_dig(ood, lb, t) for lb in labels)]
        section.blocks.append(Paragraph(
            "Drop: how much a model's score falls from the in-distribution test set to each out-of-distribution "
            "set (as kdlm eval computes it; lower is better)."))
        panels, tables = [], []
        for t in tasks:
            task_labels = [lb for lb in labels if _dig(ood, lb, t)]
            sets: list[str] = []
            for lb in task_labels:
                sets += [s for s in {**(_dig(ood, lb, t, "ood") or {}), **(_dig(ood, lb, t, "drop") or {})} if s not in sets]
            panels.append(plots.BarPanel(
                title=f"{t}: drop from in-distribution", groups=sets,
                series=[plots.Series(lb, [number(_dig(ood, lb, t, "drop", s)) for s in sets], self.colors[lb])
                        for lb in task_labels],
                ylabel="drop (lower is better)", value_format="{:.3f}"))
            cols = [Col("in-distribution ↑", lambda lb, t=t: number(_dig(ood, lb, t, "in_distribution")), lower=False)]
            for s in sets:
                cols += [Col(f"{s} ↑", lambda lb, t=t, s=s: number(_dig(ood, lb, t, "ood", s)), lower=False),
                         Col(f"{s} drop ↓", lambda lb, t=t, s=s: number(_dig(ood, lb, t, "drop", s)), lower=True)]
            tables.append(ranked_table(["model"], self.rows_for(task_labels, lambda lb: [lb]), cols,
                                       caption=f"{t}: scores on each set and drop; bold: best student."))
        section.blocks.append(Figure("ood_drop.png", plots.grouped_bars(panels),
                                     alt="OOD drop per OOD set per model", caption="Drop per OOD set, per task."))
        section.blocks += tables
        return section

    def _efficiency(self) -> Section:
        section = Section("Efficiency")
        efficiency = self.ev.section("efficiency")
        labels = self.section_labels("efficiency")
        if not labels:
            section.blocks.append(Note("No efficiency results in the inputs: section omitted."))
            return section
        ratio_keys: list[str] = []
        for lb in labels:
            ratio_keys += [k for k in (_dig(efficiency, lb, "ratios") or {}) if k not in ratio_keys]
        cols = [Col("params ↓", self.ev.parameters, fmt_count, lower=True),
                Col("disk MB ↓", lambda lb: self.efficiency(lb, "disk_mb") or number(self.ev.models.get(lb, {}).get("disk_mb")),
                    lower=True),
                Col("peak memory MB ↓", lambda lb: self.efficiency(lb, "peak_memory_mb"), lower=True),
                Col("latency p50 ms ↓", lambda lb: self.efficiency(lb, "latency_ms_p50"), lower=True),
                Col("latency p95 ms ↓", lambda lb: self.efficiency(lb, "latency_ms_p95"), lower=True),
                Col("throughput tok/s ↑", lambda lb: self.efficiency(lb, "throughput_tok_s"), lower=False)]
        cols += [Col(f"{_EFFICIENCY_NAMES.get(k, k)} ÷ teacher", lambda lb, k=k: number(_dig(efficiency, lb, "ratios", k)), fmt_ratio) for k in ratio_keys]
        section.blocks.append(ranked_table(["model"], self.rows_for(labels, lambda lb: [lb]), cols, caption=(
            "Bold: best student per column. Ratio columns are student ÷ teacher as kdlm eval measured them "
            "(parameters 0.50× = half the teacher's size; throughput 2.00× = twice its tokens per second).")))
        return section

    def _harness(self) -> Section:
        harness = self.ev.section("harness")
        labels = self.section_labels("harness")
        section = Section("Harness")
        if not labels:
            section.blocks.append(Note("No external-harness results in the inputs: section omitted."))
            return section
        pairs: list[tuple[str, str]] = []
        for lb in labels:
            for t, metrics in harness[lb].items():
                pairs += [(t, m) for m in (metrics or {}) if (t, m) not in pairs]
        cols = [Col(f"{t}: {m} {arrow(lower_is_better(m))}", lambda lb, t=t, m=m: number(_dig(harness, lb, t, m)),
                    lower=lower_is_better(m)) for t, m in pairs]
        section.blocks.append(ranked_table(["model"], self.rows_for(labels, lambda lb: [lb]), cols,
                                           caption="Scores from the external evaluation harness; bold: best student."))
        return section

    def _task_metrics(self) -> Optional[Section]:
        """Every metric of every task, when the results hold more than the primary metrics shown above."""
        results = self.ev.section("results")
        pairs: list[tuple[str, str]] = []
        for t in self.tasks:
            for lb in self.labels:
                pairs += [(t, m) for m in (_dig(results, lb, t) or {}) if m != "n" and (t, m) not in pairs]
        if all(m == self.primary(t) for t, m in pairs):
            return None
        section = Section("All task metrics")
        cols = []
        for t, m in pairs:
            lower = lower_is_better(m, self.task_type(t))
            cols.append(Col(f"{t}: {m} {arrow(lower)}", lambda lb, t=t, m=m: self.result(lb, t, m), lower=lower))
        for t in self.tasks:
            if any(_dig(results, lb, t, "n") is not None for lb in self.labels):
                cols.append(Col(f"{t}: n", lambda lb, t=t: number(_dig(results, lb, t, "n")),
                                lambda v: "n/a" if v is None else f"{v:.0f}"))
        labels = [lb for lb in self.labels if results.get(lb)]
        section.blocks.append(ranked_table(["model"], self.rows_for(labels, lambda lb: [lb]), cols,
                                           caption="n = examples scored. Bold: best student."))
        return section

    # -- training runs

    def _training(self) -> list[Section]:
        runs = self.inputs.runs
        if not runs:
            return [Section("Training runs", [Note("No distillation run folder given: training curves omitted.")])]
        sections = [Section("Training runs")]
        if len(runs) > 1:
            sections[0].blocks.append(self._runs_table(runs))
        else:
            sections[0].blocks.append(Paragraph(f"One run: {runs[0].name}."))
        used: dict[str, int] = {}
        for run in runs:
            slug = _slug(run.name)
            used[slug] = used.get(slug, 0) + 1
            suffix = "" if used[slug] == 1 else f"_{used[slug]}"
            sections.append(self._run_section(run, f"training_{slug}{suffix}.png"))
        return sections

    def _runs_table(self, runs: list[RunData]) -> Table:
        def after(run: RunData, key: str) -> Optional[float]:
            if run.final and isinstance(run.final.get("after"), dict) and key in run.final["after"]:
                return number(run.final["after"][key])
            return number(run.val_rows[-1].get(f"val/{key}")) if run.val_rows else None

        cols = [Col("steps", lambda r: number(r.final.get("steps")) if r.final else
                    number(max((row["step"] for row in r.train_rows + r.val_rows), default=None)),
                    lambda v: "n/a" if v is None else f"{v:.0f}"),
                Col("val CE ↓", lambda r: after(r, "ce"), lower=True),
                Col("KL to teacher ↓", lambda r: after(r, "kl_to_teacher"), lower=True),
                Col("top-1 agreement ↑", lambda r: after(r, "top1_agreement"), lower=False),
                Col("tokens/s ↑", lambda r: mean([number(row.get("tokens_per_s")) for row in r.train_rows]), lower=False)]
        rows = [Row([run.name, run.method()], run) for run in runs]
        return ranked_table(["run", "method"], rows, cols, caption=(
            "Final held-out figures of each run (final_metrics.json, else its latest validation); "
            "bold: best run. Compare runs only when they share teacher, student and validation data."))

    def _run_section(self, run: RunData, filename: str) -> Section:
        recipe = run.recipe
        section = Section(f"Run: {run.name}", level=3)
        train = recipe.get("train") if isinstance(recipe.get("train"), dict) else {}
        student = recipe.get("student") if isinstance(recipe.get("student"), dict) else {}
        teacher = recipe.get("teacher") if isinstance(recipe.get("teacher"), dict) else {}
        items = [f"teacher: {teacher.get('model', 'n/a')}",
                 f"student: {student.get('model', 'n/a')}"
                 + (f" (keep_layers {student['keep_layers']})" if student.get("keep_layers") is not None else ""),
                 f"objective: {run.method()}"]
        done = run.final.get("steps") if run.final else None
        items.append(f"steps: {done if done is not None else 'n/a'} of {train.get('max_steps', 'n/a')}; "
                     f"learning rate {train.get('learning_rate', 'n/a')}, batch {train.get('batch_size', 'n/a')} "
                     f"× accumulation {train.get('grad_accum', 1)}")
        models = [lb for lb, r in self.inputs.run_of_model.items() if r is run]
        if models:
            items.append(f"evaluated as: {', '.join(models)}")
        section.blocks.append(Bullets(items))
        if run.truncated_last_line:
            section.blocks.append(Note("The last line of metrics.jsonl is incomplete (the run is still writing) and was skipped."))

        panels = []
        loss_keys = [k for k in _keys(run.train_rows) if k.startswith("loss/")]
        if loss_keys:
            lines = []
            for k in sorted(loss_keys, key=lambda k: k == "loss/total"):  # total drawn last, on top
                xs, ys = _xy(run.train_rows, k)
                style = {"color": "black", "linewidth": 2.0} if k == "loss/total" else {"linewidth": 1.3}
                lines.append((k.removeprefix("loss/"), xs, ys, style))
            panels.append(plots.LinePanel("Training loss terms", "step", "loss", lines))
        val_lines = [(label, *_xy(run.val_rows, key), {"linewidth": 1.6}) for key, label in
                     (("val/ce", "CE (nats/token)"), ("val/kl_to_teacher", "KL to teacher")) if key in _keys(run.val_rows)]
        if val_lines:
            teacher_ce = [number(r.get("val/teacher_ce")) for r in run.val_rows if number(r.get("val/teacher_ce")) is not None]
            hlines = [("teacher CE", teacher_ce[-1], {"color": "#666", "linestyle": "--"})] if teacher_ce else []
            panels.append(plots.LinePanel("Validation", "step", "nats/token", val_lines, hlines))
        if "val/top1_agreement" in _keys(run.val_rows):
            xs, ys = _xy(run.val_rows, "val/top1_agreement")
            panels.append(plots.LinePanel("Validation top-1 agreement", "step", "share of tokens",
                                          [("top-1 agreement", xs, ys, {"color": "#2ca02c", "linewidth": 1.6})]))
        if panels:
            section.blocks.append(Figure(filename, plots.line_panels(panels), alt=f"Training curves of {run.name}",
                                         caption=f"{run.name}: loss terms and validation against optimizer step "
                                                 "(step 0 = before training)."))
        else:
            section.blocks.append(Note("metrics.jsonl holds no training or validation rows yet: curves omitted."))

        before = run.final.get("before") if run.final else None
        after = run.final.get("after") if run.final else None
        caption = "Held-out figures from final_metrics.json."
        if run.final is None and len(run.val_rows) >= 1:
            before, after = _val_metrics(run.val_rows[0]), _val_metrics(run.val_rows[-1])
            caption = (f"The run has no final_metrics.json yet (unfinished?): before = validation at step "
                       f"{run.val_rows[0]['step']}, after = latest validation at step {run.val_rows[-1]['step']}.")
        if before or after:
            section.blocks.append(_before_after(before or {}, after or {}, caption))
        else:
            section.blocks.append(Note("No final_metrics.json and no validation rows: before/after table omitted."))
        return section


def _keys(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def _xy(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pairs = [(row["step"], number(row.get(key))) for row in rows]
    pairs = [(x, y) for x, y in pairs if y is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _val_metrics(row: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix("val/"): v for k, v in row.items() if k.startswith("val/")}


def _before_after(before: dict[str, Any], after: dict[str, Any], caption: str) -> Table:
    names = {"ce": "CE (nats/token) ↓", "kl_to_teacher": "KL to teacher ↓", "top1_agreement": "top-1 agreement ↑",
             "teacher_ce": "teacher CE (reference)", "tokens": "tokens scored"}
    keys = [k for k in names if k in before or k in after]
    keys += [k for k in list(before) + list(after) if k not in keys and k not in names]
    rows = []
    for k in dict.fromkeys(keys):
        b, a = number(before.get(k)), number(after.get(k))
        whole = k == "tokens"
        fmt = (lambda v: "n/a" if v is None else f"{v:,.0f}") if whole else fmt_num
        change = None if (b is None or a is None or whole) else a - b
        rows.append([Cell(names.get(k, k)), Cell(fmt(b), numeric=b is not None), Cell(fmt(a), numeric=a is not None),
                     Cell(fmt_signed(change) if change is not None else "", numeric=change is not None)])
    return Table(["metric", "before", "after", "change"], rows, caption=caption)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


# ----------------------------------------------------------------------------- entry points


def build_document(paths: Sequence[str | Path], *, title: str = "kdlm report") -> Document:
    """Load and validate every input folder, then build the report (nothing is written)."""
    return ReportBuilder(load_inputs(list(paths)), title).build()


def write_report(doc: Document, out_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md, its PNGs and report.html into out_dir; each file appears only when fully written.

    Everything is rendered in memory first; each file is then written to a temporary name in out_dir
    and moved over the old one with os.replace. PNGs the previous report.md used and this one does not
    are removed afterwards.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    markdown = to_markdown(doc)
    page = to_html(doc)
    files: dict[str, bytes] = {fig.filename: fig.png for fig in doc.figures()}
    files["report.md"] = markdown.encode("utf-8")
    files["report.html"] = page.encode("utf-8")  # last: the page is the report's "done" mark

    out.mkdir(parents=True, exist_ok=True)
    old_md = out / "report.md"
    old_images = set(re.findall(r"!\[[^\]]*\]\(([\w.-]+\.png)\)", old_md.read_text(encoding="utf-8"))) \
        if old_md.is_file() else set()
    for name, data in files.items():
        _atomic_write(out / name, data)
    for name in old_images - set(files):
        (out / name).unlink(missing_ok=True)
    return out / "report.md", out / "report.html"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_report(paths: Sequence[str | Path], out_dir: str | Path, *, title: str = "kdlm report") -> tuple[Path, Path]:
    """`kdlm report` as a function: read the folders, render, write. Returns (report.md, report.html)."""
    return write_report(build_document(paths, title=title), out_dir)
