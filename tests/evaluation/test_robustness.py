"""Perturbations: deterministic under a seed, they change the input, protect numbers and negations, touch only the
task's input field; ASR arithmetic."""

from __future__ import annotations

import random
import re

import pytest

from kdlm.evaluation.robustness import DISTRACTORS, KEYBOARD_NEIGHBOURS, perturb, summarize_asr, typo
from kdlm.evaluation.run import perturbed_user
from kdlm.evaluation.tasks import load_examples, resolve_task

TEXT = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
        "friends every day with four. She did not sell the rest. How much money does she make at the market?")


@pytest.mark.parametrize("kind", ["char", "word", "sentence"])
def test_deterministic_and_changing(kind):
    a = perturb(TEXT, kind, seed=0, index=3)
    assert a == perturb(TEXT, kind, seed=0, index=3)  # same seed, same example: same perturbation
    assert a != TEXT
    others = {perturb(TEXT, kind, seed=s, index=3) for s in range(1, 6)} | {perturb(TEXT, kind, seed=0, index=i) for i in range(4, 9)}
    assert len(others | {a}) > 1  # other seeds / examples give other perturbations


@pytest.mark.parametrize("kind", ["char", "word", "sentence"])
def test_numbers_and_negations_survive(kind):
    for seed in range(20):
        out = perturb(TEXT, kind, seed=seed, index=0, rate=0.5)
        assert re.findall(r"\d+", out) == ["16"]
        for word in ("three", "four", "not"):
            assert re.search(rf"\b{word}\b", out), (word, out)


def test_char_perturbation_is_typos_only():
    out = perturb(TEXT, "char", seed=1, index=0)
    a, b = TEXT.split(), out.split()
    assert len(a) == len(b)  # no word added or removed
    changed = [(x, y) for x, y in zip(a, b) if x != y]
    assert 1 <= len(changed) <= 4  # about 10% of ~30 candidate words
    for x, y in changed:
        assert abs(len(x) - len(y)) <= 1


def test_typo_operations():
    rng = random.Random(0)
    seen = {typo("keyboard", rng) for _ in range(60)}
    assert "keyboard" not in seen
    assert any(len(w) == 7 for w in seen)  # a dropped letter
    assert any(sorted(w) == sorted("keyboard") and w != "keyboard" for w in seen)  # a swap
    subs = [w for w in seen if len(w) == 8 and sorted(w) != sorted("keyboard")]
    assert subs
    for w in subs:  # a substitution uses a QWERTY neighbour of the replaced letter
        i = next(j for j in range(8) if w[j] != "keyboard"[j])
        assert w[i] in KEYBOARD_NEIGHBOURS["keyboard"[i]]
    assert KEYBOARD_NEIGHBOURS["a"] == "qwsz" and set(KEYBOARD_NEIGHBOURS["g"]) == set("tyfhvb")


def test_sentence_perturbation_inserts_one_distractor():
    for seed in range(5):
        out = perturb(TEXT, "sentence", seed=seed, index=0)
        inserted = [d for d in DISTRACTORS if d in out]
        assert len(inserted) == 1
        assert out.replace(" " + inserted[0], "", 1).replace(inserted[0] + " ", "", 1) == TEXT


def test_word_perturbation_keeps_punctuation_tidy():
    for seed in range(30):
        out = perturb("This movie was really good, I loved it.", "word", seed=seed, index=0, rate=0.3)
        assert " ." not in out and " ," not in out and "  " not in out and out.endswith(".")


def test_empty_input_is_left_alone():
    assert perturb("", "char", seed=0, index=0) == ""
    with pytest.raises(ValueError, match="unknown perturbation kind"):
        perturb(TEXT, "emoji", seed=0, index=0)


def test_only_the_input_field_is_perturbed(data_dir, write_task):
    task = resolve_task(str(write_task(
        "type: generation\nsource: gsm8k/test.jsonl\ntemplate: \"Question: {question}\\nThink step by step.\"\n"
        "reference: '{answer}'\ninput_field: question\nextract: number\nmetrics: [accuracy]\n")))
    for ex in load_examples(task.data, data_dir, task.name):
        for kind in ("char", "word", "sentence"):
            out = perturbed_user(task, ex, kind, seed=0)
            assert out.startswith("Question: ") and out.endswith("\nThink step by step.")
            assert out != ex.user
            question = out[len("Question: "):-len("\nThink step by step.")]
            assert question == perturb(ex.fields["question"], kind, seed=0, index=ex.index, salt=task.name)


def test_input_pattern_keeps_the_template_part_of_the_field(data_dir, sentiment_task):
    task = resolve_task(str(sentiment_task))
    for ex in load_examples(task.data, data_dir, task.name):
        for kind in ("char", "word", "sentence"):
            out = perturbed_user(task, ex, kind, seed=7)
            assert out.endswith("\nIs this review positive or negative?") and out != ex.user
            assert out.count("Is this review positive or negative?") == 1


def test_summarize_asr_arithmetic():
    clean = [True, True, True, True, False]
    perturbed = {
        "char": [True, False, True, True, None],      # 1 of 4 flipped
        "word": [False, False, True, True, None],     # 2 of 4
        "sentence": [True, True, True, True, None],   # 0 of 4
    }
    out = summarize_asr(clean, perturbed)
    assert out["clean_accuracy"] == pytest.approx(0.8)
    assert out["n_correct_clean"] == 4
    assert out["asr"] == pytest.approx({"char": 0.25, "word": 0.5, "sentence": 0.0, "overall": 3 / 12})
    assert out["asr_any"] == pytest.approx(2 / 4)  # examples 0 and 1 flipped by at least one kind
    none = summarize_asr([False, False], {"char": [None, None]})
    assert none["asr"] == {"char": None, "overall": None} and none["n_correct_clean"] == 0
