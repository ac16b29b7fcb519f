"""Tests for kdlm.models.compat.shared_vocab_size: vocabularies compared token by token, padded rows."""

from __future__ import annotations

import pytest

from kdlm.errors import ModelError
from kdlm.models.compat import shared_vocab_size


class Vocab:
    """A stand-in tokenizer: only get_vocab() is used."""

    def __init__(self, vocab: dict[str, int]):
        self.vocab = dict(vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


BASE = {f"tok{i}": i for i in range(100)}


def test_equal_vocabularies_with_padded_rows():
    assert shared_vocab_size(Vocab(BASE), Vocab(BASE), 100, 128) == 100
    assert shared_vocab_size(Vocab(BASE), Vocab(BASE), 128, 100) == 100
    assert shared_vocab_size(Vocab(BASE), Vocab(BASE), 128, 112) == 112
    assert shared_vocab_size(Vocab(BASE), Vocab(BASE), 128, 128) == 128


def test_same_tokens_in_another_insertion_order_are_equal():
    reordered = dict(reversed(list(BASE.items())))
    assert shared_vocab_size(Vocab(BASE), Vocab(reordered), 100, 100) == 100


def test_a_token_only_on_one_side():
    student = dict(BASE)
    del student["tok42"]
    student["other"] = 42
    with pytest.raises(ModelError) as info:
        shared_vocab_size(Vocab(BASE), Vocab(student), 100, 100)
    message = str(info.value)
    assert "tok42" in message and "other" in message
    assert "only the teacher" in message and "only the student" in message


def test_extra_token_on_the_student():
    student = dict(BASE, extra=100)
    with pytest.raises(ModelError) as info:
        shared_vocab_size(Vocab(BASE), Vocab(student), 128, 128)
    message = str(info.value)
    assert "'extra'" in message and "100 tokens" in message and "101" in message


def test_same_tokens_with_different_ids():
    student = dict(BASE, tok3=7, tok7=3)
    with pytest.raises(ModelError) as info:
        shared_vocab_size(Vocab(BASE), Vocab(student), 100, 100)
    message = str(info.value)
    assert "tok3" in message and "tok7" in message and "ids differ" in message
    assert "\n" not in message


@pytest.mark.parametrize("teacher_rows, student_rows, role", [(99, 100, "teacher"), (100, 64, "student")])
def test_fewer_rows_than_the_tokenizer(teacher_rows, student_rows, role):
    with pytest.raises(ModelError) as info:
        shared_vocab_size(Vocab(BASE), Vocab(BASE), teacher_rows, student_rows)
    assert role in str(info.value) and "99" in str(info.value)


def test_tokenizer_ids_with_a_gap_need_rows_up_to_the_largest_id():
    vocab = dict(BASE, special=127)  # e.g. an added token placed at the end of the padded range
    assert shared_vocab_size(Vocab(vocab), Vocab(vocab), 128, 130) == 128
    with pytest.raises(ModelError):
        shared_vocab_size(Vocab(vocab), Vocab(vocab), 101, 128)


def test_tiny_teacher_and_student_share_their_vocabulary(tiny_model_dir, tiny_student_dir):
    from transformers import AutoConfig, AutoTokenizer

    teacher_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    student_tok = AutoTokenizer.from_pretrained(tiny_student_dir)
    rows = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    assert rows > len(teacher_tok)  # the fixture pads its embedding rows
    assert shared_vocab_size(teacher_tok, student_tok, rows, rows) == rows
    with pytest.raises(ModelError):
        shared_vocab_size(teacher_tok, student_tok, len(teacher_tok) - 1, rows)
