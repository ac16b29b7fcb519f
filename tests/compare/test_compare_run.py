"""`kdlm compare` end to end on tiny models: every variant is a real `kdlm distill` + `kdlm eval` subprocess, the
table has every variant and baseline with intervals, a failed variant is recorded and the rest go on, and a
second call skips everything that finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import write_grid

pytestmark = pytest.mark.slow


def _kdlm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "kdlm", *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=900)


def test_compare_runs_variants_records_a_failure_and_resumes(tmp_path, tiny_grid):
    grid = write_grid(tmp_path, tiny_grid, variants=[
        {"name": "forward_kl", "set": ["loss.terms=[{name: forward_kl, weight: 0.9}, {name: ce, weight: 0.1}]"]},
        # a valid recipe that fails at run time: the hint's layer pair is out of range only for the real models
        {"name": "broken", "set": ["student.model=/nonexistent/student"]},
    ])
    out = tmp_path / "cmp"
    done = _kdlm("compare", str(grid), "-o", str(out), cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]  # one variant failed: non-zero, the others finished
    result = json.loads((out / "compare.json").read_text())
    status = {v["name"]: v["status"] for v in result["variants"]}
    assert status == {"teacher": "done", "initial": "done", "sft": "done", "forward_kl": "done", "broken": "failed"}
    broken = next(v for v in result["variants"] if v["name"] == "broken")
    assert "nonexistent" in broken["error"]
    for name in ("teacher", "initial", "sft", "forward_kl"):
        cell = result["table"][name]["tiny_sentiment/balanced_accuracy"]
        assert cell["ci_low"] <= cell["value"] <= cell["ci_high"]
        assert cell["n"] == 4
    assert "forward_kl" in result["differences"] and "sft" not in result["differences"]
    assert result["majority_baseline"]["tiny_sentiment/accuracy"] == 0.5
    # every trained variant ran exactly the budget
    for name in ("sft", "forward_kl"):
        assert result["table"][name]["training/steps"]["value"] == 3
    assert (out / "report" / "report.html").is_file()

    # resume: nothing finished is rerun (the logs gain no new distill/eval of finished steps)
    mtimes = {p: p.stat().st_mtime for p in (out / "variants").rglob("summary.json")}
    again = _kdlm("compare", str(grid), "-o", str(out), cwd=tmp_path)
    assert again.returncode == 1
    assert "forward_kl/seed0 distill: done already, skipped" in again.stderr
    assert "teacher eval: done already, skipped" in again.stderr
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes
