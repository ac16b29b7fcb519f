"""Context distillation data: the teacher's own chat (data.teacher_messages_field), encoded like the student's,
counting the same answer tokens; mismatches and truncation are row errors, packing and caches are refused."""

from __future__ import annotations

import pytest

from kdlm.config import DataConfig, load_recipe
from kdlm.data import IGNORE, Collator, prepare_data
from kdlm.data.encode import counted_tokens
from kdlm.errors import ConfigError, DataError

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = {"role": "assistant", "content": "Paris is the capital of France."}
DEMOS = [{"role": "user", "content": "Hello world!"}, {"role": "assistant", "content": "How are you today?"},
         {"role": "user", "content": "one two three"}, {"role": "assistant", "content": "four five six"}]


def row(teacher_answer: dict = ANSWER, **extra) -> dict:
    return {"messages": QUESTION + [ANSWER],
            "teacher_messages": [{"role": "system", "content": "Answer briefly."}] + DEMOS + QUESTION + [teacher_answer],
            **extra}


def cfg(path, **kw) -> DataConfig:
    return DataConfig(train=str(path), validation_fraction=0.0, teacher_messages_field="teacher_messages", **kw)


def test_teacher_chat_counts_only_the_answer_the_student_learns(make_jsonl, tiny_tokenizer):
    path = make_jsonl([row()])
    (ex,), _, _ = prepare_data(cfg(path), tiny_tokenizer, seed=0)
    assert len(ex.teacher_input_ids) > len(ex.input_ids) + 10  # the demonstrations are in the teacher's input only
    assert len(ex.teacher_labels) == len(ex.teacher_input_ids)
    # the same answer tokens, in the same order: the demonstrations' assistant turns are not counted
    assert counted_tokens(ex.teacher_labels) == counted_tokens(ex.labels)
    answer = tiny_tokenizer.decode(counted_tokens(ex.labels))
    assert answer == "Paris is the capital of France.<|im_end|>"
    # and they are the last tokens the teacher's chat counts, at the end of its input
    last = max(i for i, label in enumerate(ex.teacher_labels) if label != IGNORE)
    assert tiny_tokenizer.decode(ex.teacher_input_ids[last + 1:]) == "\n"


def test_multi_turn_student_chats_count_as_many_teacher_turns(make_jsonl, tiny_tokenizer):
    turns = QUESTION + [ANSWER, {"role": "user", "content": "And Italy?"}, {"role": "assistant", "content": "Rome."}]
    path = make_jsonl([{"messages": turns, "teacher_messages": DEMOS + turns}])
    (ex,), _, _ = prepare_data(cfg(path), tiny_tokenizer, seed=0)
    assert counted_tokens(ex.teacher_labels) == counted_tokens(ex.labels)
    assert "Rome." in tiny_tokenizer.decode(counted_tokens(ex.teacher_labels))


def test_a_different_answer_names_the_line(make_jsonl, tiny_tokenizer):
    path = make_jsonl([row(), row({"role": "assistant", "content": "Lyon is the capital of France."})])
    with pytest.raises(DataError, match=rf"{path}:2: answer tokens differ between 'messages' and 'teacher_messages'"):
        prepare_data(cfg(path), tiny_tokenizer, seed=0)
    train, _, report = prepare_data(cfg(path, skip_bad_rows=True), tiny_tokenizer, seed=0)
    assert len(train) == 1 and report.skipped_bad == 1


def test_truncation_that_cuts_the_answers_differently_is_an_error(make_jsonl, tiny_tokenizer):
    path = make_jsonl([row()])
    (ex,), _, _ = prepare_data(cfg(path), tiny_tokenizer, seed=0)
    limit = len(ex.input_ids) + 4  # the student's whole row fits, the teacher's answer is cut
    assert limit < len(ex.teacher_input_ids)
    with pytest.raises(DataError, match=rf"{path}:1: data.max_length \({limit}\) cuts the answer differently"):
        prepare_data(cfg(path, max_length=limit), tiny_tokenizer, seed=0)


def test_a_missing_teacher_chat_names_the_field(make_jsonl, tiny_tokenizer):
    path = make_jsonl([{"messages": QUESTION + [ANSWER]}])
    with pytest.raises(DataError, match=rf"{path}:1: field 'teacher_messages' must be a non-empty list"):
        prepare_data(cfg(path), tiny_tokenizer, seed=0)


def test_collator_pads_the_teachers_input_on_its_own(make_jsonl, tiny_tokenizer):
    path = make_jsonl([row(), {"messages": QUESTION + [ANSWER], "teacher_messages": QUESTION + [ANSWER]}])
    train, _, _ = prepare_data(cfg(path), tiny_tokenizer, seed=0)
    out = Collator(tiny_tokenizer.pad_token_id)(train)
    longest = max(len(ex.teacher_input_ids) for ex in train)
    assert out["teacher_input_ids"].shape == out["teacher_labels"].shape == out["teacher_attention_mask"].shape
    assert out["teacher_input_ids"].shape[1] == -(-longest // 8) * 8
    for r, ex in enumerate(train):
        n = len(ex.teacher_input_ids)
        assert out["teacher_input_ids"][r, :n].tolist() == ex.teacher_input_ids
        assert out["teacher_attention_mask"][r].sum() == n
        assert (out["teacher_labels"][r, 1:] != IGNORE).sum() == (out["labels"][r, 1:] != IGNORE).sum()
    assert "teacher_input_ids" not in Collator(0)([type(train[0])("x", [1, 2], [1, 2])])


@pytest.mark.parametrize("override, message", [
    ("data.packing=true", "does not work with data.packing: true"),
    ("data.completion_only=false", "set data.completion_only: true"),
    ("teacher.source=cache", "needs the live teacher"),
])
def test_packing_caches_and_counting_prompts_are_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(None, ["data.teacher_messages_field=teacher_messages", override])
    assert str(err.value).startswith("defaults: data.teacher_messages_field: ") and "\n" not in str(err.value)
