"""Training from an offline teacher cache: the teacher is never loaded, and a stale cache is refused."""

from __future__ import annotations

import pytest

from kdlm.cache import capture_teacher
from kdlm.config import load_recipe
from kdlm.errors import ConfigError
from kdlm.training import distill


def test_training_from_the_cache_skips_the_teacher(recipe_file, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    recipe = load_recipe(recipe_file, [f"teacher.cache_dir={cache}", "teacher.source=cache", "loss.temperature=1.0",
                                       "teacher.cache_top_k=16"])
    capture_teacher(recipe, show_progress=False)

    import kdlm.training.trainer as trainer

    loaded = []
    real_load = trainer.load_model
    monkeypatch.setattr(trainer, "load_model", lambda source, **kw: loaded.append(source.path) or real_load(source, **kw))
    result = distill(recipe, show_progress=False)
    assert len(loaded) == 1, "only the student is loaded"
    assert result.steps == 6
    assert result.after["kl_to_teacher"] < result.before["kl_to_teacher"]


def test_a_cache_that_does_not_match_the_recipe_is_refused(recipe_file, tmp_path):
    cache = tmp_path / "cache"
    overrides = [f"teacher.cache_dir={cache}", "teacher.source=cache", "loss.temperature=1.0", "teacher.cache_top_k=8"]
    capture_teacher(load_recipe(recipe_file, overrides), show_progress=False)
    with pytest.raises(ConfigError, match="max_length"):
        distill(load_recipe(recipe_file, [*overrides, "data.max_length=48"]), show_progress=False)
    with pytest.raises(ConfigError, match="temperature"):
        distill(load_recipe(recipe_file, [*overrides, "loss.temperature=2.0"]), show_progress=False)


def test_cache_in_the_default_place_survives_the_run_that_reads_it(recipe_file, tmp_path):
    """`kdlm cache-teacher` writes <output.dir>/teacher_cache; the run then fills that folder without wiping it."""
    overrides = ["teacher.source=cache", "loss.temperature=1.0", "teacher.cache_top_k=8", "train.max_steps=2"]
    recipe = load_recipe(recipe_file, overrides)
    cache = capture_teacher(recipe, show_progress=False)
    assert cache == tmp_path / "run" / "teacher_cache"
    assert distill(recipe, show_progress=False).steps == 2  # not refused as "output folder is not empty"
    again = load_recipe(recipe_file, [*overrides, "output.overwrite=true"])
    assert distill(again, show_progress=False).steps == 2  # replacing the run keeps the cache it reads
    assert (cache / "manifest.json").is_file()
