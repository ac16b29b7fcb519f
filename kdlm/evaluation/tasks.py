"""Evaluation tasks: small YAML files (docs/reference/task_files.md) read into `Task`, and their examples.

A task names a data set (a file relative to --data-dir, an absolute path, or a hub id), how a prompt and a reference
are built from each row, and how predictions are scored. Built-in tasks live in kdlm/evaluation/tasks/*.yaml; any
other `--task` value that is a path to a .yaml file is read the same way. Errors name the file and the field
(ConfigError) or the data file and the line (DataError).
"""

from __future__ import annotations

import csv
import difflib
import json
import re
import string
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from kdlm.errors import ConfigError, DataError

BUILTIN_DIR = Path(__file__).parent / "tasks"
TASK_TYPES = ("generation", "classification", "perplexity")
METRICS_BY_TYPE = {
    "generation": ("rouge_l", "exact_match", "token_f1", "accuracy"),
    "classification": ("accuracy", "balanced_accuracy"),
    "perplexity": ("perplexity", "ce"),
}
DEFAULT_METRICS = {"generation": ["rouge_l"], "classification": ["accuracy", "balanced_accuracy"], "perplexity": ["perplexity", "ce"]}
FORMATS = ("chat", "plain")
EXTRACTS = ("none", "number")
PERTURBATION_KINDS = ("char", "word", "sentence")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".txt", ".parquet")
DEFAULT_STRIP = ["<|endoftext|>"]
MAX_DERIVED_OPTIONS = 10

Messages = list[dict[str, str]]
Context = Union[str, Messages]  # plain text, or chat messages ending with the user turn


# ----------------------------------------------------------------------------- the task description


@dataclass(frozen=True)
class DataSpec:
    """Where the rows come from and how each becomes (user text, reference). OOD and adversarial sets are DataSpecs
    that override some of these keys of their task."""

    source: str
    split: str = "test"
    subset: Optional[str] = None
    explode: Optional[str] = None
    template: str = "{prompt}"
    reference: str = "{completion}"
    label_names: Union[list, dict, None] = None
    options: Optional[tuple[str, ...]] = None
    input_field: Optional[str] = None
    input_pattern: Optional[str] = None
    strip: tuple[str, ...] = tuple(DEFAULT_STRIP)


DATA_KEYS = tuple(f.name for f in fields(DataSpec))


@dataclass(frozen=True)
class FewShot:
    k: int
    data: DataSpec  # source/template/reference of the shots (defaults: the task's template and reference)
    rewrite: tuple[tuple[str, str], ...] = ()  # regex substitutions applied to each shot's answer
    separator: str = "\n\n"  # plain format: between shots


@dataclass(frozen=True)
class RobustnessSpec:
    enabled: bool = True
    kinds: tuple[str, ...] = PERTURBATION_KINDS
    rate: float = 0.1  # share of the input's words that char/word perturbations touch (at least one)


@dataclass(frozen=True)
class Task:
    name: str
    type: str
    data: DataSpec
    metrics: tuple[str, ...]
    description: str = ""
    file: Optional[str] = None
    format: str = "chat"
    system: Optional[str] = None
    max_new_tokens: int = 128
    limit: Optional[int] = None  # examples of each of its sets, at most (--limit lowers it further)
    stop: tuple[str, ...] = ()
    extract: str = "none"
    option_score: str = "sum"
    option_prefix: str = ""
    agreement_on: str = "teacher"
    few_shot: Optional[FewShot] = None
    ood: dict[str, DataSpec] = field(default_factory=dict)
    adversarial: dict[str, DataSpec] = field(default_factory=dict)
    robustness: RobustnessSpec = RobustnessSpec()

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    @property
    def has_correctness(self) -> bool:
        """Whether each example is simply right or wrong (needed for attack success rates)."""
        return self.type == "classification" or (self.type == "generation" and
                                                 any(m in ("accuracy", "exact_match") for m in self.metrics))


TOP_KEYS = {"name", "description", "type", "metrics", "format", "system", "max_new_tokens", "limit", "stop", "extract",
            "option_score", "option_prefix", "agreement_on", "few_shot", "ood", "adversarial", "robustness"} | set(DATA_KEYS)
FEW_SHOT_KEYS = {"k", "rewrite", "separator"} | set(DATA_KEYS)
ROBUSTNESS_KEYS = {"enabled", "kinds", "rate"}


def builtin_task_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def resolve_task(name_or_path: str) -> Task:
    """A built-in task by name, or a task file by path; ConfigError with the nearest built-in name otherwise."""
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"task file {name_or_path}: not found")
        return load_task_file(path)
    builtin = BUILTIN_DIR / f"{name_or_path}.yaml"
    if builtin.is_file():
        return load_task_file(builtin)
    names = builtin_task_names()
    close = difflib.get_close_matches(name_or_path, names, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown task {name_or_path!r}{hint} (built-in tasks: {', '.join(names)}; "
                      f"or give a path to a task .yaml file)")


def load_task_file(path: Path) -> Task:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a task file must be a mapping of fields (name, type, source, ...)")
    return parse_task(raw, path.stem, str(path))


class _Fields:
    """Typed access to one mapping of a task file, with errors naming the file and the field."""

    def __init__(self, raw: dict, where: str, prefix: str = ""):
        self.raw, self.where, self.prefix = raw, where, prefix

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.where}: field '{self.prefix}{key}' {msg}")

    def check_keys(self, allowed: set[str]) -> None:
        for key in self.raw:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                hint = f"; did you mean '{self.prefix}{close[0]}'?" if close else ""
                raise ConfigError(f"{self.where}: unknown field '{self.prefix}{key}'{hint}")

    def get(self, key: str, kind, default=None, *, required: bool = False, choices=None):
        if key not in self.raw or self.raw[key] is None:
            if required:
                raise ConfigError(f"{self.where}: missing field '{self.prefix}{key}'")
            return default
        value = self.raw[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(key, f"must be a {names} (got {type(value).__name__} {value!r})")
        if choices is not None and value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)} (got {value!r})")
        return value

    def str_list(self, key: str, default=None) -> Optional[tuple[str, ...]]:
        value = self.raw.get(key)
        if value is None:
            return default
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and any(isinstance(v, bool) for v in value):
            raise self.fail(key, f"has a YAML boolean ({value!r}): quote words such as 'yes', 'no', 'on', 'off', "
                                 f"'true' and 'false'")
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            raise self.fail(key, f"must be a list of strings (got {value!r})")
        return tuple(str(v) for v in value)


def _template_fields(template: str, f: _Fields, key: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise f.fail(key, f"is not a valid template ({err}); write literal braces as {{{{ and }}}}") from None


def _parse_data(f: _Fields, base: Optional[DataSpec]) -> DataSpec:
    """The data keys of a mapping, over `base` (the task's own data for OOD/adversarial/few-shot sets)."""
    values: dict[str, Any] = {}
    raw_source = f.raw.get("source")
    if isinstance(raw_source, list):  # several files read as one set, e.g. two single-class files made balanced
        if len(raw_source) < 2 or not all(isinstance(x, str) and x for x in raw_source):
            raise f.fail("source", "a list of sources needs at least two file names")
        values["source"] = " + ".join(raw_source)
    for key in ("source", "split", "subset", "explode", "template", "reference", "input_field", "input_pattern"):
        value = f.get(key, str) if not (key == "source" and "source" in values) else None
        if value is not None:
            values[key] = value
    if base is None and "source" not in values:
        raise ConfigError(f"{f.where}: missing field '{f.prefix}source'")
    for key in ("template", "reference"):
        if key in values:
            names = _template_fields(values[key], f, key)
            if any(not name or not re.fullmatch(r"\w+", name) for name in names):
                raise f.fail(key, "may only use plain {field} placeholders")
    options = f.str_list("options")
    if options is not None:
        if len(options) < 2:
            raise f.fail("options", "needs at least two options")
        values["options"] = options
    strip = f.str_list("strip")
    if strip is not None:
        values["strip"] = strip
    if "label_names" in f.raw and f.raw["label_names"] is not None:
        names = f.raw["label_names"]
        if isinstance(names, list):
            values["label_names"] = [str(n) for n in names]
        elif isinstance(names, dict):
            values["label_names"] = {str(k): str(v) for k, v in names.items()}
        else:
            raise f.fail("label_names", "must be a list (index -> name) or a mapping (value -> name)")
    if "input_pattern" in values:
        try:
            pattern = re.compile(values["input_pattern"])
        except re.error as err:
            raise f.fail("input_pattern", f"is not a valid regular expression ({err})") from None
        if "input" not in pattern.groupindex:
            raise f.fail("input_pattern", "needs a named group (?P<input>...) marking the part to perturb")
    return replace(base, **values) if base is not None else DataSpec(**values)


def parse_task(raw: dict, default_name: str, where: str) -> Task:
    f = _Fields(raw, where)
    f.check_keys(TOP_KEYS)
    task_type = f.get("type", str, required=True, choices=TASK_TYPES)
    name = f.get("name", str, default_name)
    data = _parse_data(f, None)
    metrics = f.str_list("metrics", tuple(DEFAULT_METRICS[task_type]))
    for metric in metrics:
        if metric not in METRICS_BY_TYPE[task_type]:
            raise f.fail("metrics", f"has {metric!r}, not a metric of {task_type} tasks "
                                    f"({', '.join(METRICS_BY_TYPE[task_type])})")
    extract = f.get("extract", str, "none", choices=EXTRACTS)
    if "accuracy" in metrics and task_type == "generation" and extract == "none":
        raise f.fail("metrics", "has 'accuracy' for a generation task, which needs an answer `extract` rule "
                                "(e.g. extract: number); use exact_match to compare whole answers")
    max_new = f.get("max_new_tokens", int, 128)
    if max_new < 1:
        raise f.fail("max_new_tokens", f"must be >= 1 (got {max_new})")
    limit = f.get("limit", int)
    if limit is not None and limit < 1:
        raise f.fail("limit", f"must be >= 1 (got {limit})")
    task = Task(
        name=name, type=task_type, data=data, metrics=metrics, file=where,
        description=f.get("description", str, ""),
        format=f.get("format", str, "plain" if task_type == "perplexity" else "chat", choices=FORMATS),
        system=f.get("system", str),
        max_new_tokens=max_new,
        limit=limit,
        stop=f.str_list("stop", ()),
        extract=extract,
        option_score=f.get("option_score", str, "sum", choices=("sum", "mean")),
        option_prefix=f.get("option_prefix", str, ""),
        agreement_on=f.get("agreement_on", str, "teacher" if task_type == "generation" else "reference",
                           choices=("teacher", "reference")),
    )
    if task_type != "classification" and data.options:
        raise f.fail("options", "is only for classification tasks")
    # few-shot examples
    shots = raw.get("few_shot")
    if shots is not None:
        if not isinstance(shots, dict):
            raise f.fail("few_shot", "must be a mapping (k, source, ...)")
        sf = _Fields(shots, where, "few_shot.")
        sf.check_keys(FEW_SHOT_KEYS)
        k = sf.get("k", int, required=True)
        if k < 0:
            raise sf.fail("k", f"must be >= 0 (got {k})")
        rewrite = shots.get("rewrite") or []
        if not isinstance(rewrite, list) or not all(isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r)
                                                    for r in rewrite):
            raise sf.fail("rewrite", "must be a list of [pattern, replacement] pairs")
        for pattern, _ in rewrite:
            try:
                re.compile(pattern)
            except re.error as err:
                raise sf.fail("rewrite", f"pattern {pattern!r} is not a valid regular expression ({err})") from None
        base = replace(data, source=sf.get("source", str, required=True))
        task = replace(task, few_shot=FewShot(k=k, data=_parse_data(sf, base), rewrite=tuple(tuple(r) for r in rewrite),
                                              separator=sf.get("separator", str, "\n\n")))
    # OOD and static adversarial sets
    for section in ("ood", "adversarial"):
        sets = raw.get(section)
        if sets is None:
            continue
        if not isinstance(sets, dict) or not sets:
            raise f.fail(section, "must be a mapping of set name -> data file (or a mapping of data fields)")
        parsed = {}
        for set_name, value in sets.items():
            if isinstance(value, str):
                value = {"source": value}
            if not isinstance(value, dict):
                raise f.fail(f"{section}.{set_name}", "must be a data file or a mapping of data fields")
            sub = _Fields(value, where, f"{section}.{set_name}.")
            sub.check_keys(set(DATA_KEYS))
            if "source" not in value:
                raise ConfigError(f"{where}: missing field '{section}.{set_name}.source'")
            # a set's options come from its own file unless listed: drop the task's
            parsed[str(set_name)] = _parse_data(sub, replace(data, options=None))
        task = replace(task, **{section: parsed})
    rob = raw.get("robustness")
    if rob is not None:
        if isinstance(rob, bool):
            task = replace(task, robustness=RobustnessSpec(enabled=rob))
        elif isinstance(rob, dict):
            rf = _Fields(rob, where, "robustness.")
            rf.check_keys(ROBUSTNESS_KEYS)
            kinds = rf.str_list("kinds", PERTURBATION_KINDS)
            for kind in kinds:
                if kind not in PERTURBATION_KINDS:
                    raise rf.fail("kinds", f"has {kind!r}; perturbation kinds are {', '.join(PERTURBATION_KINDS)}")
            rate = rf.get("rate", float, 0.1)
            if not 0 < rate <= 1:
                raise rf.fail("rate", f"must be in (0, 1] (got {rate})")
            task = replace(task, robustness=RobustnessSpec(enabled=rf.get("enabled", bool, True), kinds=kinds, rate=rate))
        else:
            raise f.fail("robustness", "must be true/false or a mapping (enabled, kinds, rate)")
    return task


# ----------------------------------------------------------------------------- reading data


def is_hub_source(source: str) -> bool:
    return source.startswith("hf:") or (not source.lower().endswith(FILE_SUFFIXES) and not Path(source).expanduser().is_absolute()
                                        and not source.startswith((".", "~")) and source.count("/") <= 1
                                        and not Path(source).suffix)


def source_path(source: str, data_dir: Path) -> Path:
    path = Path(source).expanduser()
    return path if path.is_absolute() else Path(data_dir) / path


def read_rows(spec: DataSpec, data_dir: Path, task_name: str) -> list[tuple[str, dict]]:
    """(where, row) pairs: `where` is "FILE line N" for error messages. Rows are exploded when `explode` is set.
    A source listing several files ("a.jsonl + b.jsonl", from a YAML list) interleaves their rows (first row of
    each, then the second of each, ...), so that --limit keeps every file's share."""
    if " + " in spec.source:
        parts = [read_rows(replace(spec, source=part), data_dir, task_name) for part in spec.source.split(" + ")]
        return [rows[i] for i in range(max(map(len, parts))) for rows in parts if i < len(rows)]
    path = source_path(spec.source, data_dir)
    if is_hub_source(spec.source) and not path.is_file():
        rows = _read_hub(spec, task_name)
    else:
        if not path.is_file():
            rel = "" if Path(spec.source).expanduser().is_absolute() else f" (source {spec.source!r} is relative to --data-dir {data_dir})"
            raise DataError(f"task {task_name}: data file {path} not found{rel}")
        rows = _read_file(path, spec.subset)
    if spec.explode:
        out = []
        for where, row in rows:
            items = row.get(spec.explode)
            if not isinstance(items, list):
                raise DataError(f"{where}: field {spec.explode!r} (explode) is missing or not a list")
            for j, item in enumerate(items):
                if not isinstance(item, dict):
                    raise DataError(f"{where}: {spec.explode}[{j}] is not an object")
                out.append((f"{where} {spec.explode}[{j}]", {**{k: v for k, v in row.items() if k != spec.explode}, **item}))
        rows = out
    return rows


def _read_file(path: Path, subset: Optional[str]) -> list[tuple[str, dict]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path} line {n}: not valid JSON ({err.msg})") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path} line {n}: expected a JSON object")
                    rows.append((f"{path} line {n}", row))
            return rows
        if suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
            if isinstance(data, dict):  # AdvGLUE: {"sst2": [...], "mnli": [...]}
                if subset is None:
                    raise DataError(f"{path}: a JSON object of sets ({', '.join(map(str, data))}); name one with `subset`")
                if subset not in data:
                    raise DataError(f"{path}: no set {subset!r} (has {', '.join(map(str, data))})")
                data, where = data[subset], f"{path} [{subset}]"
            else:
                where = str(path)
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise DataError(f"{where}: expected a list of JSON objects")
            return [(f"{where} item {i + 1}", r) for i, r in enumerate(data)]
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as fh:
                return [(f"{path} line {i + 2}", dict(r)) for i, r in enumerate(csv.DictReader(fh))]
        if suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [(f"{path} line {i + 1}", {"text": line}) for i, line in enumerate(lines) if line.strip()]
        if suffix == ".parquet":
            from datasets import Dataset

            ds = Dataset.from_parquet(str(path))
            return [(f"{path} row {i + 1}", dict(r)) for i, r in enumerate(ds)]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    raise DataError(f"{path}: unsupported data file type {suffix!r} (use {', '.join(FILE_SUFFIXES)})")


def _read_hub(spec: DataSpec, task_name: str) -> list[tuple[str, dict]]:
    name = spec.source[3:] if spec.source.startswith("hf:") else spec.source
    try:
        from datasets import load_dataset

        ds = load_dataset(name, spec.subset, split=spec.split)
    except Exception as err:  # network, unknown set, unknown split: all reported on one line
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"task {task_name}: cannot load hub data set {name!r} (split {spec.split!r}): {text}") from None
    return [(f"{name}[{spec.split}] row {i + 1}", dict(r)) for i, r in enumerate(ds)]


# ----------------------------------------------------------------------------- examples


@dataclass
class Example:
    """One evaluation item: its row, the rendered user text, the reference, and where it came from."""

    index: int
    fields: dict
    user: str
    reference: str
    where: str = ""


def render(template: str, row: dict, where: str, key: str) -> str:
    try:
        return template.format_map(_RowView(row))
    except KeyError as err:
        raise DataError(f"{where}: field {err.args[0]!r} missing (the task's {key} uses {{{err.args[0]}}}; "
                        f"the row has {', '.join(map(str, row)) or 'no fields'})") from None


class _RowView(dict):
    """format_map view that renders None as an empty string."""

    def __init__(self, row: dict):
        super().__init__({k: ("" if v is None else v) for k, v in row.items()})


def make_reference(spec: DataSpec, row: dict, where: str) -> str:
    ref = render(spec.reference, row, where, "reference")
    if spec.label_names is not None:
        names = spec.label_names
        if isinstance(names, list):
            try:
                ref = names[int(ref)]
            except (ValueError, IndexError):
                raise DataError(f"{where}: label {ref!r} is not an index into label_names ({len(names)} names)") from None
        else:
            if ref not in names:
                raise DataError(f"{where}: label {ref!r} is not a key of label_names ({', '.join(names)})")
            ref = names[ref]
    for suffix in spec.strip:
        if suffix and ref.endswith(suffix):
            ref = ref[: -len(suffix)]
    return ref.strip()


def load_examples(spec: DataSpec, data_dir: Path, task_name: str, limit: Optional[int] = None) -> list[Example]:
    rows = read_rows(spec, data_dir, task_name)
    if not rows:
        raise DataError(f"task {task_name}: data set {spec.source} has no rows")
    examples = []
    for i, (where, row) in enumerate(rows if limit is None else rows[:limit]):
        if spec.input_field is not None and spec.input_field not in row:
            raise DataError(f"{where}: input_field {spec.input_field!r} missing (the row has {', '.join(map(str, row))})")
        user = render(spec.template, row, where, "template").strip()
        examples.append(Example(i, row, user, make_reference(spec, row, where), where))
    return examples


def class_options(spec: DataSpec, data_dir: Path, task_name: str, fallback: Optional[tuple[str, ...]] = None) -> tuple[str, ...]:
    """The options of a classification set: listed in the task file, else the distinct references of the WHOLE file
    (so --limit does not change them) when there are 2..10 of them, else `fallback` (the task's own options)."""
    if spec.options:
        return spec.options
    refs = sorted({make_reference(spec, row, where) for where, row in read_rows(spec, data_dir, task_name)})
    if 2 <= len(refs) <= MAX_DERIVED_OPTIONS:
        return tuple(refs)
    if fallback:
        return fallback
    shown = ", ".join(repr(r) for r in refs[:3]) + (", ..." if len(refs) > 3 else "")
    raise ConfigError(f"task {task_name}: cannot derive the options from {spec.source}: it has {len(refs)} distinct "
                      f"reference(s) ({shown}), options are derived for 2 to {MAX_DERIVED_OPTIONS}; list them under `options:`")


def match_option(reference: str, options: tuple[str, ...], where: str) -> int:
    """The index of `reference` among the options: exact, else ignoring case and surrounding spaces."""
    if reference in options:
        return options.index(reference)
    folded = [o.strip().lower() for o in options]
    key = reference.strip().lower()
    if key in folded:
        return folded.index(key)
    raise DataError(f"{where}: reference {reference!r} is not one of the options ({', '.join(map(repr, options))})")


def few_shot_turns(task: Task, data_dir: Path) -> list[tuple[str, str]]:
    """The (user, assistant) pairs of the task's few-shot examples: the first k rows of the few-shot source."""
    if task.few_shot is None or task.few_shot.k == 0:
        return []
    shots = load_examples(task.few_shot.data, data_dir, task.name, limit=task.few_shot.k)
    if len(shots) < task.few_shot.k:
        raise DataError(f"task {task.name}: few_shot.k is {task.few_shot.k} but {task.few_shot.data.source} has {len(shots)} rows")
    turns = []
    for shot in shots:
        answer = shot.reference
        for pattern, repl in task.few_shot.rewrite:
            answer = re.sub(pattern, repl, answer)
        turns.append((shot.user, answer.strip()))
    return turns


def build_context(task: Task, user: str, shots: list[tuple[str, str]]) -> Context:
    """Chat messages (system, few-shot turns, the user turn) or, for the plain format, one text."""
    if task.format == "chat":
        messages: Messages = [{"role": "system", "content": task.system}] if task.system else []
        for u, a in shots:
            messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return messages + [{"role": "user", "content": user}]
    sep = task.few_shot.separator if task.few_shot else "\n\n"
    parts = ([task.system] if task.system else []) + [u + a for u, a in shots] + [user]
    return sep.join(parts)


def perturbable_span(spec: DataSpec, example: Example) -> tuple[str, str, str]:
    """(before, text, after): the part of the example perturbations may change, with what surrounds it in its
    field. Without input_field it is the whole user text; with input_pattern only its `input` group."""
    if spec.input_field is None:
        return "", example.user, ""
    value = str(example.fields.get(spec.input_field, ""))
    if spec.input_pattern:
        m = re.search(spec.input_pattern, value, flags=re.DOTALL)
        if m:
            return value[: m.start("input")], m.group("input"), value[m.end("input"):]
    return "", value, ""


def with_input(spec: DataSpec, example: Example, new_text: str) -> str:
    """The user text of `example` with its perturbable span replaced by `new_text` (the template re-rendered)."""
    if spec.input_field is None:
        return new_text
    before, _, after = perturbable_span(spec, example)
    row = dict(example.fields)
    row[spec.input_field] = before + new_text + after
    return render(spec.template, row, example.where, "template").strip()
