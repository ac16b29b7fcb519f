"""kdlm.evaluation.cli: the `eval` sub-parser and command, as kdlm/cli.py will wire them."""

from __future__ import annotations

import argparse
import json

import pytest

from kdlm.evaluation.cli import add_eval_parser, main, run_eval_command, settings_from_args


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kdlm")
    add_eval_parser(top.add_subparsers(dest="command", required=True))
    return top


def test_arguments(monkeypatch, tmp_path):
    monkeypatch.setenv("KDLM_DATA_DIR", str(tmp_path))
    args = parser().parse_args(["eval", "teacher", "student", "--task", "selfinst,gsm8k", "--task", "x.yaml",
                                "--limit", "16", "-o", "OUT", "--sample", "--temperature", "0.7", "--seed", "3",
                                "--robustness", "--efficiency", "--harness", "hellaswag, arc_easy", "--teacher", "big"])
    s = settings_from_args(args)
    assert s.models == ["teacher", "student"] and s.tasks == ["selfinst", "gsm8k", "x.yaml"]
    assert (s.limit, s.sample, s.temperature, s.seed, s.teacher) == (16, True, 0.7, 3, "big")
    assert s.robustness and s.efficiency and s.harness == ["hellaswag", "arc_easy"]
    assert s.data_dir == tmp_path and str(s.output) == "OUT"
    assert settings_from_args(parser().parse_args(["eval", "m", "--task", "t", "-o", "O", "--data-dir", "D"])).data_dir.name == "D"


def test_output_is_required(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["eval", "m", "--task", "selfinst"])
    assert "--output" in capsys.readouterr().err


def test_run_prints_table(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = parser().parse_args(["eval", str(tiny_model_dir), "--task", "selfinst", "--data-dir", str(data_dir),
                                "--limit", "2", "--max-new-tokens", "3", "-o", str(out), "--no-progress"])
    assert run_eval_command(args) == 0
    printed = capsys.readouterr().out
    assert "selfinst rouge_l" in printed and f"evaluation written to {out / 'summary.json'}" in printed
    assert json.loads((out / "summary.json").read_text())["tasks"][0]["limit"] == 2


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["m", "--task", "gsm8kk", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdlm: error: unknown task 'gsm8kk'") and "did you mean 'gsm8k'" in err
    assert err.count("\n") == 1
