"""The same recipe, unchanged, under `accelerate launch` with two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kdlm.config import load_recipe
from kdlm.data import prepare_data
from kdlm.models.loading import load_tokenizer, resolve_source
from kdlm.training.metrics import read_metrics


@pytest.mark.slow
def test_two_process_accelerate_launch(recipe_file, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kdlm", "distill", str(recipe_file), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["steps"] == 6
    assert final["after"]["kl_to_teacher"] < final["before"]["kl_to_teacher"]
    # validation is sharded over both processes and reduced: all 8 held-out examples' tokens are counted once
    report = json.loads((run / "data_report.json").read_text())
    assert report["validation_examples"] == 8
    recipe = load_recipe(recipe_file)
    _, val_set, _ = prepare_data(recipe.data, load_tokenizer(resolve_source(recipe.student.model)), seed=recipe.train.seed)
    expected = sum(sum(label != -100 for label in ex.labels[1:]) for ex in val_set)
    validations = [r for r in read_metrics(run / "metrics.jsonl") if "val/tokens" in r]
    assert [r["val/tokens"] for r in validations] == [expected, expected]
    assert (run / "model" / "model.safetensors").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000006"


@pytest.mark.slow
def test_on_off_policy_choices_agree_across_two_processes(recipe_file, tmp_path):
    """GKD at lambda 0.5 under `accelerate launch` with 2 processes: each step's kind is drawn once on the main
    process and broadcast, so the fraction of (process-)steps on student samples, summed over both processes,
    is 1 or 0 at every step, never 0.5 (TRL draws it per rank, PEERS.md #14)."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kdlm", "distill", str(recipe_file), "--no-progress",
           "--set", "source.kind=mixed", "--set", "source.lmbda=0.5", "--set", "sampling.max_new_tokens=8",
           "--set", "train.max_steps=8", "--set", "train.save_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss/total" in r]
    fractions = [r.get("source/student_fraction", 0.0) for r in rows]
    assert len(rows) == 8 and set(fractions) == {0.0, 1.0}
    for r, f in zip(rows, fractions):
        assert f + r.get("source/data_fraction", 0.0) == 1.0
