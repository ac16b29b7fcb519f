"""Fixtures for `kdlm compare`: a tiny recipe (tiny Llama teacher, 2-layer student), a tiny balanced sentiment
task with its data, and `write_grid` to write a grid file around them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in green trees".split()


def _chat_rows(n: int) -> list[dict]:
    """Deterministic short user/assistant chats over a small vocabulary."""
    rows = []
    for i in range(n):
        pick = lambda k, o: " ".join(WORDS[(i * 7 + o + 3 * j) % len(WORDS)] for j in range(k))  # noqa: E731
        rows.append({"messages": [{"role": "user", "content": pick(4 + i % 5, 0)},
                                  {"role": "assistant", "content": pick(3 + i % 7, 5)}]})
    return rows

SENTIMENT = [
    {"prompt": "The film was great and I loved it. \nIs this review positive or negative?\n", "completion": "positive"},
    {"prompt": "A boring plot and bad actors. \nIs this review positive or negative?\n", "completion": "negative"},
    {"prompt": "Really good story, very funny. \nIs this review positive or negative?\n", "completion": "positive"},
    {"prompt": "I hated the movie. It was awful. \nIs this review positive or negative?\n", "completion": "negative"},
]


@pytest.fixture
def tiny_grid(tmp_path, tiny_model_dir, tiny_student_dir, make_jsonl) -> dict[str, Any]:
    data = make_jsonl(_chat_rows(24), name="train.jsonl")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
teacher: {{model: {tiny_model_dir}}}
student: {{model: {tiny_student_dir}}}
data: {{train: {data}, validation_fraction: 0.25, max_length: 48}}
loss: {{terms: [{{name: forward_kl}}]}}
train: {{max_steps: 100, batch_size: 4, learning_rate: 0.003, warmup_steps: 0, log_every: 1, report_to: []}}
output: {{dir: {tmp_path / 'unused'}}}
""")
    data_dir = tmp_path / "data"
    make_jsonl(SENTIMENT, name="data/sentiment.jsonl")
    task = tmp_path / "tiny_sentiment.yaml"
    task.write_text("name: tiny_sentiment\ntype: classification\nsource: sentiment.jsonl\n"
                    "options: [negative, positive]\nmetrics: [balanced_accuracy, accuracy]\n")
    return {"recipe": recipe, "task": task, "data_dir": data_dir}


def write_grid(tmp_path: Path, tiny: dict[str, Any], *, variants: list[dict], name: str = "grid.yaml",
               budget: Optional[dict] = None, **extra: Any) -> Path:
    grid = {"name": "tiny", "recipe": str(tiny["recipe"]), "budget": budget or {"kind": "steps", "value": 3},
            "variants": variants,
            "eval": {"tasks": [str(tiny["task"])], "data_dir": str(tiny["data_dir"]), "batch_size": 4}}
    grid.update(extra)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path
