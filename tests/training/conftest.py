"""Fixtures for training tests: a sharp tiny teacher, chat data and a recipe around them."""

from __future__ import annotations

import pytest
import torch

WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in green trees".split()


def _chat_rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        pick = lambda k: " ".join(WORDS[j] for j in torch.randint(len(WORDS), (k,), generator=g).tolist())  # noqa: E731
        rows.append({"messages": [{"role": "user", "content": pick(4 + i % 5)},
                                  {"role": "assistant", "content": pick(3 + i % 7)}]})
    return rows


@pytest.fixture(scope="module")
def sharp_teacher_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its final norm scaled up: random models are near-uniform, a teacher should not be."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)
    out = tmp_path_factory.mktemp("sharp_teacher")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture
def recipe_file(tmp_path, sharp_teacher_dir, tiny_model_dir, make_jsonl):
    data = make_jsonl(_chat_rows(40), name="train.jsonl")
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""
teacher: {{model: {sharp_teacher_dir}}}
student: {{model: {tiny_model_dir}, keep_layers: 2}}
data: {{train: {data}, validation_fraction: 0.2, max_length: 64}}
loss:
  temperature: 2.0
  terms: [{{name: forward_kl, weight: 0.7}}, {{name: ce, weight: 0.3}}]
train: {{max_steps: 6, batch_size: 4, learning_rate: 0.003, warmup_steps: 0, save_every: 2, log_every: 1,
        lr_scheduler: constant, report_to: [tensorboard]}}
output: {{dir: {tmp_path / "run"}}}
""")
    return path


