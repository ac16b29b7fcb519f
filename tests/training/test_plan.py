"""`kdlm plan`: the memory model's parts, and the suggestions it makes."""

from __future__ import annotations

import pytest

from kdlm.config import load_recipe
from kdlm.training import plan as planner


@pytest.fixture
def quiet_matmul(monkeypatch):
    monkeypatch.setattr(planner, "measure_matmul_gflops", lambda *a, **k: 100.0)


def test_parts_add_up_and_follow_the_recipe(recipe_file, quiet_matmul):
    base = planner.estimate(load_recipe(recipe_file))
    assert base.total_mb == pytest.approx(sum(base.memory_mb.values()))
    assert base.tokens_per_s > 0 and base.data["counted_per_micro_batch"] > 0
    student = planner.model_shape(str(load_recipe(recipe_file).student.model), keep_layers=2)
    assert student.layers == 2
    # 16 bytes per student parameter: fp32 weights, gradients and AdamW's two moments
    assert base.memory_mb["student weights + grads + AdamW"] == pytest.approx(student.params * 16 / 2**20)

    bigger = planner.estimate(load_recipe(recipe_file, ["train.batch_size=8"]))
    assert bigger.memory_mb["student activations"] > base.memory_mb["student activations"]
    checkpointed = planner.estimate(load_recipe(recipe_file, ["train.gradient_checkpointing=true"]))
    assert checkpointed.memory_mb["student activations"] < base.memory_mb["student activations"]
    cached = planner.estimate(load_recipe(recipe_file, ["teacher.source=cache"]))
    assert "teacher weights" not in cached.memory_mb and cached.tokens_per_s > base.tokens_per_s


def test_lm_heads_are_timed_at_the_fp32_rate_under_autocast(recipe_file, monkeypatch):
    import torch

    rates = {torch.float32: 100.0, torch.bfloat16: 400.0}
    monkeypatch.setattr(planner, "measure_matmul_gflops", lambda dtype, device, **kw: rates[dtype])
    fp32 = planner.estimate(load_recipe(recipe_file, ["train.mixed_precision=no"]))
    bf16 = planner.estimate(load_recipe(recipe_file, ["train.mixed_precision=bf16"]))
    # the decoder bodies get the 4x faster bf16 rate, the LM heads and losses stay fp32
    assert fp32.tokens_per_s < bf16.tokens_per_s < 4 * fp32.tokens_per_s


def test_suggests_what_to_change_when_memory_is_short(recipe_file, quiet_matmul, monkeypatch):
    monkeypatch.setattr(planner, "_available_mb", lambda device: 10.0)
    plan = planner.estimate(load_recipe(recipe_file, ["loss.fused=false"]))
    text = "\n".join(plan.suggestions)
    assert "exceeds 90%" in text and "batch_size" in text and "loss.fused: true" in text
    assert "kdlm plan" in planner.render(plan)


def test_model_shape_counts_parameters_from_safetensors(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    unique = {id(p): p for p in model.parameters()}.values()
    assert planner.model_shape(str(tiny_model_dir)).params == sum(p.numel() for p in unique)


def test_model_shape_of_a_pruned_student_matches_the_pruned_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from kdlm.config.schema import PruneConfig
    from kdlm.models.init_student import parameter_count
    from kdlm.models.prune import prune_student

    cfg = PruneConfig(intermediate_size=40, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prune_student(model, 3, cfg, [[1, 2, 3, 4, 5, 6]] * 2)
    shape = planner.model_shape(str(tiny_model_dir), keep_layers=3, prune=cfg)
    assert shape.params == parameter_count(model)
    assert (shape.layers, shape.intermediate) == (3, 40)


def test_feature_terms_have_their_own_memory_line(recipe_file, quiet_matmul):
    logit = planner.estimate(load_recipe(recipe_file))
    assert "feature terms (hint / attention)" not in logit.memory_mb
    one = planner.estimate(load_recipe(recipe_file, ["loss.terms=[{name: forward_kl}, {name: hint, layers: [[1, 3]]}]"]))
    both = planner.estimate(load_recipe(recipe_file, ["loss.terms=[{name: forward_kl}, {name: hint}, "
                                                      "{name: attention_relation, relation_heads: 2}]"]))
    assert 0 < one.memory_mb["feature terms (hint / attention)"] < both.memory_mb["feature terms (hint / attention)"]
    assert both.total_mb > one.total_mb > logit.total_mb


def test_capacity_gap_advice_names_the_ratio_and_the_remedies():
    from kdlm.training.plan import capacity_gap_advice

    assert capacity_gap_advice(300_000_000, 100_000_000) is None  # 3x: close to MiniMA's 2.5x
    advice = capacity_gap_advice(7_000_000_000, 135_000_000)
    assert "51.9x" in advice and "2.5x" in advice and "338M" in advice and "taid" in advice
    assert "taid" not in capacity_gap_advice(7_000_000_000, 135_000_000, has_taid=True)


def test_plan_shows_the_teachers_weights_per_process_full_and_sharded(monkeypatch):
    import pytest

    from kdlm.training.plan import ModelShape, _teacher_modes

    monkeypatch.setenv("WORLD_SIZE", "4")
    shape = ModelShape(params=1_000_000, embedding_params=200_000, layers=8, hidden=100, intermediate=400,
                       kv_dim=50, vocab=2_000)
    world, per = _teacher_modes(shape, 4)
    assert world == 4
    assert per["ddp"] * 2**20 == pytest.approx(4_000_000)
    # a quarter of the fp32 weights, plus two gathered layers (100k params each) and the gathered head (200k)
    assert per["fsdp"] * 2**20 == pytest.approx(1_000_000 + 2 * 400_000 + 800_000)
