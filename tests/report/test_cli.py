"""Tests for kdlm.report.cli: the sub-parser and the command, as kdlm/cli.py will wire them."""

from __future__ import annotations

import argparse

import pytest

from kdlm.errors import KdlmError
from kdlm.report.cli import add_report_parser, run_report_command


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kdlm")
    sub = top.add_subparsers(dest="command", required=True)
    add_report_parser(sub)
    return top


def test_parse_and_run(tmp_path, eval_dir, run_dir, capsys):
    out = tmp_path / "rep"
    args = parser().parse_args(["report", str(eval_dir), str(run_dir), "-o", str(out), "--title", "My <run>"])
    assert args.command == "report" and args.inputs == [str(eval_dir), str(run_dir)]
    assert run_report_command(args) == 0
    assert f"report written to {out / 'report.md'} and {out / 'report.html'}" in capsys.readouterr().out
    assert "<title>My &lt;run&gt;</title>" in (out / "report.html").read_text()
    assert (out / "report.md").read_text().startswith("# My &lt;run&gt;\n")


def test_output_is_required(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["report", "somewhere"])
    assert "-o/--output" in capsys.readouterr().err


def test_bad_input_raises_kdlm_error(tmp_path):
    args = parser().parse_args(["report", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    with pytest.raises(KdlmError, match="nope: no such folder"):
        run_report_command(args)
