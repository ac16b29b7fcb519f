"""Every recipe shipped in recipes/ validates, and the generated references in docs/ are current."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlm.cli import cli_reference
from kdlm.config import config_reference, load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "kdlm" / "recipes").glob("*.yaml"))


def test_there_is_a_quickstart_and_a_gpu_recipe():
    names = {p.stem for p in RECIPES}
    assert "quickstart" in names and any(n.startswith("qwen") for n in names)
    assert (ROOT / "recipes").resolve() == (ROOT / "kdlm" / "recipes").resolve()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.loss.terms and recipe.train.max_steps >= 1


@pytest.mark.parametrize("name, generate", [("config.md", config_reference), ("cli.md", cli_reference)])
def test_generated_reference_is_current(name, generate):
    committed = (ROOT / "docs" / "reference" / name).read_text()
    assert committed == generate() + "\n", f"docs/reference/{name} is stale: run `make docs`"
