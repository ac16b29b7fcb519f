"""Fixtures for teacher-cache tests: a sharp tiny teacher, chat data, and a recipe factory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdlm.config import load_recipe

WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in green trees".split()


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        pick = lambda k: " ".join(WORDS[j] for j in torch.randint(len(WORDS), (k,), generator=g).tolist())  # noqa: E731
        rows.append({"messages": [{"role": "user", "content": pick(3 + i % 4)},
                                  {"role": "assistant", "content": pick(2 + i % 6)}]})
    return rows


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def cache_teacher_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its final norm scaled up, so its distributions are peaked (a real tail below top-k)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)
    out = tmp_path_factory.mktemp("cache_teacher")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture
def make_recipe(tmp_path, cache_teacher_dir, tiny_model_dir, make_jsonl):
    """`make_recipe(*overrides, rows=24)`: a recipe over chat data with the sharp teacher, cache in tmp_path/cache."""
    data = {}

    def make(*overrides: str, rows: int = 24):
        if rows not in data:
            data[rows] = make_jsonl(chat_rows(rows), name=f"train{rows}.jsonl")
        path = tmp_path / "recipe.yaml"
        path.write_text(f"""
teacher: {{model: {cache_teacher_dir}, device: cpu, source: cache, cache_dir: {tmp_path / "cache"}, cache_top_k: 64}}
student: {{model: {tiny_model_dir}}}
data: {{train: {data[rows]}, validation_fraction: 0.25, max_length: 48}}
loss: [{{name: forward_kl, weight: 0.7}}, {{name: ce, weight: 0.3}}]
train: {{batch_size: 4, seed: 7}}
output: {{dir: {tmp_path / "run"}}}
""")
        return load_recipe(path, list(overrides))

    return make


def tokenizer_of(recipe):
    """The student tokenizer, loaded as the trainer and the capture load it."""
    from kdlm.models.loading import load_tokenizer, resolve_source

    return load_tokenizer(resolve_source(recipe.student.model))


def examples_of(recipe):
    """Train + validation examples of a recipe (what the cache covers)."""
    from kdlm.data import prepare_data

    train, validation, _ = prepare_data(recipe.data, tokenizer_of(recipe), seed=recipe.train.seed)
    return train + validation
