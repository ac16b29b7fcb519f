"""The shipped generation recipes validate, and the generation config reports bad fields in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlm.config.generation import GenerateRecipe, load_generate_recipe
from kdlm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "kdlm" / "recipes" / "generate").glob("*.yaml"))


def test_there_are_cpu_and_gpu_generation_recipes():
    names = {p.stem for p in RECIPES}
    assert {"gsm8k-cot-vllm-cpu", "step-by-step-cpu", "greybox-vllm-cpu"} <= names
    assert any("gpu" in n for n in names) and any("api" in n for n in names)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_generation_recipe_validates(path):
    recipe = load_generate_recipe(path)
    assert isinstance(recipe, GenerateRecipe) and recipe.generate.prompts


def test_unknown_field_names_the_nearest(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("generate: {pipline: cot}\n")
    with pytest.raises(ConfigError, match=r"generate.pipline: unknown field \(did you mean 'generate.pipeline'\?\)"):
        load_generate_recipe(path)


def test_bad_values_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("teacher: {backend: openai}\ngenerate: {pipeline: cot}\n")
    with pytest.raises(ConfigError, match="generate.pipeline: 'cott' is not one of"):
        load_generate_recipe(path, ["generate.pipeline=cott"])
    with pytest.raises(ConfigError, match="generate.logprobs: 21 is out of range"):
        load_generate_recipe(path, ["generate.logprobs=21"])
    with pytest.raises(ConfigError, match="teacher.extra_body: expected a mapping"):
        load_generate_recipe(path, ["teacher.extra_body=[1]"])
    recipe = load_generate_recipe(path, ["generate.n=4", "teacher.base_url=[http://a/v1, http://b/v1]"])
    assert recipe.generate.n == 4 and recipe.teacher.base_url == ["http://a/v1", "http://b/v1"]


def test_dry_run_of_the_cpu_step_by_step_recipe(monkeypatch, capsys):
    from kdlm.generation.run import generate

    monkeypatch.chdir(ROOT)  # the recipe names the packaged prompts relative to the repository
    result = generate(load_generate_recipe(ROOT / "kdlm" / "recipes" / "generate" / "step-by-step-cpu.yaml"),
                      dry_run=True, show_progress=False)
    assert result.summary["prompts"] == 60 and result.summary["samples"] == 240
    assert "dry run: 60 prompts -> 60 requests (240 samples)" in capsys.readouterr().out
