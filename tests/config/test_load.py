"""Tests for kdlm.config.load: recipe YAML, `--set` overrides, validation messages, the reference."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

import pytest
import yaml

from kdlm.config import (
    DataConfig,
    LossConfig,
    LossTerm,
    Recipe,
    TrainConfig,
    config_reference,
    dump_yaml,
    load_recipe,
)
from kdlm.config import schema
from kdlm.errors import ConfigError

RECIPE = """\
teacher:
  model: org/teacher
  dtype: float32
student:
  model: org/student
  keep_layers: 2
data:
  train: data/train.jsonl
  format: messages
loss:
  temperature: 2.0
  terms:
    - {name: ce, weight: 0.5}
    - {name: forward_kl, weight: 0.5, temperature: 4.0}
train:
  max_steps: 10
  batch_size: 2
  learning_rate: 1.0e-4
output:
  dir: runs/test
"""

BARE_LIST_RECIPE = """\
loss:
  - {name: ce, weight: 0.25}
  - {name: jsd, weight: 0.75, beta: 0.3}
"""


@pytest.fixture
def recipe_path(tmp_path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture
def bare_list_path(tmp_path) -> Path:
    path = tmp_path / "bare.yaml"
    path.write_text(BARE_LIST_RECIPE)
    return path


def config_error(path, overrides=()) -> str:
    """The message of the ConfigError that loading raises; it must be a single line."""
    with pytest.raises(ConfigError) as info:
        load_recipe(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, f"error message spans several lines: {message!r}"
    return message


# ----------------------------------------------------------------------------- loading


def test_recipe_file_is_loaded_into_typed_sections(recipe_path):
    recipe = load_recipe(recipe_path)
    assert isinstance(recipe, Recipe)
    assert recipe.teacher.model == "org/teacher"
    assert recipe.teacher.dtype == "float32"
    assert recipe.student.keep_layers == 2
    assert recipe.data.train == "data/train.jsonl"
    assert recipe.data.format == "messages"
    assert recipe.loss.temperature == 2.0
    assert [type(t) for t in recipe.loss.terms] == [LossTerm, LossTerm]
    assert [(t.name, t.weight, t.temperature) for t in recipe.loss.terms] == [("ce", 0.5, None), ("forward_kl", 0.5, 4.0)]
    assert recipe.train.max_steps == 10 and recipe.train.batch_size == 2
    assert recipe.train.learning_rate == pytest.approx(1e-4)
    assert recipe.output.dir == "runs/test"
    # sections and fields not given keep their defaults
    assert recipe.train.grad_accum == TrainConfig().grad_accum
    assert recipe.data.max_length == DataConfig().max_length


def test_no_file_gives_defaults():
    assert load_recipe(None) == Recipe()


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing but a comment\n")
    assert load_recipe(path) == Recipe()


def test_dumped_recipe_loads_back_unchanged(recipe_path, tmp_path):
    recipe = load_recipe(recipe_path, ["train.report_to=[tensorboard, wandb]", "student.keep_layers=[0, 3]"])
    again = tmp_path / "resolved.yaml"
    again.write_text(dump_yaml(recipe))
    assert load_recipe(again) == recipe



# ----------------------------------------------------------------------------- overrides


def test_override_nested_int(recipe_path):
    recipe = load_recipe(recipe_path, ["train.max_steps=50"])
    assert recipe.train.max_steps == 50 and type(recipe.train.max_steps) is int
    assert recipe.train.batch_size == 2  # siblings untouched


def test_override_int_given_for_float_becomes_float(recipe_path):
    recipe = load_recipe(recipe_path, ["loss.temperature=2"])
    assert recipe.loss.temperature == 2.0 and type(recipe.loss.temperature) is float


def test_override_list_index(recipe_path):
    recipe = load_recipe(recipe_path, ["loss.terms.0.weight=0.3"])
    assert recipe.loss.terms[0].name == "ce" and recipe.loss.terms[0].weight == pytest.approx(0.3)
    assert recipe.loss.terms[1].weight == pytest.approx(0.5)
    assert recipe.loss.terms[1].temperature == pytest.approx(4.0)


def test_later_override_wins(recipe_path):
    assert load_recipe(recipe_path, ["train.max_steps=5", "train.max_steps=7"]).train.max_steps == 7


def test_override_creates_missing_section():
    recipe = load_recipe(None, ["train.max_steps=3", "data.train=x.jsonl"])
    assert recipe.train.max_steps == 3 and recipe.data.train == "x.jsonl"


def test_override_values_are_parsed_as_yaml(recipe_path):
    recipe = load_recipe(
        recipe_path,
        ["train.report_to=[wandb]", "data.validation=null", "data.skip_bad_rows=true", "student.keep_layers=[0, 1, 3]"],
    )
    assert recipe.train.report_to == ["wandb"]
    assert recipe.data.validation is None
    assert recipe.data.skip_bad_rows is True
    assert recipe.student.keep_layers == [0, 1, 3]


def test_override_replaces_whole_term_list(recipe_path):
    recipe = load_recipe(recipe_path, ["loss.terms=[{name: tvd, weight: 2}]"])
    assert [(t.name, t.weight) for t in recipe.loss.terms] == [("tvd", 2.0)]


def test_bare_list_loss_form(bare_list_path):
    recipe = load_recipe(bare_list_path)
    assert [(t.name, t.weight, t.beta) for t in recipe.loss.terms] == [("ce", 0.25, None), ("jsd", 0.75, 0.3)]
    assert recipe.loss.temperature == LossConfig().temperature


def test_bare_list_loss_form_with_overrides(bare_list_path):
    recipe = load_recipe(bare_list_path, ["loss.temperature=3", "loss.terms.1.weight=0.5"])
    assert recipe.loss.temperature == 3.0
    assert [(t.name, t.weight) for t in recipe.loss.terms] == [("ce", 0.25), ("jsd", 0.5)]
    assert recipe.loss.terms[1].beta == pytest.approx(0.3)


def test_exponent_without_dot_is_a_float(recipe_path, tmp_path):
    # YAML 1.1 reads 5e-5 as a string; the loader accepts it as the number it is
    recipe = load_recipe(recipe_path, ["train.learning_rate=5e-5"])
    assert recipe.train.learning_rate == pytest.approx(5e-5) and type(recipe.train.learning_rate) is float
    path = tmp_path / "lr.yaml"
    path.write_text("train:\n  learning_rate: 5e-5\n")
    assert load_recipe(path).train.learning_rate == pytest.approx(5e-5)


# ----------------------------------------------------------------------------- errors


def test_unknown_key_suggests_the_nearest(recipe_path):
    message = config_error(recipe_path, ["train.max_step=3"])
    assert "train.max_step:" in message
    assert "did you mean 'train.max_steps'" in message
    assert str(recipe_path) in message


def test_unknown_key_in_yaml_suggests_the_nearest(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  trian: x.jsonl\n")
    message = config_error(path)
    assert "data.trian" in message and "did you mean 'data.train'" in message


def test_unknown_key_inside_a_term(recipe_path):
    message = config_error(recipe_path, ["loss.terms.1.temprature=2"])
    assert "loss.terms.1.temprature" in message and "did you mean 'loss.terms.1.temperature'" in message


def test_unknown_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optimizer:\n  lr: 0.1\n")
    message = config_error(path)
    assert "optimizer" in message and "unknown field" in message
    # nothing close: the valid sections are listed
    for section in ("teacher", "student", "data", "loss", "train", "output"):
        assert section in message


def test_misspelt_section_suggests_the_nearest(recipe_path):
    message = config_error(recipe_path, ["trainer.max_steps=3"])
    assert "trainer" in message and "did you mean 'train'" in message


@pytest.mark.parametrize(
    "override, field, expected",
    [
        ("train.max_steps=abc", "train.max_steps", "expected an integer"),
        ("train.max_steps=2.5", "train.max_steps", "expected an integer"),
        ("train.max_steps=true", "train.max_steps", "expected an integer"),
        ("data.skip_bad_rows=1", "data.skip_bad_rows", "expected true or false"),
        ("data.completion_only=yes please", "data.completion_only", "expected true or false"),
        ("train.report_to=tensorboard", "train.report_to", "expected a list"),
        ("loss.terms=forward_kl", "loss.terms", "expected a list"),
        ("train.learning_rate=fast", "train.learning_rate", "expected a number"),
        ("train.learning_rate=true", "train.learning_rate", "expected a number"),
        ("teacher.model=3", "teacher.model", "expected a string"),
        ("train=5", "train", "expected a mapping"),
    ],
)
def test_wrong_type(recipe_path, override, field, expected):
    message = config_error(recipe_path, [override])
    assert f"{field}:" in message
    assert expected in message


def test_wrong_type_for_union_field(recipe_path):
    message = config_error(recipe_path, ["student.keep_layers=most"])
    assert "student.keep_layers" in message and "'most'" in message


def test_null_for_a_required_field(recipe_path):
    message = config_error(recipe_path, ["train.max_steps=null"])
    assert "train.max_steps" in message


@pytest.mark.parametrize(
    "override, field, bound",
    [
        ("loss.temperature=-1", "loss.temperature", "> 0"),
        ("loss.temperature=0", "loss.temperature", "> 0"),
        ("data.validation_fraction=1.5", "data.validation_fraction", "< 1"),
        ("data.validation_fraction=1", "data.validation_fraction", "< 1"),
        ("train.batch_size=0", "train.batch_size", ">= 1"),
        ("data.max_length=4", "data.max_length", ">= 8"),
        ("loss.beta=1.1", "loss.beta", "<= 1"),
        ("loss.terms.0.weight=-0.5", "loss.terms.0.weight", ">= 0"),
        ("loss.terms.1.temperature=0", "loss.terms.1.temperature", "> 0"),
    ],
)
def test_out_of_range(recipe_path, override, field, bound):
    message = config_error(recipe_path, [override])
    assert f"{field}:" in message
    assert "out of range" in message and bound in message


@pytest.mark.parametrize(
    "override",
    ["loss.temperature=0.01", "data.validation_fraction=0", "data.validation_fraction=0.99", "train.batch_size=1",
     "data.max_length=8", "loss.beta=1", "loss.beta=0"],
)
def test_boundary_values_accepted(recipe_path, override):
    load_recipe(recipe_path, [override])


def test_bad_literal_suggests_the_nearest(recipe_path):
    message = config_error(recipe_path, ["teacher.dtype=bf16"])
    assert "teacher.dtype" in message and "did you mean 'bfloat16'" in message


def test_yaml_no_is_the_choice_no_not_false(recipe_path, tmp_path):
    # YAML 1.1 reads an unquoted `no` as False; a choice spelled no/off must still be reachable
    assert load_recipe(recipe_path, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_recipe(path).train.mixed_precision == "no"
    message = config_error(recipe_path, ["train.mixed_precision=yes"])  # True has no choice to go back to
    assert "train.mixed_precision" in message and "True is not one of" in message


def test_bad_literal_in_a_list(recipe_path):
    message = config_error(recipe_path, ["train.report_to=[tensorbord]"])
    assert "train.report_to.0" in message and "did you mean 'tensorboard'" in message


def test_bad_loss_term_name_suggests_the_nearest(recipe_path):
    message = config_error(recipe_path, ["loss.terms.1.name=forwrd_kl"])
    assert "loss.terms.1.name" in message and "did you mean 'forward_kl'" in message


def test_bad_loss_term_name_in_bare_list(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("loss:\n  - {name: ce, weight: 1}\n  - {name: revrse_kl, weight: 1}\n")
    message = config_error(path)
    assert "loss.terms.1.name" in message and "did you mean 'reverse_kl'" in message


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  max_steps: 10\n  batch_size: 2: 3\noutput:\n  dir: x\n")
    message = config_error(path)
    assert str(path) in message
    assert re.search(r"\bline 3\b", message), message
    assert "YAML" in message


def test_recipe_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- teacher\n- student\n")
    assert str(path) in config_error(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = config_error(path)
    assert str(path) in message and "not found" in message


@pytest.mark.parametrize("override", ["train.max_steps", "=3", "train.max_steps 3"])
def test_malformed_override(recipe_path, override):
    message = config_error(recipe_path, [override])
    assert "KEY=VALUE" in message


@pytest.mark.parametrize(
    "overrides, through",
    [
        (["train.max_steps.x=1"], "train.max_steps"),
        (["train=5", "train.max_steps=3"], "train"),
        (["data.train.split=x"], "data.train"),
        (["loss.terms.0.weight.x=1"], "loss.terms.0.weight"),
    ],
)
def test_override_through_a_value_is_a_config_error(recipe_path, overrides, through):
    # regression: this used to escape as a TypeError/AttributeError traceback
    message = config_error(recipe_path, overrides)
    assert f"{through} is " in message and "not a section" in message


def test_override_index_past_the_list(recipe_path):
    message = config_error(recipe_path, ["loss.terms.5.weight=1"])
    assert "loss.terms.5.weight" in message and "2 entries" in message


# ----------------------------------------------------------------------------- schema and reference


def _schema_dataclasses() -> list[type]:
    return [obj for _, obj in inspect.getmembers(schema, inspect.isclass)
            if dataclasses.is_dataclass(obj) and obj.__module__ == schema.__name__]


def _reference_sections(text: str) -> dict[str, str]:
    """The distillation recipe's sections: the reference's first top-level part (generation recipes follow it)."""
    text = re.split(r"^# ", text, flags=re.M)[1]
    parts = re.split(r"^## `([^`]+)`\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def _expected_sections() -> dict[str, type]:
    """Section name -> dataclass, walking Recipe's type hints (list[X] gives `name[]`)."""
    out: dict[str, type] = {}

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
                out[f"{prefix}{f.name}[]"] = typing.get_args(tp)[0]
                walk(typing.get_args(tp)[0], f"{prefix}{f.name}[].")
            elif dataclasses.is_dataclass(tp):
                out[f"{prefix}{f.name}"] = tp
                walk(tp, f"{prefix}{f.name}.")

    walk(Recipe, "")
    return out


def test_every_schema_dataclass_has_a_reference_section():
    expected = _expected_sections()
    reached = set(expected.values()) | {Recipe}
    assert set(_schema_dataclasses()) == reached, "a dataclass in schema.py is not reachable from Recipe"
    sections = _reference_sections(config_reference())
    assert set(sections) == set(expected)


def test_every_field_is_documented_in_the_reference():
    sections = _reference_sections(config_reference())
    expected = _expected_sections()
    checked = 0
    for name, cls in expected.items():
        body = sections[name]
        for f in dataclasses.fields(cls):
            help_text = f.metadata.get("help", "")
            assert help_text.strip(), f"{cls.__name__}.{f.name} has no help text"
            rows = [line for line in body.splitlines() if line.startswith(f"| `{f.name}` |")]
            assert len(rows) == 1, f"{name}.{f.name} missing from the reference"
            assert help_text in rows[0]
            checked += 1
    # every field of every dataclass except Recipe's own (its fields are the sections), once per section it has
    # (TeacherConfig is both `teacher` and `teachers[]`)
    assert checked == sum(len(dataclasses.fields(c)) * max(1, list(expected.values()).count(c))
                          for c in _schema_dataclasses() if c is not Recipe)
    for f in dataclasses.fields(Recipe):
        assert f.name in sections or f"{f.name}[]" in sections


def test_reference_shows_ranges_and_defaults():
    body = _reference_sections(config_reference())["train"]
    row = next(line for line in body.splitlines() if line.startswith("| `batch_size` |"))
    assert "`8`" in row and "≥ 1" in row


def test_config_reference_command_writes_the_reference(tmp_path):
    from kdlm.cli import main

    out = tmp_path / "config.md"
    assert main(["config-reference", "--output", str(out)]) == 0
    assert out.read_text() == config_reference() + "\n"


def test_term_names_match_divergence_registry():
    from kdlm.losses import DIVERGENCE_KINDS
    from kdlm.losses.objective import CROSS_TOKENIZER_TERMS, FEATURE_TERMS, STUDENT_TERMS

    assert schema.STUDENT_TERM_NAMES == STUDENT_TERMS == ("ce", "redi", "pg")
    assert schema.FEATURE_TERM_NAMES == FEATURE_TERMS
    assert schema.TERM_NAMES[: len(STUDENT_TERMS)] == STUDENT_TERMS
    assert set(schema.DIVERGENCE_TERM_NAMES) == set(DIVERGENCE_KINDS)
    assert schema.CROSS_TOKENIZER_TERM_NAMES == CROSS_TOKENIZER_TERMS
    assert schema.TERM_NAMES == STUDENT_TERMS + schema.DIVERGENCE_TERM_NAMES + FEATURE_TERMS + CROSS_TOKENIZER_TERMS
    assert len(schema.TERM_NAMES) == len(set(schema.TERM_NAMES))


# ----------------------------------------------------------------------------- the CLI


def test_check_prints_the_resolved_recipe(recipe_path, capsys):
    from kdlm.cli import main

    assert main(["check", str(recipe_path), "--set", "train.max_steps=3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["max_steps"] == 3
    assert resolved["train"]["grad_accum"] == 1  # defaults filled in
    assert [t["name"] for t in resolved["loss"]["terms"]] == ["ce", "forward_kl"]


def test_check_reports_a_bad_override_on_one_line(recipe_path, capsys):
    from kdlm.cli import main

    assert main(["check", str(recipe_path), "--set", "train.max_step=3"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("kdlm: error: ")
    assert "did you mean 'train.max_steps'" in lines[0]


def test_distill_fails_on_config_before_loading_any_model(tmp_path, capsys, monkeypatch):
    import kdlm.models.loading
    import kdlm.training.trainer
    from kdlm.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the recipe was validated")

    monkeypatch.setattr(kdlm.models.loading, "load_model", no_model)
    monkeypatch.setattr(kdlm.training.trainer, "load_model", no_model)  # bound by `from ... import load_model`
    bad = tmp_path / "bad.yaml"
    run_dir = tmp_path / "runs"
    bad.write_text(RECIPE.replace("batch_size: 2", "batch_size: 0").replace("dir: runs/test", f"dir: {run_dir}"))
    assert main(["distill", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kdlm: error: ") and "train.batch_size" in err
    assert not run_dir.exists()
