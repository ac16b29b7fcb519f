"""Read a recipe YAML, apply `--set key=value` overrides, validate it into typed dataclasses.

Validation happens once, here, before any model loads. Each problem is reported as
one line naming the dotted field (`train.max_steps`), and for an unknown key the
nearest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from kdlm.config.schema import LossConfig, Recipe
from kdlm.errors import ConfigError


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *, root: type = Recipe) -> Any:
    """Load `path` (or start from defaults when None), apply overrides, and return a validated `root`
    (a distillation Recipe, or kdlm.config.generation.GenerateRecipe for `kdlm generate`)."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: recipe file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(raw, dict):
            sections = ", ".join(f.name for f in dataclasses.fields(root))
            raise ConfigError(f"{path}: a recipe must be a mapping of sections ({sections})")
    for item in overrides:
        apply_override(raw, item)
    try:
        return from_dict(root, raw)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `dotted.key=value` override to a raw recipe dict; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=50")
    value = yaml.safe_load(text) if text.strip() else None
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = node[_list_index(node, part, key)]
        else:
            if part == "loss" and isinstance(node.get("loss"), list):
                node["loss"] = {"terms": node["loss"]}  # the bare-list form, normalised so loss.X can be set
            if node.get(part) is None:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
        if not isinstance(node, (dict, list)):  # e.g. `train.max_steps.x=1`: a value, not a section or a list
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is {node!r}, not a section or a list")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {key}: {part!r} is not an index of a list with {len(node)} entries")
    return int(part)


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking names, types and ranges of every field."""
    where = prefix.rstrip(".") or "recipe"
    if cls is LossConfig and isinstance(data, list):
        data = {"terms": data}  # `loss: [ {name: ce, ...}, ... ]`
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(fields)})"
            raise ConfigError(f"{prefix}{key}: unknown field{hint}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _check(hints[name], data[name], f"{prefix}{name}", f.metadata)
    return cls(**values)


_YAML_BOOL_WORDS = {False: {"no", "off", "false"}, True: {"yes", "on", "true"}}


def _check(tp: Any, value: Any, name: str, meta: typing.Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{name}: must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(option, value, name, meta)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool):
            # YAML 1.1 reads an unquoted no/off/false as False and yes/on/true as True, so
            # `mixed_precision: no` arrives as False: take it back to the choice it spelled
            spelled = _YAML_BOOL_WORDS[value]
            value = next((a for a in allowed if isinstance(a, str) and a.lower() in spelled), value)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check(item_tp, item, f"{name}.{i}", meta) for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, f"{name}.")
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads `5e-5` (no dot) as a string; accept it as the number it plainly is
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
    _check_range(value, name, meta)
    return value


def _check_range(value: Any, name: str, meta: typing.Mapping[str, Any]) -> None:
    checks = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
              "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}
    for key, (ok, symbol) in checks.items():
        if key in meta and not ok(value, meta[key]):
            raise ConfigError(f"{name}: {value!r} is out of range (must be {symbol} {meta[key]})")
    if "choices" in meta and value not in meta["choices"]:
        close = difflib.get_close_matches(str(value), list(meta["choices"]), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(meta['choices'])}{hint}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + " / ".join(str(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def to_dict(recipe: Any) -> dict[str, Any]:
    """The recipe as plain data (what `resolved_config.yaml` holds)."""
    return dataclasses.asdict(recipe)


def dump_yaml(recipe: Any) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def config_reference() -> str:
    """Markdown reference of every recipe field, generated from the dataclasses (docs/reference/config.md)."""
    lines = ["# Recipe reference", "",
             "Generated from `kdlm/config/schema.py` by `kdlm config-reference`; do not edit by hand.", ""]

    def section(cls: type, prefix: str) -> None:
        lines.extend([f"## `{prefix.rstrip('.')}`", "", (cls.__doc__ or "").strip().splitlines()[0], "",
                      "| field | type | default | description |", "|---|---|---|---|"])
        hints = typing.get_type_hints(cls)
        nested = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                default = dataclasses.asdict(default)
            elif isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
                default = [dataclasses.asdict(d) for d in default]
            extra = [f"{k} {v}" for k, v in (("≥", f.metadata.get("ge")), (">", f.metadata.get("gt")),
                                               ("≤", f.metadata.get("le")), ("<", f.metadata.get("lt"))) if v is not None]
            rng = f" Range: {', '.join(extra)}." if extra else ""
            lines.append(f"| `{f.name}` | {_type_name(tp)} | `{yaml.safe_dump(default, default_flow_style=True, width=2**30).strip().removesuffix('...').strip()}` "
                         f"| {f.metadata.get('help', '')}{rng} |")
            inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
            if dataclasses.is_dataclass(inner):
                nested.append((inner, f"{prefix}{f.name}[]." if inner is not tp else f"{prefix}{f.name}."))
        lines.append("")
        for inner, p in nested:
            section(inner, p)

    for f in dataclasses.fields(Recipe):
        tp = typing.get_type_hints(Recipe)[f.name]
        if typing.get_origin(tp) is list:  # a list of sections (teachers:)
            lines.extend([f"`{f.name}`: {f.metadata.get('help', '')}", ""])
            section(typing.get_args(tp)[0], f"{f.name}[].")
        else:
            section(tp, f"{f.name}.")
    from kdlm.config.generation import GenerateRecipe

    lines += ["# Generation recipes", "",
              "`kdlm generate RECIPE.yaml` reads a recipe with the sections below (same validation and `--set`).", ""]
    for f in dataclasses.fields(GenerateRecipe):
        section(typing.get_type_hints(GenerateRecipe)[f.name], f"{f.name}.")
    return "\n".join(lines)
