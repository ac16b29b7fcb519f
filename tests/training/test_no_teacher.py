"""Objectives that need no teacher (ce / redi only: SFT, sequence-level KD on teacher-written text): the teacher is
never loaded nor its tokenizer read, validation reports CE only, and plan / cache-teacher handle such recipes."""

from __future__ import annotations

import pytest

from kdlm.cache import capture_teacher
from kdlm.config import load_recipe
from kdlm.data import IGNORE, prepare_data
from kdlm.errors import ConfigError, ModelError
from kdlm.models.loading import load_tokenizer, resolve_source
from kdlm.training import distill
from kdlm.training import plan as planner

from .conftest import _chat_rows

MISSING = "/nonexistent/teacher-model"
CE_ONLY = [f"teacher.model={MISSING}", "loss.terms=[{name: ce}]"]


def test_a_ce_only_recipe_never_loads_the_teacher(recipe_file, monkeypatch):
    import kdlm.training.trainer as trainer

    loaded = []
    real_load = trainer.load_model
    monkeypatch.setattr(trainer, "load_model", lambda source, **kw: loaded.append(source.path) or real_load(source, **kw))
    result = distill(load_recipe(recipe_file, CE_ONLY), show_progress=False)
    assert result.steps == 6 and len(loaded) == 1, "only the student is loaded"
    assert set(result.before) == set(result.after) == {"ce", "tokens"}  # no KL or top-1 without a teacher
    assert result.after["ce"] < result.before["ce"]
    card = (result.model_dir / "README.md").read_text()
    assert "none loaded" in card and "KL to teacher" not in card


def test_a_divergence_term_still_needs_the_teacher(recipe_file, tmp_path):
    with pytest.raises(ModelError, match=f"{MISSING}: model folder not found") as err:
        distill(load_recipe(recipe_file, [f"teacher.model={MISSING}"]), show_progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists(), "nothing is written before the inputs are checked"


def test_plan_counts_no_teacher_for_a_ce_only_recipe(recipe_file, monkeypatch):
    monkeypatch.setattr(planner, "measure_matmul_gflops", lambda *a, **k: 100.0)
    with_teacher = planner.estimate(load_recipe(recipe_file))
    alone = planner.estimate(load_recipe(recipe_file, CE_ONLY))
    assert any(k.startswith("teacher") for k in with_teacher.memory_mb)
    assert not any(k.startswith("teacher") for k in alone.memory_mb)
    assert alone.total_mb < with_teacher.total_mb and alone.tokens_per_s > with_teacher.tokens_per_s
    assert not any("cache the teacher" in s for s in alone.suggestions)


def test_cache_teacher_refuses_a_recipe_that_would_not_read_the_cache(recipe_file):
    with pytest.raises(ConfigError, match="no term uses the teacher .* nothing to cache"):
        capture_teacher(load_recipe(recipe_file, CE_ONLY), show_progress=False)


def _redi_rows(n: int) -> list[dict]:
    rows = _chat_rows(n)
    for i, row in enumerate(rows):
        row["negative"] = i % 3 == 1
        row["weight"] = [1.0, 0.5, 2.0][i % 3]
    return rows


def test_redi_on_verified_and_rejected_answers_trains_without_a_teacher(recipe_file, make_jsonl, tiny_model_dir):
    data = make_jsonl(_redi_rows(40), name="redi.jsonl")
    overrides = [f"teacher.model={MISSING}", f"data.train={data}", "data.negative_field=negative",
                 "data.weight_field=weight", "loss.terms=[{name: redi}, {name: ce, weight: 0.5}]", "train.max_steps=3"]
    recipe = load_recipe(recipe_file, overrides)
    result = distill(recipe, show_progress=False)
    assert result.steps == 3 and result.data.negative_examples == 13
    # validation is unweighted and leaves the rejected answers out
    _, validation, _ = prepare_data(recipe.data, load_tokenizer(resolve_source(str(tiny_model_dir))), seed=42)
    positive_tokens = sum(sum(label != IGNORE for label in ex.labels[1:]) for ex in validation if not ex.negative)
    assert any(ex.negative for ex in validation) and result.after["tokens"] == positive_tokens
    assert all("loss/redi" in row and "loss/ce" in row for row in result.history)


def test_negative_rows_without_a_redi_term_are_refused_at_start(recipe_file, make_jsonl, tmp_path):
    data = make_jsonl(_redi_rows(9), name="redi.jsonl")
    recipe = load_recipe(recipe_file, [f"data.train={data}", "data.negative_field=negative"])
    with pytest.raises(ConfigError, match=r"data.negative_field marks 3 negative rows but no loss term uses them; "
                                          r"add \{name: redi\}") as err:
        distill(recipe, show_progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()
