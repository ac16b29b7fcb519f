"""A comparison grid: one base recipe, named variants of it (each a list of `--set` overrides), an equal budget,
seeds, baselines and the `kdlm eval` tasks. Everything is checked here, before anything runs:

    name: smollm2                      # the grid's name (report title, compare.json)
    description: ...
    recipe: ../../kdlm/recipes/quickstart.yaml   # relative to this file
    set: [data.max_length=256]         # applied to every variant and baseline
    budget: {kind: steps, value: 40}   # steps | tokens (counted tokens) | seconds (wall clock)
    seeds: [0]                         # each variant runs once per seed (train.seed)
    baselines: {initial: true, sft: true, teacher: true}   # or `baselines: false`
    sft: ["loss.terms=[{name: ce, weight: 1.0}]"]          # the SFT baseline's overrides (this is the default)
    setup:
      generate: {recipe: gen.yaml, set: [...]}   # `kdlm generate` once; data.train is set to its folder
      student: [--teacher, smollm2-135m-instruct, --layers, "15", --method, block_influence]  # `kdlm init-student`
    variants:
      - {name: forward_kl, description: ..., set: ["loss.terms=[...]"]}
    eval:
      tasks: [selfinst, tasks/sentiment.yaml]    # built-in names or task files (relative to this file)
      limit: 100
      robustness: true
      efficiency: true
      data_dir: ../../../shared/data             # relative to this file; default $KDLM_DATA_DIR or .
      batch_size: 8
      max_new_tokens: 128
      judge: {url: http://127.0.0.1:8765/v1, model: ...}   # optional LLM-as-judge
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from kdlm.errors import ConfigError, DataError

BUDGET_KINDS = {"steps": "train.max_steps", "tokens": "train.max_tokens", "seconds": "train.max_seconds"}
BUDGET_FIELDS = ("train.max_steps", "train.max_tokens", "train.max_seconds")
RESERVED = {"teacher", "initial", "sft"}
SFT_DEFAULT = ["loss.terms=[{name: ce, weight: 1.0}]"]
TOP_KEYS = {"name", "description", "recipe", "set", "budget", "seeds", "baselines", "sft", "setup", "variants", "eval"}
EVAL_KEYS = {"tasks", "limit", "robustness", "efficiency", "data_dir", "batch_size", "max_new_tokens", "judge", "dtype"}
NAME = re.compile(r"^[A-Za-z0-9][\w.+-]*$")


@dataclass(frozen=True)
class Budget:
    kind: str
    value: float

    @property
    def field(self) -> str:
        return BUDGET_KINDS[self.kind]

    def override(self) -> str:
        value = int(self.value) if self.kind != "seconds" else self.value
        return f"{self.field}={value}"

    def describe(self, recipe: Any = None) -> str:
        unit = {"steps": "optimizer steps", "tokens": "counted tokens", "seconds": "seconds of training"}[self.kind]
        text = f"{self.value:g} {unit}"
        if recipe is not None:
            t, d = recipe.train, recipe.data
            text += f" ({t.batch_size} x {t.grad_accum} sequences of <= {d.max_length} tokens per step"
            text += f", LR {t.learning_rate:g} {t.lr_scheduler})" if self.kind == "steps" else ")"
        return text


@dataclass(frozen=True)
class Variant:
    name: str
    role: str  # method | sft | initial | teacher
    description: str = ""
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalSpec:
    tasks: tuple[str, ...]
    limit: Optional[int] = None
    robustness: bool = False
    efficiency: bool = False
    data_dir: Optional[str] = None
    batch_size: int = 8
    max_new_tokens: Optional[int] = None
    dtype: str = "auto"
    judge: Optional[dict] = None


@dataclass(frozen=True)
class Setup:
    generate: Optional[str] = None  # a `kdlm generate` recipe file
    generate_set: tuple[str, ...] = ()
    student: tuple[str, ...] = ()  # `kdlm init-student` arguments (without --output)


@dataclass
class Grid:
    name: str
    file: Path
    recipe: Path
    budget: Budget
    variants: list[Variant]
    eval: EvalSpec
    description: str = ""
    common: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    baselines: dict[str, bool] = field(default_factory=lambda: {"initial": True, "sft": True, "teacher": True})
    setup: Setup = Setup()
    teacher: str = ""  # the base recipe's teacher.model

    @property
    def trained(self) -> list[Variant]:
        return [v for v in self.variants if v.role in ("method", "sft")]

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    @property
    def baseline(self) -> Optional[str]:
        """The variant differences are taken against: SFT, else the initial student."""
        return "sft" if self.baselines.get("sft") else "initial" if self.baselines.get("initial") else None


def _fail(path: Path, where: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {where}: {message}")


def _str_list(path: Path, where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise _fail(path, where, "must be a list of strings")
    return tuple(str(v) for v in value)


def _relative(path: Path, value: str) -> Path:
    p = Path(os.path.expandvars(value)).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else (path.parent / p)))


def load_grid(path: str | Path, *, print_commands: bool = False, check_data: bool = True) -> Grid:
    """Parse and check a grid file: every variant's recipe is loaded with its overrides (an unknown field is an
    error naming the variant), names are unique, the budget is one the run can honour, and every eval task and
    its data exist. Raises ConfigError/DataError with one line naming the file and field."""
    from kdlm.config.load import load_recipe

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: grid file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise ConfigError(f"{path}:{f' line {mark.line + 1}' if mark else ''} is not valid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a grid must be a mapping (name, recipe, budget, variants, eval, ...)")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise _fail(path, unknown[0], f"unknown key (known: {', '.join(sorted(TOP_KEYS))})")
    name = raw.get("name") or path.stem
    if not isinstance(name, str) or not NAME.match(name):
        raise _fail(path, "name", f"{name!r} must be letters, digits, '.', '_', '+' or '-'")
    if not raw.get("recipe"):
        raise _fail(path, "recipe", "missing: the base recipe every variant overrides")
    recipe = _relative(path, str(raw["recipe"]))
    if not recipe.is_file():
        raise _fail(path, "recipe", f"{recipe}: not found")
    common = _str_list(path, "set", raw.get("set"))

    budget = _budget(path, raw.get("budget"), print_commands)
    for item in common:
        if item.partition("=")[0].strip() in BUDGET_FIELDS:
            raise _fail(path, "set", f"{item!r} sets a budget field; the grid's `budget` sets it for every variant")

    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _fail(path, "seeds", "must be a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise _fail(path, "seeds", "has a seed twice")

    baselines = {"initial": True, "sft": True, "teacher": True}
    b = raw.get("baselines", True)
    if b is False:
        baselines = dict.fromkeys(baselines, False)
    elif isinstance(b, dict):
        for key, value in b.items():
            if key not in baselines or not isinstance(value, bool):
                raise _fail(path, f"baselines.{key}", "known baselines are initial, sft, teacher (true/false)")
            baselines[key] = value
    elif b is not True:
        raise _fail(path, "baselines", "must be true, false or a mapping {initial, sft, teacher}")

    setup = _setup(path, raw.get("setup"))
    variants: list[Variant] = []
    if baselines["teacher"]:
        variants.append(Variant("teacher", "teacher", "the teacher itself"))
    if baselines["initial"]:
        variants.append(Variant("initial", "initial", "the student before training"))
    if baselines["sft"]:
        sft = _str_list(path, "sft", raw.get("sft")) or tuple(SFT_DEFAULT)
        variants.append(Variant("sft", "sft", "SFT on the same data (cross-entropy only)", sft))
    elif raw.get("sft") is not None:
        raise _fail(path, "sft", "given but the sft baseline is turned off")
    items = raw.get("variants")
    if not isinstance(items, list) or not items:
        raise _fail(path, "variants", "must be a non-empty list of {name, set, description}")
    for i, item in enumerate(items):
        where = f"variants[{i}]"
        if not isinstance(item, dict):
            raise _fail(path, where, "must be a mapping {name, set, description}")
        extra = sorted(set(item) - {"name", "set", "description"})
        if extra:
            raise _fail(path, f"{where}.{extra[0]}", "unknown key (known: name, set, description)")
        vname = item.get("name")
        if not isinstance(vname, str) or not NAME.match(vname):
            raise _fail(path, f"{where}.name", f"{vname!r} must be letters, digits, '.', '_', '+' or '-'")
        if any(v.name == vname for v in variants):
            clash = "a baseline's name" if vname in RESERVED else "given twice"
            raise _fail(path, f"{where}.name", f"{vname!r} is {clash}; variant names must be unique")
        overrides = _str_list(path, f"{where}.set", item.get("set"))
        for o in overrides:
            if o.partition("=")[0].strip() in BUDGET_FIELDS:
                raise _fail(path, f"{where}.set", f"{o!r} sets a budget field; every variant gets the grid's budget")
        variants.append(Variant(vname, "method", str(item.get("description") or ""), overrides))

    # every trained variant's recipe, resolved as it will run (unknown fields, bad values: named per variant)
    base = None
    for v in variants:
        if v.role not in ("method", "sft"):
            continue
        try:
            resolved = load_recipe(recipe, [*common, *variant_fixed_overrides(setup), *v.overrides, budget.override()])
        except ConfigError as err:
            raise ConfigError(f"{path}: variant {v.name!r}: {err}") from None
        base = base or resolved
    if base is None:
        base = load_recipe(recipe, [*common, budget.override()])
    if baselines["initial"] and not setup.student and (base.student.keep_layers is not None or base.student.prune.scored):
        raise _fail(path, "setup.student", "the initial-student baseline needs the student made once by "
                                           "`kdlm init-student` (setup.student), since the recipe builds it at load")
    grid_eval = _eval(path, raw.get("eval"), check_data)
    return Grid(name=name, file=path, recipe=recipe, budget=budget, variants=variants, eval=grid_eval,
                description=str(raw.get("description") or ""), common=common, seeds=tuple(seeds),
                baselines=baselines, setup=setup, teacher=base.teacher.model)


def variant_fixed_overrides(setup: Setup) -> list[str]:
    """Overrides that point every trained variant at the setup's outputs (placeholders while checking)."""
    out = []
    if setup.student:
        out += ["student.model=__setup_student__", "student.keep_layers=null",
                "student.prune.method=uniform", "student.prune.intermediate_size=null",
                "student.prune.num_key_value_heads=null", "student.prune.hidden_size=null"]
    if setup.generate:
        out += ["data.train=__setup_data__"]
    return out


def _budget(path: Path, raw: Any, print_commands: bool) -> Budget:
    if not isinstance(raw, dict) or set(raw) != {"kind", "value"}:
        raise _fail(path, "budget", "must be {kind: steps|tokens|seconds, value: N}")
    kind, value = raw["kind"], raw["value"]
    if kind not in BUDGET_KINDS:
        raise _fail(path, "budget.kind", f"{kind!r}: use steps, tokens or seconds")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise _fail(path, "budget.value", f"{value!r} must be a positive number")
    if kind != "seconds" and value != int(value):
        raise _fail(path, "budget.value", f"{value!r}: {kind} are whole numbers")
    if kind == "seconds" and print_commands:
        raise _fail(path, "budget.kind", "seconds (wall clock) cannot be equal across machines a scheduler picks; "
                                         "with --print-commands use steps or tokens")
    return Budget(kind, value)


def _setup(path: Path, raw: Any) -> Setup:
    if raw is None:
        return Setup()
    if not isinstance(raw, dict) or set(raw) - {"generate", "student"}:
        raise _fail(path, "setup", "must be a mapping with generate and/or student")
    gen, gen_set = None, ()
    if raw.get("generate") is not None:
        g = raw["generate"]
        if not isinstance(g, dict) or "recipe" not in g or set(g) - {"recipe", "set"}:
            raise _fail(path, "setup.generate", "must be {recipe: FILE, set: [...]}")
        gen_path = _relative(path, str(g["recipe"]))
        if not gen_path.is_file():
            raise _fail(path, "setup.generate.recipe", f"{gen_path}: not found")
        gen, gen_set = str(gen_path), _str_list(path, "setup.generate.set", g.get("set"))
    student = _str_list(path, "setup.student", raw.get("student"))
    if any(a == "--output" or a.startswith("--output=") for a in student):
        raise _fail(path, "setup.student", "--output is set by kdlm compare (OUT/setup/student)")
    return Setup(gen, gen_set, student)


def _eval(path: Path, raw: Any, check_data: bool) -> EvalSpec:
    from kdlm.evaluation.tasks import resolve_task

    if not isinstance(raw, dict):
        raise _fail(path, "eval", "must be a mapping with at least `tasks`")
    unknown = sorted(set(raw) - EVAL_KEYS)
    if unknown:
        raise _fail(path, f"eval.{unknown[0]}", f"unknown key (known: {', '.join(sorted(EVAL_KEYS))})")
    tasks = _str_list(path, "eval.tasks", raw.get("tasks"))
    if not tasks:
        raise _fail(path, "eval.tasks", "give at least one task")
    resolved_tasks = []
    for t in tasks:
        candidate = _relative(path, t)
        resolved_tasks.append(str(candidate) if t.endswith((".yaml", ".yml")) else t)
    data_dir = raw.get("data_dir")
    data_dir = str(_relative(path, str(data_dir))) if data_dir else (os.environ.get("KDLM_DATA_DIR") or None)
    for key in ("limit", "batch_size", "max_new_tokens"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise _fail(path, f"eval.{key}", f"{value!r} must be a positive integer")
    judge = raw.get("judge")
    if judge is not None and (not isinstance(judge, dict) or "url" not in judge or set(judge) - {"url", "model", "api_key_env"}):
        raise _fail(path, "eval.judge", "must be {url: http://HOST/v1, model: NAME, api_key_env: VAR}")
    spec = EvalSpec(tasks=tuple(resolved_tasks), limit=raw.get("limit"), robustness=bool(raw.get("robustness", False)),
                    efficiency=bool(raw.get("efficiency", False)), data_dir=data_dir,
                    batch_size=raw.get("batch_size") or 8, max_new_tokens=raw.get("max_new_tokens"),
                    dtype=str(raw.get("dtype", "auto")), judge=judge)
    if check_data:
        from kdlm.evaluation.run import EvalSettings, prepare_task

        settings = EvalSettings(models=[], tasks=list(spec.tasks), output=Path("."),
                                data_dir=Path(data_dir or "."), limit=spec.limit, robustness=spec.robustness)
        for t in spec.tasks:
            try:
                prepare_task(resolve_task(t), settings)
            except ConfigError as err:
                raise ConfigError(f"{path}: eval.tasks: {err}") from None
            except DataError as err:  # a task's data file is missing or malformed
                raise DataError(f"{path}: eval.tasks: {t}: {err}") from None
    return spec
