"""The "Method comparison" section: a `kdlm compare` folder rendered as tables and training curves.

    DIR/compare.json                    the grid's results (kdlm_compare_version 1, see docs/guides/report.md)
    DIR/variants/<name>/seed<k>/run/    each trained variant's `kdlm distill` folder: its loss curve is drawn
    DIR/variants/<name>/seed<k>/eval/   its `kdlm eval` folder: already summarised in compare.json, not read

compare.json is validated in full when the folder is loaded, before anything is drawn: a malformed file is
one DataError naming the file and the field. The numbers are shown as `kdlm compare` computed them; nothing
is recomputed here except which value of a column is the best (bold).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from kdlm.report import plots
from kdlm.report.build import Col, Row, _xy, arrow, fmt_num, fmt_pct, fmt_signed, ranked_table
from kdlm.report.document import Bullets, Cell, Figure, Note, Paragraph, Section, Table
from kdlm.report.inputs import (RunData, SchemaError, check_header, is_number_or_null, is_run_folder, load_run_folder,
                                number, read_json, validate_list, validate_nested)

COMPARE_VERSION = 1
GROUPS = ("task", "robustness", "ood", "efficiency", "training")
MAIN_GROUPS = ("task", "robustness", "ood")  # the columns of the main table
_ROLE_ORDER = {"teacher": 0, "initial": 1, "sft": 2}  # then every other role (the methods) in file order
_CELL_NUMBERS = ("value", "ci_low", "ci_high", "n", "std")
_MAJORITY = ("majority class",)  # the row key of the majority-class baseline (a tuple: never a variant name)


def is_compare_folder(path: Path) -> bool:
    return (path / "compare.json").is_file()


# ----------------------------------------------------------------------------- loading


@dataclass
class CompareRun:
    """One run folder of a variant (one seed), for the training curves."""

    variant: str
    label: str  # the variant, plus the seed when the variant has several runs
    run: RunData


@dataclass
class CompareData:
    """A validated compare.json and the run folders it lists."""

    path: Path
    raw: dict[str, Any]
    runs: list[CompareRun] = field(default_factory=list)
    missing_runs: list[str] = field(default_factory=list)  # listed, but no run folder there

    @property
    def baseline(self) -> Optional[str]:
        return self.raw.get("baseline")

    def variants(self) -> list[dict[str, Any]]:
        """Teacher, initial student, SFT, then the methods in file order."""
        return sorted(self.raw["variants"], key=lambda v: _ROLE_ORDER.get(v.get("role"), len(_ROLE_ORDER)))

    def is_teacher(self, variant: dict[str, Any]) -> bool:
        return variant.get("role") == "teacher" or variant["name"] == self.raw.get("reference")

    def metrics(self, *groups: str) -> list[dict[str, Any]]:
        return [m for m in self.raw["metrics"] if m["group"] in groups]

    def cell(self, name: str, key: str) -> dict[str, Any]:
        return self.raw["table"].get(name, {}).get(key) or {}

    def value(self, row_key: Any, key: str) -> Optional[float]:
        if row_key == _MAJORITY:
            return number(self.raw["majority_baseline"].get(key))
        return number(self.cell(row_key, key).get("value"))

    def difference(self, name: str, key: str) -> Optional[dict[str, Any]]:
        """The variant's difference to the baseline on `key`; None for the baseline itself and when absent."""
        if name == self.baseline:
            return None
        diff = self.raw["differences"].get(name, {}).get(key)
        return diff if diff and number(diff.get("diff")) is not None else None


def load_compare_folder(path: Path) -> CompareData:
    """Read and validate `path/compare.json`, then the run folders its variants list."""
    data = CompareData(path=path, raw=read_json(path / "compare.json", _validate_compare))
    for variant in data.raw["variants"]:
        listed = variant.get("runs") or []
        for j, rel in enumerate(listed):
            folder = path / rel
            if not is_run_folder(folder):
                data.missing_runs.append(rel)
                continue
            seed = next((part for part in Path(rel).parts if part.startswith("seed")), f"run {j + 1}")
            label = variant["name"] if len(listed) == 1 else f"{variant['name']} {seed}"
            data.runs.append(CompareRun(variant["name"], label, load_run_folder(folder)))
    return data


def _validate_compare(raw: Any) -> dict[str, Any]:
    out = check_header(raw, "compare", COMPARE_VERSION, ("grid", "grid_file", "description", "created", "reference",
                                                          "baseline"))
    out["budget"] = _object(raw, "budget")
    for key, kind in (("kind", str), ("description", str), ("value", (int, float))):
        value = out["budget"].get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise SchemaError(f"budget.{key} has the wrong type ({type(value).__name__})")
    out["seeds"] = raw.get("seeds") or []
    if not isinstance(out["seeds"], list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in out["seeds"]):
        raise SchemaError("seeds must be a list of integers")

    variants = validate_list(raw.get("variants", []), "variants", "name", {
        "role": str, "description": str, "status": str, "error": str, "runs": list, "train": dict})
    names: set[str] = set()
    for i, variant in enumerate(variants):
        if variant["name"] in names:
            raise SchemaError(f"variants[{i}].name {variant['name']!r} appears twice")
        names.add(variant["name"])
        for j, rel in enumerate(variant.get("runs") or []):
            if not isinstance(rel, str) or not rel:
                raise SchemaError(f"variants[{i}].runs[{j}] must be a non-empty string (a folder inside the compare folder)")
        validate_nested(variant.get("train") or {}, f"variants[{i}].train", depth=1)
    out["variants"] = variants

    metrics = validate_list(raw.get("metrics", []), "metrics", "key", {
        "task": str, "metric": str, "higher_is_better": bool, "group": str, "label": str})
    for i, metric in enumerate(metrics):
        if not isinstance(metric.get("higher_is_better"), bool):
            raise SchemaError(f"metrics[{i}].higher_is_better must be true or false")
        if metric.get("group") not in GROUPS:
            raise SchemaError(f"metrics[{i}].group must be one of {', '.join(GROUPS)}, got {metric.get('group')!r}")
    out["metrics"] = metrics

    if "table" not in raw:
        raise SchemaError("no table (the per-variant results)")
    for name in ("table", "differences", "retention"):
        out[name] = _object(raw, name)
        for variant, per_key in out[name].items():
            if variant not in names:
                raise SchemaError(f"{name}.{variant}: no such variant in variants")
            if not isinstance(per_key, dict):
                raise SchemaError(f"{name}.{variant} must be an object")
    for variant, per_key in out["table"].items():
        for key, cell in per_key.items():
            _check_cell(cell, f"table.{variant}.{key}")
    for variant, per_key in out["differences"].items():
        for key, diff in per_key.items():
            _check_difference(diff, f"differences.{variant}.{key}")
    validate_nested(out["retention"], "retention", depth=2)
    out["majority_baseline"] = _object(raw, "majority_baseline")
    validate_nested(out["majority_baseline"], "majority_baseline", depth=1)
    out["best"] = _object(raw, "best")
    for key, name in out["best"].items():
        if name is not None and not isinstance(name, str):
            raise SchemaError(f"best.{key} must be a variant name or null")
    out["notes"] = raw.get("notes") or []
    if not isinstance(out["notes"], list) or not all(isinstance(n, str) for n in out["notes"]):
        raise SchemaError("notes must be a list of strings")
    return out


def _object(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SchemaError(f"{key} must be an object")
    return value


def _check_cell(cell: Any, where: str) -> None:
    """{value, ci_low, ci_high, n, std: number or null, per_seed: [number or null]}."""
    if not isinstance(cell, dict):
        raise SchemaError(f"{where} must be an object")
    for key in _CELL_NUMBERS:
        if not is_number_or_null(cell.get(key)):
            raise SchemaError(f"{where}.{key} must be a number or null, got {type(cell[key]).__name__}")
    per_seed = cell.get("per_seed")
    if per_seed is not None and (not isinstance(per_seed, list) or not all(is_number_or_null(v) for v in per_seed)):
        raise SchemaError(f"{where}.per_seed must be a list of numbers or nulls")


def _check_difference(diff: Any, where: str) -> None:
    """{vs: variant, diff, ci_low, ci_high: number or null, significant: true, false or null}."""
    if not isinstance(diff, dict):
        raise SchemaError(f"{where} must be an object")
    if diff.get("vs") is not None and not isinstance(diff["vs"], str):
        raise SchemaError(f"{where}.vs must be a variant name")
    for key in ("diff", "ci_low", "ci_high"):
        if not is_number_or_null(diff.get(key)):
            raise SchemaError(f"{where}.{key} must be a number or null, got {type(diff[key]).__name__}")
    if diff.get("significant") is not None and not isinstance(diff["significant"], bool):
        raise SchemaError(f"{where}.significant must be true, false or null")


# ----------------------------------------------------------------------------- the section


def compare_sections(data: CompareData, *, figure: str, titled: bool = False) -> list[Section]:
    """The "Method comparison" section and its subsections (retention, efficiency, training)."""
    return _CompareSections(data, figure, titled).build()


def _first_line(text: Optional[str]) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def _significant(diff: dict[str, Any]) -> Optional[bool]:
    """The file's verdict; failing that, whether the interval excludes 0; None when neither is known."""
    if isinstance(diff.get("significant"), bool):
        return diff["significant"]
    low, high = number(diff.get("ci_low")), number(diff.get("ci_high"))
    return None if low is None or high is None else not low <= 0 <= high


def _fmt_whole(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _fmt_for(values: list[Optional[float]]) -> Callable[[Optional[float]], str]:
    """Whole numbers for a column of counts (steps, tokens), metric formatting for any other column."""
    known = [v for v in values if v is not None]
    return _fmt_whole if known and all(float(v).is_integer() for v in known) else fmt_num


def _interval(node: dict[str, Any]) -> str:
    low, high = number(node.get("ci_low")), number(node.get("ci_high"))
    return "" if low is None or high is None else f" [{fmt_num(low)}, {fmt_num(high)}]"


class _CompareSections:
    def __init__(self, data: CompareData, figure: str, titled: bool):
        self.data = data
        self.raw = data.raw
        self.figure = figure
        self.grid = self.raw["grid"] if titled and self.raw.get("grid") else ""  # names the sections when several
        self.of_grid = f" ({self.grid})" if self.grid else ""
        self.variants = data.variants()
        self.done = [v for v in self.variants if v.get("status", "done") == "done"]

    def build(self) -> list[Section]:
        return [self._main(), self._retention(), self._efficiency(), self._training()]

    # -- cells

    def label(self, metric: dict[str, Any]) -> str:
        return f"{metric.get('label') or metric['key']} {arrow(not metric['higher_is_better'])}"

    def cell_suffix(self, row_key: Any, key: str) -> str:
        """After the value: `± std` over seeds, the 95% interval, and the difference to the baseline."""
        if row_key == _MAJORITY:
            return ""
        cell = self.data.cell(row_key, key)
        std = number(cell.get("std"))
        text = (f" ± {fmt_num(std)}" if std is not None else "") + _interval(cell)
        diff = self.data.difference(row_key, key)
        if diff is not None:
            versus = f" vs {diff['vs']}" if diff.get("vs") and diff["vs"] != self.data.baseline else ""
            text += f" ({fmt_signed(number(diff['diff']))}{versus}{' n.s.' if _significant(diff) is False else ''})"
        return text

    def cols(self, metrics: list[dict[str, Any]], fmt: Callable[[Optional[float]], str] = fmt_num) -> list[Col]:
        return [Col(self.label(m), lambda rk, k=m["key"]: self.data.value(rk, k), fmt, lower=not m["higher_is_better"],
                    suffix=lambda rk, k=m["key"]: self.cell_suffix(rk, k)) for m in metrics]

    def rows(self, variants: list[dict[str, Any]]) -> list[Row]:
        rows = []
        for v in variants:
            status = v.get("status", "done")
            run = next((r.run for r in self.data.runs if r.variant == v["name"]), None)
            lead = v.get("description") or (run.method() if run else v.get("role") or "")
            if status != "done":
                lead = f"{status}: {_first_line(v.get('error'))}" if _first_line(v.get("error")) else status
            rows.append(Row([v["name"], lead], v["name"], ranked=not self.data.is_teacher(v)))
        return rows

    # -- sections

    def _main(self) -> Section:
        section = Section("Method comparison" + (f": {self.grid}" if self.grid else ""))
        raw, baseline = self.raw, self.data.baseline
        seeds = raw["seeds"]
        facts = [f"Grid {raw['grid']}" + (f" ({raw['grid_file']})" if raw.get("grid_file") else "")
                 if raw.get("grid") else "One `kdlm compare` grid"]
        if raw.get("description"):
            facts[0] += f": {raw['description']}"
        if raw["budget"].get("description"):
            facts.append(f"equal budget for every trained variant: {raw['budget']['description']}")
        if seeds:
            facts.append(f"seed{'s' if len(seeds) > 1 else ''} {', '.join(str(s) for s in seeds)}")
        if baseline:
            facts.append(f"baseline {baseline}. n.s. = the paired-bootstrap 95% interval of the difference to "
                         f"{baseline} contains 0")
        else:
            facts.append("no baseline finished, so no differences are shown")
        section.blocks.append(Paragraph("; ".join(facts) + "."))
        section.blocks += [Note(text) for text in raw["notes"]]

        metrics = self.data.metrics(*MAIN_GROUPS)
        if not metrics:
            section.blocks.append(Note("compare.json lists no task, robustness or OOD metrics: comparison table omitted."))
        else:
            rows = self.rows(self.variants)
            if any(self.data.value(_MAJORITY, m["key"]) is not None for m in metrics):
                rows.append(Row(["majority class", "always the most frequent label"], _MAJORITY, ranked=False))
            spread = " (mean ± standard deviation over the seeds)" if len(seeds) > 1 else ""
            versus = (f", and in parentheses the variant's difference to {baseline} (n.s.: not significant)"
                      if baseline else "")
            table = ranked_table(["variant", "description"], rows, self.cols(metrics), caption=(
                f"Each cell: the value{spread}, its 95% interval [low, high]{versus}. Bold: the best value per column "
                f"among the variants other than the teacher (↑ higher is better, ↓ lower is better)."))
            section.blocks.append(self._blank_unfinished(table, rows))
        best = self._best()
        if best:
            section.blocks += [Paragraph("Best per metric:"), Bullets(best)]
        return section

    def _blank_unfinished(self, table: Table, rows: list[Row]) -> Table:
        """A failed (or skipped) variant has no numbers: a dash in every metric cell, not a row of n/a."""
        unfinished = {v["name"] for v in self.variants if v.get("status", "done") != "done"}
        for row, cells in zip(rows, table.rows):
            if row.key in unfinished:
                cells[len(row.lead):] = [Cell("—") for _ in cells[len(row.lead):]]
        return table

    def _best(self) -> list[str]:
        items = []
        for metric in self.data.metrics(*MAIN_GROUPS, "efficiency"):  # the best number of steps says nothing
            name = self.raw["best"].get(metric["key"])
            if not name:
                continue
            value = self.data.value(name, metric["key"])
            cell = self.data.cell(name, metric["key"])
            text = f"{self.label(metric)}: {name}, {fmt_num(value)}{_interval(cell)}"
            diff = self.data.difference(name, metric["key"])
            if name == self.data.baseline:
                text += " (the baseline itself)"
            elif diff is not None:
                verdict = {True: "significant", False: "not significant (n.s.)", None: "significance unknown"}
                text += (f"; {fmt_signed(number(diff['diff']))}{_interval(diff)} vs {diff.get('vs') or self.data.baseline}, "
                         f"{verdict[_significant(diff)]}")
            items.append(text)
        return items

    def _retention(self) -> Section:
        section = Section(f"Comparison: retention{self.of_grid}", level=3)
        retention = self.raw["retention"]
        metrics = [m for m in self.data.metrics("task") if any(
            number(retention.get(v["name"], {}).get(m["key"])) is not None for v in self.done)]
        variants = [v for v in self.done if not self.data.is_teacher(v) and retention.get(v["name"])]
        if not metrics or not variants:
            section.blocks.append(Note("compare.json holds no retention figures: retention table omitted."))
            return section
        cols = [Col(f"{m.get('label') or m['key']} % ↑", lambda rk, k=m["key"]: number(retention.get(rk, {}).get(k)),
                    fmt_pct, lower=False) for m in metrics]
        section.blocks.append(ranked_table(["variant", "description"], self.rows(variants), cols, caption=(
            "Each task metric as a percentage of the teacher's value (for lower-is-better metrics, teacher ÷ "
            "student), so higher is better throughout; bold: best variant.")))
        return section

    def _efficiency(self) -> Section:
        section = Section(f"Comparison: efficiency{self.of_grid}", level=3)
        metrics = self.data.metrics("efficiency")
        if not metrics:
            section.blocks.append(Note("compare.json lists no efficiency metrics: efficiency table omitted."))
            return section
        section.blocks.append(ranked_table(["variant", "description"], self.rows(self.done), self.cols(metrics),
                                           caption="As kdlm eval measured each variant; bold: best non-teacher value."))
        return section

    def _training(self) -> Section:
        section = Section(f"Comparison: training{self.of_grid}", level=3)
        metrics = self.data.metrics("training")
        trained = [v for v in self.done if v.get("train") or any(
            self.data.value(v["name"], m["key"]) is not None for m in metrics)]
        # a variant's `train` figures that no training metric carries already (kdlm compare lists most as both)
        covered = {m["key"] for m in metrics}
        extra = list(dict.fromkeys(k for v in trained for k in v.get("train") or {} if f"training/{k}" not in covered))
        if trained:
            def train(name: str, key: str) -> Optional[float]:
                return number((self._variant(name).get("train") or {}).get(key))

            cols = [col for m in metrics for col in self.cols(
                [m], _fmt_for([self.data.value(v["name"], m["key"]) for v in trained]))]
            cols += [Col(key.replace("_", " "), lambda rk, k=key: train(rk, k), _fmt_for([train(v["name"], key) for v in trained]))
                     for key in extra]
            section.blocks.append(ranked_table(["variant", "description"], self.rows(trained), cols, caption=(
                "Training figures of each trained variant at the shared budget, as kdlm compare recorded them "
                "(the mean over seeds with several); bold: best per column.")))
        curves = self._curves()
        if curves is not None:
            section.blocks.append(curves)
        if self.data.missing_runs:
            section.blocks.append(Note(f"Listed run folders that hold no run (resolved_config.yaml + metrics.jsonl): "
                                       f"{', '.join(self.data.missing_runs)}; their curves are omitted."))
        if not section.blocks:
            section.blocks.append(Note("No training figures and no run folders in the compare folder: "
                                       "training table and curves omitted."))
        return section

    def _variant(self, name: str) -> dict[str, Any]:
        return next(v for v in self.variants if v["name"] == name)

    def _curves(self) -> Optional[Figure]:
        """One line per run folder: the total training loss, and the validation CE when the runs logged it."""
        colors = plots.model_colors([v["name"] for v in self.variants], self.raw.get("reference"))
        styles = ("-", "--", ":", "-.")
        seen: dict[str, int] = {}
        losses, val = [], []
        for item in self.data.runs:
            n = seen[item.variant] = seen.get(item.variant, -1) + 1
            style = {"color": colors.get(item.variant), "linestyle": styles[n % len(styles)], "linewidth": 1.5}
            keys = [k for row in item.run.train_rows for k in row if k.startswith("loss/")]
            key = "loss/total" if "loss/total" in keys else (keys[0] if len(set(keys)) == 1 else None)
            if key:
                losses.append((item.label, *_xy(item.run.train_rows, key), style))
            xs, ys = _xy(item.run.val_rows, "val/ce")
            if xs:
                val.append((item.label, xs, ys, style))
        panels = []
        if losses:
            panels.append(plots.LinePanel("Training loss (total objective)", "step", "loss", losses))
        if val:
            panels.append(plots.LinePanel("Validation CE", "step", "nats/token", val))
        if not panels:
            return None
        return Figure(self.figure, plots.line_panels(panels),
                      alt=f"Training curves of the compared variants{self.of_grid}",
                      caption="Each variant's run (one line per seed): its total training loss and, where logged, its "
                              "held-out CE against optimizer step. The losses of different objectives are on "
                              "different scales; compare their shapes, and the validation CE across variants.")
