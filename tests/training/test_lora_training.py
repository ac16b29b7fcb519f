"""LoRA students in `kdlm distill`: only the adapters reach the optimizer, exact resume, both exports, and the
plan's trainable-parameter count against the real peft-wrapped student."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdlm.config import load_recipe
from kdlm.training import distill
from kdlm.training import trainer as trainer_module
from kdlm.training.checkpoint import latest_checkpoint
from kdlm.training.metrics import read_metrics

LORA = ["student.lora.enabled=true", "student.lora.r=4", "train.learning_rate=0.002"]


def _track_optimizer(monkeypatch) -> dict:
    """Record the optimizer objective_stage builds, and the student's parameter counts then (the export merges
    the adapters into it in place at the end)."""
    from kdlm.models.lora import trainable_parameters

    seen = {}
    original = trainer_module.objective_stage

    def spy(recipe, models, terms):
        module, optimizer, scheduler = original(recipe, models, terms)
        seen.update(counts=trainable_parameters(models.student), optimizer=optimizer)
        return module, optimizer, scheduler

    monkeypatch.setattr(trainer_module, "objective_stage", spy)
    return seen


def test_lora_run_trains_only_the_adapters_and_exports_a_plain_model(recipe_file, tmp_path, monkeypatch, capsys,
                                                                     one_thread):
    from transformers import AutoModelForCausalLM

    seen = _track_optimizer(monkeypatch)
    result = distill(load_recipe(recipe_file, LORA), show_progress=False)
    assert "kdlm: student: LoRA r=4 on 7 module kinds: " in capsys.readouterr().out
    trainable, total = seen["counts"]
    optimized = [p for group in seen["optimizer"].param_groups for p in group["params"]]
    assert sum(p.numel() for p in optimized) == trainable < total / 2
    assert all(p.requires_grad for p in optimized)
    # the export: a plain transformers folder (no peft keys), the adapters merged in
    saved = load_file(result.model_dir / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in saved)
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert model.config.num_hidden_layers == 2 and "LoRA r=4" in (result.model_dir / "README.md").read_text()
    assert result.after["kl_to_teacher"] < result.before["kl_to_teacher"]


def test_lora_with_width_pruning_prunes_first(recipe_file, capsys, one_thread):
    result = distill(load_recipe(recipe_file, LORA + ["student.prune.intermediate_size=32", "train.max_steps=2",
                                                      "train.save_every=0", "student.lora.export=adapter"]),
                     show_progress=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("kdlm: student: ")]
    assert len(lines) == 2 and "LoRA r=4" in lines[1]  # the pruning's line, then the adapters'
    import json

    config = json.loads((result.model_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"])[0] == "down_proj"
    weights = load_file(result.model_dir / "adapter_model.safetensors")
    down_a = next(v for k, v in weights.items() if "down_proj.lora_A" in k)
    assert down_a.shape == (4, 32)  # the adapter sits on the pruned 32-neuron MLP


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "adapter_model.safetensors")


def test_lora_run_resumes_to_the_same_adapter_and_metrics(recipe_file, tmp_path, one_thread):
    overrides = LORA + ["student.lora.export=adapter", "student.lora.dropout=0.1"]  # dropout: RNG state resumes too
    straight = distill(load_recipe(recipe_file, overrides + [f"output.dir={tmp_path / 'straight'}"]),
                       show_progress=False)

    class Crash(RuntimeError):
        pass

    def crash_after_3(step: int) -> None:
        if step == 3:
            raise Crash

    recipe = load_recipe(recipe_file, overrides + [f"output.dir={tmp_path / 'crashed'}"])
    with pytest.raises(Crash):
        distill(recipe, on_step=crash_after_3, show_progress=False)
    assert latest_checkpoint(tmp_path / "crashed" / "checkpoints").name == "step-000002"
    resumed = distill(recipe, resume=True, show_progress=False)
    assert resumed.steps == straight.steps == 6
    a, b = _adapter(tmp_path / "straight"), _adapter(tmp_path / "crashed")
    assert a.keys() == b.keys() and all("lora_" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    rows = {r["step"]: r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "loss/total" in r}
    again = {r["step"]: r for r in read_metrics(tmp_path / "crashed" / "metrics.jsonl") if "loss/total" in r}
    for step in range(3, 7):  # the steps after the checkpoint, recomputed from the restored state
        assert again[step]["loss/total"] == pytest.approx(rows[step]["loss/total"], abs=1e-6)
    for key, value in straight.after.items():
        assert resumed.after[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("extra", [[], ["student.lora.target_modules=[q_proj,v_proj]", "student.lora.r=8"],
                                   ["student.lora.modules_to_save=[lm_head]"],
                                   ["student.prune.intermediate_size=32", "student.prune.num_key_value_heads=1"]])
def test_plan_counts_the_trainable_parameters_of_the_real_lora_student(recipe_file, monkeypatch, extra, one_thread):
    from kdlm.models.loading import load_model, resolve_source
    from kdlm.models.lora import apply_lora, trainable_parameters
    from kdlm.models.prune import prune_student
    from kdlm.training import plan as planner

    monkeypatch.setattr(planner, "measure_matmul_gflops", lambda *a, **k: 100.0)
    recipe = load_recipe(recipe_file, LORA + extra)
    plan = planner.estimate(recipe)
    full = planner.estimate(load_recipe(recipe_file, extra))

    student = load_model(resolve_source(recipe.student.model), dtype=torch.float32, device=torch.device("cpu"))
    calibration = [[1, 5, 9, 30, 41, 7, 3, 12]] * 4
    prune_student(student, recipe.student.keep_layers, recipe.student.prune, calibration)
    trainable, total = trainable_parameters(apply_lora(student, recipe.student.lora))
    assert (plan.trainable_params, plan.student_params) == (trainable, total)
    assert full.trainable_params == full.student_params < total
    assert plan.memory_mb["LoRA weights + grads + AdamW"] == pytest.approx(trainable * 16 / 2**20)
    assert plan.memory_mb["student weights (frozen)"] == pytest.approx((total - trainable) * 4 / 2**20)
    assert plan.optimizer_state_mb == pytest.approx(trainable * 8 / 2**20)
    assert plan.optimizer_state_mb < full.optimizer_state_mb
    assert plan.total_mb < full.total_mb
    assert "trainable parameters:" in planner.render(plan) and "optimizer state" in planner.render(plan)


def test_feature_terms_and_gradient_checkpointing_reach_inside_a_lora_student(recipe_file, one_thread):
    terms = ("loss.terms=[{name: forward_kl, weight: 1.0}, {name: hint, weight: 0.5, layers: [[0, 1], [1, 2]], "
             "metric: normalised_mse}, {name: attention_relation, weight: 0.5, layers: [[1, 3]]}]")
    result = distill(load_recipe(recipe_file, LORA + [terms, "train.max_steps=2", "train.save_every=0",
                                                      "train.gradient_checkpointing=true"]), show_progress=False)
    rows = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss/total" in r]
    assert len(rows) == 2 and all(r["loss/hint"] > 0 and r["loss/attention_relation"] > 0 for r in rows)
