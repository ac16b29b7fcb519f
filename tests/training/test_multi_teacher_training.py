"""Multi-teacher KD in the one loop: every teacher's term is logged on its own, live and cached teachers mix,
min_ce and domain pooling select one teacher per example, and bad teacher sets fail before training."""

from __future__ import annotations

import json

import pytest

from kdlm.config import load_recipe
from kdlm.errors import ConfigError, DataError
from kdlm.training import distill
from kdlm.training.metrics import read_metrics


def _teachers(first, second, **extra) -> str:
    a = {"model": str(first), "name": "sharp", "weight": 3.0, **extra.get("a", {})}
    b = {"model": str(second), "name": "plain", "weight": 1.0, **extra.get("b", {})}
    return "teachers=" + json.dumps([a, b])


def _rows(result):
    return [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss/total" in r]


def test_two_live_teachers_log_both_terms_and_sum_by_weight(recipe_file, sharp_teacher_dir, tiny_model_dir, one_thread):
    recipe = load_recipe(recipe_file, [_teachers(sharp_teacher_dir, tiny_model_dir), "train.max_steps=3"])
    result = distill(recipe, show_progress=False)
    rows = _rows(result)
    assert len(rows) == 3
    for r in rows:
        assert r["loss/forward_kl@sharp"] > 0 and r["loss/forward_kl@plain"] > 0
        # 0.7 * (3/4 * KL_sharp + 1/4 * KL_plain) + 0.3 * CE
        expected = 0.7 * (0.75 * r["loss/forward_kl@sharp"] + 0.25 * r["loss/forward_kl@plain"]) + 0.3 * r["loss/ce"]
        assert r["loss/total"] == pytest.approx(expected, rel=1e-5)
    # the two teachers differ, so their KLs differ
    assert rows[0]["loss/forward_kl@sharp"] != pytest.approx(rows[0]["loss/forward_kl@plain"], rel=1e-3)
    # validation compares with the first teacher
    assert set(result.after) >= {"kl_to_teacher", "top1_agreement"}


def test_min_ce_pooling_counts_one_teacher_per_example(recipe_file, sharp_teacher_dir, tiny_model_dir, one_thread):
    recipe = load_recipe(recipe_file, [_teachers(sharp_teacher_dir, tiny_model_dir), "loss.teacher_pooling=min_ce",
                                       "train.max_steps=2"])
    rows = _rows(distill(recipe, show_progress=False))
    for r in rows:  # each example's KL counts once, against its best teacher: the total is weight * (sum of both)
        expected = 0.7 * (r["loss/forward_kl@sharp"] + r["loss/forward_kl@plain"]) + 0.3 * r["loss/ce"]
        assert r["loss/total"] == pytest.approx(expected, rel=1e-5)


def test_domain_pooling_routes_rows_and_names_a_domain_without_teacher(tmp_path, sharp_teacher_dir, tiny_model_dir,
                                                                       make_jsonl, one_thread):
    rows = [{"prompt": f"say {w}", "completion": f" {w} {w}", "topic": "a" if i % 2 else "b"}
            for i, w in enumerate("cat dog mat park sang trees green birds ran sat".split() * 2)]
    data = make_jsonl(rows)
    base = [f"student.model={tiny_model_dir}", "student.keep_layers=2", f"data.train={data}",
            "data.domain_field=topic", "data.max_length=32", "loss.teacher_pooling=domain",
            "loss.terms=[{name: forward_kl}]", "train.max_steps=2", "train.batch_size=4", "train.report_to=[]",
            f"output.dir={tmp_path / 'run'}"]
    recipe = load_recipe(None, base + [_teachers(sharp_teacher_dir, tiny_model_dir, a={"domains": ["a"]},
                                                 b={"domains": ["b"]})])
    result = distill(recipe, show_progress=False)
    assert all(r["loss/forward_kl@sharp"] > 0 and r["loss/forward_kl@plain"] > 0 for r in _rows(result))
    missing = load_recipe(None, base + [_teachers(sharp_teacher_dir, tiny_model_dir, a={"domains": ["a"]},
                                                  b={"domains": ["c"]}), f"output.dir={tmp_path / 'run2'}"])
    with pytest.raises(DataError, match="domain 'b' .*belongs to no teacher"):
        distill(missing, show_progress=False)
    assert not (tmp_path / "run2").exists()


def test_teachers_with_different_chat_templates_fail_before_training(recipe_file, sharp_teacher_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other_template"
    AutoModelForCausalLM.from_pretrained(sharp_teacher_dir).save_pretrained(other)
    tok = AutoTokenizer.from_pretrained(sharp_teacher_dir)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(other)
    recipe = load_recipe(recipe_file, [_teachers(sharp_teacher_dir, other)])
    with pytest.raises(ConfigError, match=r"teachers\[1\].*chat template differs") as err:
        distill(recipe, show_progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_cached_and_a_live_teacher_mix(recipe_file, sharp_teacher_dir, tiny_model_dir, tmp_path, one_thread):
    from kdlm.cache.capture import capture_teacher
    from kdlm.cache.cli import single_teacher

    cache = tmp_path / "plain_cache"
    recipe = load_recipe(recipe_file, [_teachers(sharp_teacher_dir, tiny_model_dir, b={
        "source": "cache", "cache_dir": str(cache), "cache_top_k": 16, "cache_temperature": 2.0}),
        "train.max_steps=2"])
    capture_teacher(single_teacher(recipe, "plain"), show_progress=False)
    rows = _rows(distill(recipe, show_progress=False))
    assert all(r["loss/forward_kl@sharp"] > 0 and r["loss/forward_kl@plain"] > 0 for r in rows)
    with pytest.raises(ConfigError, match="--teacher nope: no teacher of that name; the recipe's teachers are sharp"):
        single_teacher(recipe, "nope")
