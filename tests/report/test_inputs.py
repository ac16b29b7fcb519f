"""Tests for kdlm.report.inputs: recognising folders, validating summary.json, reading runs, merging."""

from __future__ import annotations

import json

import pytest

from kdlm.errors import DataError, KdlmError
from kdlm.report.inputs import describe_method, load_inputs, load_run_folder

from .conftest import FKL, RECIPE, RKL, TEACHER, write_eval_folder, write_run_folder


def test_recognises_both_kinds_and_ties_run_to_model(eval_dir, run_dir):
    inputs = load_inputs([eval_dir, run_dir])
    assert inputs.evals.reference == TEACHER
    assert inputs.evals.labels() == [TEACHER, FKL, RKL]
    assert inputs.evals.task_names() == ["gsm8k", "ag_news"]
    assert [run.name for run in inputs.runs] == ["fkl"]
    assert inputs.run_of_model == {FKL: inputs.runs[0]}  # models[].path points inside the run folder


def test_relative_model_path_is_resolved_against_the_eval_folder(tmp_path, make_summary):
    run = write_run_folder(tmp_path / "runs" / "fkl")
    ev = write_eval_folder(tmp_path / "eval", make_summary(run_model_path="../runs/fkl/model"))
    assert FKL in load_inputs([ev, run]).run_of_model


@pytest.mark.parametrize("make_bad, message", [
    (lambda p: p / "missing", "no such folder"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "neither an evaluation folder (summary.json) nor a distillation run folder"),
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "not a folder"),
    (lambda p: (p / "half").mkdir() or (p / "half" / "metrics.jsonl").write_text("") or p / "half", "neither"),
])
def test_bad_folder_is_a_kdlm_error_naming_the_path(tmp_path, make_bad, message):
    path = make_bad(tmp_path)
    with pytest.raises(KdlmError) as err:
        load_inputs([path])
    assert isinstance(err.value, DataError)
    assert str(path) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


def test_no_inputs():
    with pytest.raises(DataError, match="no input folders"):
        load_inputs([])


@pytest.mark.parametrize("mutate, message", [
    (lambda s: "not json {", "malformed summary.json: Expecting value at line 1"),
    (lambda s: [1, 2], "expected a JSON object"),
    (lambda s: {k: v for k, v in s.items() if k != "kdlm_eval_version"}, "no kdlm_eval_version"),
    (lambda s: {**s, "kdlm_eval_version": 2}, "kdlm_eval_version 2 is not supported"),
    (lambda s: {**s, "models": {"a": 1}}, "models must be a list"),
    (lambda s: {**s, "models": [{"path": "x"}]}, "models[0].label must be a non-empty string"),
    (lambda s: {**s, "tasks": [{"name": "t", "primary_metric": 3}]}, "tasks[0].primary_metric has the wrong type"),
    (lambda s: {**s, "results": {"m": {"t": {"accuracy": "high"}}}}, "results.m.t.accuracy must be a number or null"),
    (lambda s: {**s, "results": {"m": ["t"]}}, "results.m must be an object"),
    (lambda s: {**s, "robustness": {"m": {"t": {"asr": {"char": "x"}}}}}, "robustness.m.t.asr.char must be a number"),
    (lambda s: {**s, "efficiency": {"m": {"latency_ms_p50": True}}}, "efficiency.m.latency_ms_p50 must be a number"),
])
def test_malformed_summary(tmp_path, make_summary, mutate, message):
    folder = tmp_path / "ev"
    folder.mkdir()
    value = mutate(make_summary())
    (folder / "summary.json").write_text(value if isinstance(value, str) else json.dumps(value))
    with pytest.raises(DataError) as err:
        load_inputs([folder])
    assert str(folder / "summary.json") in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_nulls_and_nan_are_missing_values(tmp_path, make_summary):
    summary = make_summary()
    summary["results"][FKL]["gsm8k"]["exact_match"] = None
    summary["results"][RKL]["gsm8k"]["exact_match"] = float("nan")  # json.dumps writes NaN; Python reads it back
    inputs = load_inputs([write_eval_folder(tmp_path / "ev", summary)])
    assert inputs.evals.section("results")[FKL]["gsm8k"]["exact_match"] is None


def test_later_folders_add_and_override(tmp_path, make_summary):
    first = make_summary()
    second = {"kdlm_eval_version": 1, "reference": "other-teacher",
              "models": [{"label": FKL, "path": "elsewhere", "parameters": 1}, {"label": "new", "path": "n"}],
              "tasks": [{"name": "extra", "type": "generation", "primary_metric": "rougeL", "limit": 10}],
              "results": {FKL: {"gsm8k": {"exact_match": 0.5}}}}
    data = load_inputs([write_eval_folder(tmp_path / "a", first), write_eval_folder(tmp_path / "b", second)]).evals
    assert data.reference == TEACHER and data.references == [TEACHER, "other-teacher"]
    assert data.labels() == [TEACHER, FKL, RKL, "new"]
    assert data.task_names() == ["gsm8k", "ag_news", "extra"]
    assert data.models[FKL]["parameters"] == 1 and data.models[FKL]["disk_mb"] == 310.6
    assert data.section("results")[FKL]["gsm8k"] == {"exact_match": 0.5, "n": 50}
    assert data.section("results")[FKL]["ag_news"]["accuracy"] == 0.812


def test_run_folder_rows_and_final(run_dir):
    run = load_run_folder(run_dir)
    assert [r["step"] for r in run.val_rows] == [0, 10, 20]
    assert [r["step"] for r in run.train_rows] == [5, 10, 15, 20]
    assert run.final["after"]["ce"] == 5.0 and not run.truncated_last_line


def test_run_folder_half_written_last_line_is_skipped(tmp_path):
    run_dir = write_run_folder(tmp_path / "run", finished=False)
    with (run_dir / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 25, "loss/total"')
    run = load_run_folder(run_dir)
    assert run.truncated_last_line and run.final is None and len(run.train_rows) == 4


def test_run_folder_bad_middle_line_names_file_and_line(tmp_path):
    run_dir = write_run_folder(tmp_path / "run")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[2] = "garbage"
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"metrics\.jsonl:3: malformed metrics row"):
        load_run_folder(run_dir)


def test_run_folder_bad_yaml_and_final(tmp_path):
    run_dir = write_run_folder(tmp_path / "run")
    (run_dir / "final_metrics.json").write_text("{")
    with pytest.raises(DataError, match="final_metrics.json: malformed JSON"):
        load_run_folder(run_dir)
    (run_dir / "resolved_config.yaml").write_text("teacher: [unclosed\n")
    with pytest.raises(DataError, match="resolved_config.yaml: not valid YAML"):
        load_run_folder(run_dir)


@pytest.mark.parametrize("recipe, text", [
    (RECIPE, "0.9·forward_kl + 0.1·ce (T=2); 10 layers kept"),
    ({**RECIPE, "student": {"keep_layers": 10, "prune": {"method": "block_influence"}}},
     "0.9·forward_kl + 0.1·ce (T=2); 10 layers kept by block_influence"),
    ({**RECIPE, "student": {"prune": {"method": "uniform", "intermediate_size": 704, "num_key_value_heads": 2}}},
     "0.9·forward_kl + 0.1·ce (T=2); width MLP 704, KV 2"),
    ({"loss": {"terms": [{"name": "reverse_kl", "weight": 1.0, "temperature": 1.5}]}}, "reverse_kl (T=1.5)"),
    ({"loss": [{"name": "jsd", "weight": 1.0}], "student": {"keep_layers": [0, 5, 9]}}, "jsd(β=0.5) (T=1); layers 0,5,9 kept"),
    ({"loss": {"terms": [{"name": "skew_forward_kl", "weight": 0.5, "skew": 0.2, "temperature": 2},
                         {"name": "forward_kl", "weight": 0.5, "temperature": 1}]}},
     "0.5·skew_forward_kl(α=0.2) + 0.5·forward_kl"),
    ({"loss": {"terms": [{"name": "ce", "weight": 1.0}]}}, "ce"),
    ({}, "unknown objective"),
])
def test_describe_method(recipe, text):
    assert describe_method(recipe) == text
