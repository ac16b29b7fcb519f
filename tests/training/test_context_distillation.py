"""Context distillation (Snell et al. 2022) with a live white-box teacher: the teacher reads the chat with
demonstrations, the student without them, and the divergence is taken over the answer positions."""

from __future__ import annotations

import copy

import pytest
import torch

from kdlm.config import DataConfig, LossConfig, LossTerm, load_recipe
from kdlm.data import IGNORE, Collator, prepare_data
from kdlm.losses.objective import resolve_terms
from kdlm.models.loading import load_model, resolve_source
from kdlm.training import distill
from kdlm.training.step import DistillationModule, Teacher, counted_positions, last_hidden, model_inputs, teacher_signal

from .conftest import _chat_rows

DEMOS = [{"role": "user", "content": "the cat sat on a mat"}, {"role": "assistant", "content": "the dog ran"},
         {"role": "user", "content": "birds sang in green trees"}, {"role": "assistant", "content": "to the park"}]


def _rows(n: int, *, demonstrations: bool) -> list[dict]:
    rows = _chat_rows(n)
    for row in rows:
        row["teacher_messages"] = (DEMOS if demonstrations else []) + row["messages"]
    return rows


@pytest.fixture
def pair(tiny_model_dir):
    """A student and a teacher that is an exact copy of it, so any divergence comes from their inputs."""
    student = load_model(resolve_source(str(tiny_model_dir)), dtype=torch.float32, device=torch.device("cpu"))
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    vocab = student.get_output_embeddings().weight.shape[0]
    return student, Teacher(teacher, vocab), vocab


def _batch(make_jsonl, tokenizer, rows):
    path = make_jsonl(rows)
    train, _, _ = prepare_data(DataConfig(train=str(path), validation_fraction=0.0,
                                          teacher_messages_field="teacher_messages"), tokenizer, seed=0)
    return train, Collator(tokenizer.pad_token_id)(train)


def _forward_kl(student, teacher, vocab, batch) -> float:
    module = DistillationModule(student, resolve_terms(LossConfig(terms=[LossTerm(name="forward_kl")])), vocab)
    with torch.no_grad():
        sums = module(labels=batch["labels"], teacher=teacher_signal(teacher, batch), **model_inputs(batch))
    return sums["forward_kl"].item()


def test_the_same_chat_on_both_sides_gives_exactly_zero(pair, make_jsonl, tiny_tokenizer):
    student, teacher, vocab = pair
    _, batch = _batch(make_jsonl, tiny_tokenizer, _rows(5, demonstrations=False))
    assert torch.equal(batch["teacher_input_ids"], batch["input_ids"])
    assert _forward_kl(student, teacher, vocab, batch) == 0.0


def test_demonstrations_move_the_teacher_and_its_rows_are_the_answer_positions(pair, make_jsonl, tiny_tokenizer):
    student, teacher, vocab = pair
    examples, batch = _batch(make_jsonl, tiny_tokenizer, _rows(5, demonstrations=True))
    assert batch["teacher_input_ids"].shape[1] > batch["input_ids"].shape[1]
    assert _forward_kl(student, teacher, vocab, batch) > 1e-3

    signal = teacher_signal(teacher, batch)
    _, student_targets = counted_positions(batch["labels"])
    _, teacher_targets = counted_positions(batch["teacher_labels"])
    assert torch.equal(teacher_targets, student_targets)  # row for row, the same tokens are predicted
    # a manual forward of each teacher chat alone (no padding), at the positions that predict its answer
    manual = []
    for ex in examples:
        with torch.no_grad():
            hidden = last_hidden(teacher.model, {"input_ids": torch.tensor([ex.teacher_input_ids])})[0]  # [L_t, H]
        manual += [hidden[i] for i in range(len(ex.teacher_labels) - 1) if ex.teacher_labels[i + 1] != IGNORE]
    assert signal.hidden.shape == (student_targets.numel(), hidden.shape[-1])
    torch.testing.assert_close(signal.hidden, torch.stack(manual), rtol=1e-5, atol=1e-5)


def test_distill_with_a_teacher_chat(recipe_file, make_jsonl, monkeypatch, tiny_tokenizer):
    import kdlm.training.step as step

    data = make_jsonl(_rows(30, demonstrations=True), name="context.jsonl")
    seen = []  # what each teacher forward read: its first row, decoded
    real_rows = step.Teacher.rows
    monkeypatch.setattr(step.Teacher, "rows", lambda self, inputs, mask, **kwargs: seen.append(
        tiny_tokenizer.decode(inputs["input_ids"][0])) or real_rows(self, inputs, mask))
    recipe = load_recipe(recipe_file, [f"data.train={data}", "data.teacher_messages_field=teacher_messages",
                                       "data.max_length=160", "train.max_steps=3", "train.save_every=0"])
    result = distill(recipe, show_progress=False)
    assert result.steps == 3 and result.after["kl_to_teacher"] > 0 and result.after["tokens"] > 0
    # training and validation forwards alike: the teacher always read the chat with the demonstrations
    assert len(seen) >= 3 and all("the dog ran" in text and "to the park" in text for text in seen)
