"""Tiny data files in the formats of the built-in tasks (SelfInst, P3/T0, GSM8K, text) and task files using them.

The models are the shared tiny random Llamas of tests/conftest.py (`tiny_model_dir`, `tiny_student_dir`).
Real data, when present, is read from ../shared/data relative to the repository root.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


SELFINST_ROWS = [
    {"id": "t0", "instruction": "Rewrite the sentence to be shorter.",
     "instances": [{"input": "The quick brown fox jumps over the lazy dog.", "output": "The fox jumps over the dog."}]},
    {"id": "t1", "instruction": "Say hello to the user.", "instances": [{"input": "", "output": "Hello world! How are you?"}]},
    {"id": "t2", "instruction": "What is the capital of France?",
     "instances": [{"input": "", "output": "Paris is the capital of France."}]},
]

SENTIMENT_ROWS = [
    {"prompt": "The film was great and I loved it. \nIs this review positive or negative?\n", "completion": "positive<|endoftext|>"},
    {"prompt": "A boring plot and bad actors. \nIs this review positive or negative?\n", "completion": "negative<|endoftext|>"},
    {"prompt": "Really good story, very funny. \nIs this review positive or negative?\n", "completion": "positive<|endoftext|>"},
    {"prompt": "I hated the movie. It was awful. \nIs this review positive or negative?\n", "completion": "negative<|endoftext|>"},
]
OOD_ROWS = [
    {"prompt": "Title: ok\nReview: Works well.\nIs the review positive or negative?\n", "completion": "Positive<|endoftext|>"},
    {"prompt": "Title: no\nReview: Broke in a day.\nIs the review positive or negative?\n", "completion": "Negative<|endoftext|>"},
]
GSM_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
    {"question": "A pen costs $2. How much do 5 pens cost?", "answer": "5*2=<<5*2=10>>10\n#### 10"},
]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A --data-dir with a SelfInst-format file, a P3 sentiment file and its OOD set, and GSM8K-format files."""
    root = tmp_path / "data"
    write_jsonl(root / "self-instruct" / "user_oriented_instructions.jsonl", SELFINST_ROWS)
    write_jsonl(root / "t0" / "sentiment.jsonl", SENTIMENT_ROWS)
    write_jsonl(root / "t0" / "ood.jsonl", OOD_ROWS)
    write_jsonl(root / "gsm8k" / "test.jsonl", GSM_ROWS)
    write_jsonl(root / "gsm8k" / "train.jsonl", GSM_ROWS[::-1])
    (root / "held_out.txt").write_text("Hello world! How are you today?\nThe quick brown fox.\n", encoding="utf-8")
    return root


SENTIMENT_TASK = """\
name: tiny_sentiment
type: classification
source: t0/sentiment.jsonl
options: [negative, positive]
input_field: prompt
input_pattern: "^(?P<input>.*?)\\\\s*\\\\nIs this review positive or negative\\\\?\\\\s*$"
ood:
  shop: t0/ood.jsonl
"""


@pytest.fixture
def sentiment_task(tmp_path) -> Path:
    path = tmp_path / "tiny_sentiment.yaml"
    path.write_text(SENTIMENT_TASK, encoding="utf-8")
    return path


@pytest.fixture
def write_task(tmp_path):
    """`write_task(text, name="task.yaml")` -> path of a task file holding `text`."""

    def write(text: str, name: str = "task.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def shared_data_or_skip() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
