"""Read the report's inputs: evaluation folders (`kdlm eval`) and distillation run folders (`kdlm distill`).

Everything is read and validated here, before anything is drawn or written, so that bad
input fails with one line naming the file and never leaves a half-written report.

    eval folder    : summary.json                      (schema: kdlm_eval_version 1, see docs/guides/report.md)
    run folder     : resolved_config.yaml + metrics.jsonl [+ final_metrics.json]
    compare folder : compare.json                      (kdlm_compare_version 1; read by compare_section.py)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import yaml

from kdlm.errors import DataError

if TYPE_CHECKING:
    from kdlm.report.compare_section import CompareData

T = TypeVar("T")

EVAL_VERSION = 1
# The per-model sections of summary.json, and how deep their objects nest before the numbers:
# results[label][task][metric] is depth 3; efficiency[label][field] is depth 2.
SECTIONS = ("results", "retention", "agreement", "robustness", "ood", "efficiency", "harness")


# ----------------------------------------------------------------------------- evaluation folders


@dataclass
class EvalData:
    """One summary.json, or several merged: models and tasks keyed by name, sections as nested dicts."""

    sources: list[dict[str, Any]] = field(default_factory=list)  # [{path, created, device, reference}]
    reference: Optional[str] = None  # the teacher's label: retention, KL and ratios are relative to it
    references: list[str] = field(default_factory=list)  # every distinct reference seen (more than one: a note)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> {label, path, parameters, disk_mb, base}
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {name, type, primary_metric, limit}
    sections: dict[str, dict[str, Any]] = field(default_factory=lambda: {name: {} for name in SECTIONS})

    def section(self, name: str) -> dict[str, Any]:
        return self.sections.get(name, {})

    def labels(self) -> list[str]:
        """Every model label, the reference first, then in order of first appearance (models list, then sections)."""
        seen: dict[str, None] = dict.fromkeys(self.models)
        for name in SECTIONS:
            for label in self.sections[name]:
                seen.setdefault(label, None)
        if self.reference in seen:  # a reference no folder has data for gets no empty row
            return [self.reference] + [label for label in seen if label != self.reference]
        return list(seen)

    def students(self) -> list[str]:
        return [label for label in self.labels() if label != self.reference]

    def task_names(self) -> list[str]:
        """Declared tasks first, then any task that only appears inside a section."""
        seen: dict[str, None] = dict.fromkeys(self.tasks)
        for name in ("results", "retention", "agreement", "robustness", "ood", "harness"):
            for per_task in self.sections[name].values():
                for task in per_task:
                    seen.setdefault(task, None)
        return list(seen)

    def primary_metric(self, task: str) -> Optional[str]:
        """The task's declared primary metric, else the first metric its results report."""
        metric = self.tasks.get(task, {}).get("primary_metric")
        if metric:
            return metric
        for per_task in self.sections["results"].values():
            for name in per_task.get(task, {}):
                if name != "n":
                    return name
        return None

    def parameters(self, label: str) -> Optional[float]:
        value = self.models.get(label, {}).get("parameters")
        if value is None:
            value = self.sections["efficiency"].get(label, {}).get("parameters")
        return number(value)


def is_eval_folder(path: Path) -> bool:
    return (path / "summary.json").is_file()


def is_run_folder(path: Path) -> bool:
    return (path / "resolved_config.yaml").is_file() and (path / "metrics.jsonl").is_file()


def load_eval_folder(path: Path) -> dict[str, Any]:
    """Parse and validate `path/summary.json`; returns the raw dict with every section present."""
    return read_json(path / "summary.json", _validate_summary)


class SchemaError(Exception):
    """A field of a JSON input that breaks its schema; `read_json` turns it into a DataError naming the file."""


def read_json(file: Path, validate: Callable[[Any], T]) -> T:
    """Parse `file` and hand it to `validate`; any failure is one DataError line naming the file (and the field)."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{file}: cannot read ({err})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{file}: malformed {file.name}: {err.msg} at line {err.lineno} column {err.colno}") from None
    try:
        return validate(raw)
    except SchemaError as err:
        raise DataError(f"{file}: malformed {file.name}: {err}") from None


def check_header(raw: Any, command: str, version: int, strings: tuple[str, ...]) -> dict[str, Any]:
    """A JSON object carrying `kdlm_<command>_version` == version, whose `strings` fields are strings or absent."""
    if not isinstance(raw, dict):
        raise SchemaError("expected a JSON object at the top level")
    name = f"kdlm_{command}_version"
    found = raw.get(name)
    if found is None:
        raise SchemaError(f"no {name} (not written by `kdlm {command}`?)")
    if found != version:
        raise SchemaError(f"{name} {found!r} is not supported (this kdlm reads version {version})")
    for key in strings:
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise SchemaError(f"{key} must be a string")
    return dict(raw)


def _validate_summary(raw: Any) -> dict[str, Any]:
    out = check_header(raw, "eval", EVAL_VERSION, ("created", "device", "reference"))
    out["models"] = validate_list(raw.get("models", []), "models", "label",
                                  {"path": str, "parameters": (int, float), "disk_mb": (int, float)})
    out["tasks"] = validate_list(raw.get("tasks", []), "tasks", "name",
                                 {"type": str, "primary_metric": str, "limit": (int, float)})
    for name in SECTIONS:
        section = raw.get(name)
        out[name] = {} if section is None else section
        # efficiency is label -> {field: number or {ratio: number}}; the others are label -> task -> {...}
        validate_nested(out[name], name, depth=2 if name == "efficiency" else 3)
    return out


def validate_list(items: Any, where: str, key: str, types: dict[str, Any]) -> list[dict[str, Any]]:
    """A list of objects, each with a non-empty string `key`; each field in `types` absent, null or of its type."""
    if not isinstance(items, list):
        raise SchemaError(f"{where} must be a list")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise SchemaError(f"{where}[{i}] must be an object")
        if not isinstance(item.get(key), str) or not item[key]:
            raise SchemaError(f"{where}[{i}].{key} must be a non-empty string")
        for name, kind in types.items():
            value = item.get(name)
            if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and not _allows_bool(kind))):
                raise SchemaError(f"{where}[{i}].{name} has the wrong type ({type(value).__name__})")
    return items


def _allows_bool(kind: Any) -> bool:
    return bool in (kind if isinstance(kind, tuple) else (kind,))


def validate_nested(node: Any, where: str, depth: int) -> None:
    """Objects down to `depth`, then numbers, nulls, or (one level deeper) objects of numbers."""
    if depth > 0:
        if not isinstance(node, dict):
            raise SchemaError(f"{where} must be an object")
        for key, value in node.items():
            validate_nested(value, f"{where}.{key}", depth - 1)
        return
    if isinstance(node, dict):  # asr {kind: x}, ood {set: x}, ratios {metric: x}
        for key, value in node.items():
            if not is_number_or_null(value):
                raise SchemaError(f"{where}.{key} must be a number or null, got {type(value).__name__}")
    elif not is_number_or_null(node):
        raise SchemaError(f"{where} must be a number or null, got {type(node).__name__}")


def is_number_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def merge_evals(folders: list[tuple[Path, dict[str, Any]]]) -> EvalData:
    """Merge summaries in order: models by label and tasks by name; a later folder adds or overrides values."""
    data = EvalData()
    for path, raw in folders:
        ref = raw.get("reference")
        data.sources.append({"path": str(path), "created": raw.get("created"), "device": raw.get("device"), "reference": ref})
        if ref:
            if data.reference is None:
                data.reference = ref
            if ref not in data.references:
                data.references.append(ref)
        for model in raw["models"]:
            entry = data.models.setdefault(model["label"], {})
            entry.update(model)
            entry["base"] = path  # a relative model path is also tried against the folder that named it
        for task in raw["tasks"]:
            data.tasks.setdefault(task["name"], {}).update(task)
        for name in SECTIONS:
            _deep_merge(data.sections[name], raw[name])
    return data


def _deep_merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


# ----------------------------------------------------------------------------- run folders


@dataclass
class RunData:
    """One distillation run: its recipe, its metrics rows, and final_metrics.json when the run finished."""

    path: Path
    name: str
    recipe: dict[str, Any]
    train_rows: list[dict[str, Any]]
    val_rows: list[dict[str, Any]]
    final: Optional[dict[str, Any]]
    truncated_last_line: bool = False  # a run still writing can leave half a line at the end

    def method(self) -> str:
        return describe_method(self.recipe)


def load_run_folder(path: Path) -> RunData:
    """Read a run folder; a malformed line (other than a half-written last one) is an error naming file and line."""
    cfg_file = path / "resolved_config.yaml"
    try:
        recipe = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{cfg_file}: cannot read ({err})") from None
    except yaml.YAMLError as err:
        raise DataError(f"{cfg_file}: not valid YAML ({getattr(err, 'problem', None) or type(err).__name__})") from None
    if not isinstance(recipe, dict):
        raise DataError(f"{cfg_file}: expected a mapping of recipe sections")

    metrics_file = path / "metrics.jsonl"
    lines = metrics_file.read_text(encoding="utf-8").splitlines()
    train_rows, val_rows, truncated = [], [], False
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    for pos, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("expected an object with an integer step")
        except ValueError as err:
            if pos == len(numbered) - 1 and not line.rstrip().endswith("}"):
                truncated = True  # the run was writing this line when we read the file
                continue
            raise DataError(f"{metrics_file}:{lineno}: malformed metrics row ({err})") from None
        if any(key.startswith("val/") for key in row):
            val_rows.append(row)
        if any(key.startswith("loss/") for key in row):
            train_rows.append(row)

    final = None
    final_file = path / "final_metrics.json"
    if final_file.is_file():
        try:
            final = json.loads(final_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{final_file}: malformed JSON: {err.msg} at line {err.lineno}") from None
        if not isinstance(final, dict) or not all(isinstance(final.get(k, {}), dict) for k in ("before", "after")):
            raise DataError(f"{final_file}: expected {{steps, before: {{...}}, after: {{...}}}}")
    return RunData(path=path, name=path.resolve().name or str(path), recipe=recipe, train_rows=train_rows,
                   val_rows=val_rows, final=final, truncated_last_line=truncated)


def describe_method(recipe: dict[str, Any]) -> str:
    """A short name for a recipe's objective, e.g. `0.9·forward_kl + 0.1·ce (T=2); 10 layers kept`."""
    loss = recipe.get("loss") or {}
    if isinstance(loss, list):  # the recipe shorthand `loss: [terms]`
        loss = {"terms": loss}
    terms = loss.get("terms") if isinstance(loss, dict) else None
    parts, temps = [], set()
    for term in terms if isinstance(terms, list) else []:
        if not isinstance(term, dict) or not term.get("name"):
            continue
        name = str(term["name"])
        weight = term.get("weight", 1.0)
        extra = ""
        if name == "jsd":
            extra = f"(β={_g(term.get('beta') if term.get('beta') is not None else loss.get('beta', 0.5))})"
        elif name.startswith("skew_"):
            extra = f"(α={_g(term.get('skew') if term.get('skew') is not None else loss.get('skew', 0.1))})"
        if name != "ce":
            temps.add(term.get("temperature") if term.get("temperature") is not None else loss.get("temperature", 1.0))
        parts.append(f"{_g(weight)}·{name}{extra}" if len(terms) > 1 else f"{name}{extra}")
    text = " + ".join(parts) if parts else "unknown objective"
    if len(temps) == 1 and None not in temps:
        text += f" (T={_g(next(iter(temps)))})"
    student = recipe.get("student") or {}
    keep, prune = student.get("keep_layers"), student.get("prune") or {}
    method = prune.get("method") if isinstance(prune, dict) and prune.get("method") not in (None, "uniform") else None
    if isinstance(keep, int) and not isinstance(keep, bool):
        text += f"; {keep} layers kept" + (f" by {method}" if method else "")
    elif isinstance(keep, list):
        text += f"; layers {','.join(str(k) for k in keep)} kept"
    widths = [f"{label} {prune[key]}" for key, label in (("intermediate_size", "MLP"), ("num_key_value_heads", "KV"),
                                                        ("hidden_size", "hidden")) if isinstance(prune, dict) and prune.get(key)]
    if widths:
        text += f"; width {', '.join(widths)}"
    return text


def _g(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


# ----------------------------------------------------------------------------- both


@dataclass
class Inputs:
    evals: Optional[EvalData]
    runs: list[RunData]
    run_of_model: dict[str, RunData]  # eval label -> the run that produced that model, when it can be told
    compares: list["CompareData"] = field(default_factory=list)  # `kdlm compare` folders (compare.json)


def load_inputs(paths: list[str | Path]) -> Inputs:
    """Classify and load every input path; a path that is none of the three kinds of folder is a DataError.

    A compare folder (compare.json) is read on its own: its per-variant eval folders are not merged into
    the evaluation sections, and its run folders only feed its own training curves.
    """
    from kdlm.report.compare_section import is_compare_folder, load_compare_folder

    if not paths:
        raise DataError("no input folders given (pass evaluation, run and/or compare folders)")
    evals: list[tuple[Path, dict[str, Any]]] = []
    runs: list[RunData] = []
    compares: list[CompareData] = []
    for item in paths:
        path = Path(item)
        if not path.exists():
            raise DataError(f"{path}: no such folder")
        if not path.is_dir():
            raise DataError(f"{path}: not a folder (expected an evaluation, run or compare folder)")
        if is_compare_folder(path):
            compares.append(load_compare_folder(path))
            continue
        as_eval, as_run = is_eval_folder(path), is_run_folder(path)
        if not (as_eval or as_run):
            raise DataError(f"{path}: neither an evaluation folder (summary.json) nor a distillation run folder "
                            f"(resolved_config.yaml + metrics.jsonl) nor a compare folder (compare.json)")
        if as_eval:
            evals.append((path, load_eval_folder(path)))
        if as_run:
            runs.append(load_run_folder(path))
    _unique_run_names(runs)
    data = merge_evals(evals) if evals else None
    return Inputs(evals=data, runs=runs, run_of_model=_match_runs(data, runs) if data else {}, compares=compares)


def _unique_run_names(runs: list[RunData]) -> None:
    """Two runs called `qs` in different parents become `a/qs` and `b/qs`."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.name] = counts.get(run.name, 0) + 1
    for run in runs:
        if counts[run.name] > 1:
            resolved = run.path.resolve()
            run.name = f"{resolved.parent.name}/{resolved.name}"
    seen: dict[str, int] = {}
    for run in runs:  # still equal (the same folder twice): number them
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} ({seen[run.name]})"


def _match_runs(data: EvalData, runs: list[RunData]) -> dict[str, RunData]:
    """Tie an evaluated model to its run: its path is the run folder or lies inside it; else label == run name."""
    matched: dict[str, RunData] = {}
    run_dirs = [(run, run.path.resolve()) for run in runs]
    for label, model in data.models.items():
        raw = model.get("path")
        if not raw:
            continue
        candidates = [Path(raw)] if Path(raw).is_absolute() else [Path.cwd() / raw, Path(model.get("base", ".")) / raw]
        for run, run_dir in run_dirs:
            if any(_inside(c, run_dir) for c in candidates):
                matched[label] = run
                break
    for label in data.labels():
        if label not in matched:
            for run in runs:
                if run.name == label or run.path.name == label:
                    matched[label] = run
    return matched


def _inside(candidate: Path, run_dir: Path) -> bool:
    try:
        resolved = candidate.resolve()
    except OSError:
        return False
    return resolved == run_dir or run_dir in resolved.parents


def number(value: Any) -> Optional[float]:
    """A finite float, or None for null / NaN / inf / non-numbers (shown as n/a, never ranked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None
