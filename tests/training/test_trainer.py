"""The distillation loop on tiny random models: outputs, token normalisation, checkpoints and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdlm.config import load_recipe
from kdlm.errors import OutputError
from kdlm.training import distill
from kdlm.training.checkpoint import latest_checkpoint
from kdlm.training.metrics import read_metrics

def test_distill_writes_student_metrics_and_card(recipe_file):
    from transformers import AutoModelForCausalLM

    result = distill(load_recipe(recipe_file), show_progress=False)
    run = result.output_dir
    assert result.steps == 6
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert model.config.num_hidden_layers == 2
    assert (result.model_dir / "model.safetensors").is_file() and (result.model_dir / "generation_config.json").is_file()
    saved = load_file(result.model_dir / "model.safetensors")
    assert not any("teacher" in k or k.startswith("student.") for k in saved), "only the plain student is exported"
    card = (result.model_dir / "README.md").read_text()
    assert "forward_kl" in card and "Optimizer steps:** 6" in card and f"{result.after['kl_to_teacher']:.4f}" in card
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for r in train_rows:  # every term logged on its own, and the total is their weighted sum
        assert r["loss/total"] == pytest.approx(0.7 * r["loss/forward_kl"] + 0.3 * r["loss/ce"])
    assert (run / "resolved_config.yaml").read_text().count("temperature: 2.0") == 1
    assert any((run / "tensorboard").rglob("events.out.tfevents*"))
    # distillation moved the student towards the teacher on held-out data
    assert result.after["kl_to_teacher"] < result.before["kl_to_teacher"]


def test_refuses_to_overwrite_a_finished_run(recipe_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not empty"):
        distill(load_recipe(recipe_file), show_progress=False)
    assert (run / "precious.txt").read_text() == "keep me"


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def test_interrupted_run_resumes_to_the_same_final_step(recipe_file, tmp_path):
    straight = distill(load_recipe(recipe_file, [f"output.dir={tmp_path / 'straight'}"]), show_progress=False)

    class Crash(RuntimeError):
        pass

    def crash_after_3(step: int) -> None:
        if step == 3:
            raise Crash

    recipe = load_recipe(recipe_file, [f"output.dir={tmp_path / 'crashed'}"])
    with pytest.raises(Crash):
        distill(recipe, on_step=crash_after_3, show_progress=False)
    assert latest_checkpoint(tmp_path / "crashed" / "checkpoints").name == "step-000002"
    resumed = distill(recipe, resume=True, show_progress=False)
    assert resumed.steps == straight.steps == 6
    a, b = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "crashed")
    assert a.keys() == b.keys()
    for k in a:  # same optimizer state, schedule and data position -> the same weights
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    steps = [r["step"] for r in read_metrics(tmp_path / "crashed" / "metrics.jsonl") if "loss/total" in r]
    assert steps == [1, 2, 3, 3, 4, 5, 6]  # step 3 ran twice: once before the crash, once after resuming from 2


def test_crash_while_writing_a_checkpoint_keeps_latest_valid(recipe_file, tmp_path, monkeypatch):
    from accelerate import Accelerator

    real_save = Accelerator.save_state

    def save_then_die(self, output_dir, **kw):
        if output_dir.endswith("step-000004"):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
            raise OSError("disk full")
        return real_save(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", save_then_die)
    recipe = load_recipe(recipe_file)
    with pytest.raises(OSError, match="disk full"):
        distill(recipe, show_progress=False)
    root = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(root).name == "step-000002"
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    assert distill(recipe, resume=True, show_progress=False).steps == 6


def test_resume_refuses_a_changed_recipe(recipe_file, tmp_path):
    distill(load_recipe(recipe_file, ["train.max_steps=2"]), show_progress=False)
    with pytest.raises(OutputError, match="loss.temperature"):
        distill(load_recipe(recipe_file, ["loss.temperature=3"]), resume=True, show_progress=False)
    # extending max_steps is allowed
    assert distill(load_recipe(recipe_file, ["train.max_steps=4"]), resume=True, show_progress=False).steps == 4


def test_data_report_is_written(recipe_file):
    result = distill(load_recipe(recipe_file, ["train.max_steps=1"]), show_progress=False)
    report = json.loads((result.output_dir / "data_report.json").read_text())
    assert report["train_examples"] == 32 and report["validation_examples"] == 8


def test_a_wall_clock_budget_stops_the_run_after_the_step_that_spends_it(recipe_file):
    result = distill(load_recipe(recipe_file, ["train.max_seconds=0.001"]), show_progress=False)
    assert result.steps == 1  # the first step already takes longer than a millisecond
    assert latest_checkpoint(result.output_dir / "checkpoints").name == "step-000001"
    assert json.loads((result.output_dir / "final_metrics.json").read_text())["steps"] == 1
    assert [r["step"] for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss/total" in r] == [1]


def test_a_token_budget_stops_the_run_at_the_step_that_reaches_it_and_a_resume_adds_none(recipe_file):
    full = distill(load_recipe(recipe_file, ["train.max_steps=6", "output.dir=" + str(recipe_file.parent / "full")]),
                   show_progress=False)
    per_step = [r["counted_tokens"] for r in read_metrics(full.output_dir / "metrics.jsonl") if "loss/total" in r]
    budget = sum(per_step[:2]) + 1  # reached during step 3
    result = distill(load_recipe(recipe_file, [f"train.max_tokens={budget}"]), show_progress=False)
    assert result.steps == 3
    counted = [r["counted_tokens"] for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss/total" in r]
    assert sum(counted) >= budget > sum(counted[:-1])
    again = distill(load_recipe(recipe_file, [f"train.max_tokens={budget}"]), resume=True, show_progress=False)
    assert again.steps == 3  # the budget was spent: the resumed run trains no further step
