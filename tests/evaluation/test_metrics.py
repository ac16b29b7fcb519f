"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from kdlm.evaluation import metrics as M


def test_rouge_l_is_lcs_f_measure():
    # LCS of "the cat sat on the mat" / "the cat lay on the mat" = "the cat on the mat": 5 of 6 words each side
    assert M.rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # precision 2/2, recall 2/4 -> F = 2PR/(P+R) = 2/3
    assert M.rouge_l("quick fox", "the quick brown fox") == pytest.approx(2 / 3)
    assert M.rouge_l("", "anything") == 0.0
    assert M.rouge_l("Identical text.", "identical TEXT") == 1.0  # lower-cased, punctuation dropped


def test_rouge_l_stems_like_minillm():
    # Porter stemming: cats -> cat, running/runs -> run
    assert M.rouge_l("cats running", "cat runs") == 1.0
    assert M.rouge_l("cats running", "cat runs", stem=False) == 0.0


def test_exact_match_normalises_case_punctuation_articles():
    assert M.exact_match("The Paris!", "paris") == 1.0
    assert M.exact_match("  an   apple ", "apple") == 1.0
    assert M.exact_match("Paris, France", "Paris") == 0.0


def test_token_f1_squad_style():
    # pred [cat, sat], ref [cat, sat, down]: P = 1, R = 2/3, F1 = 0.8
    assert M.token_f1("The cat sat", "a cat sat down") == pytest.approx(0.8)
    # repeated words count as a multiset: pred [a? no: "cat cat"] -> [cat, cat], ref [cat]: common 1, P 1/2, R 1
    assert M.token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert M.token_f1("", "") == 1.0
    assert M.token_f1("", "cat") == 0.0
    assert M.token_f1("dog", "cat") == 0.0


def test_accuracy_mean_and_empty():
    assert M.accuracy([True, False, True, True]) == 0.75
    assert M.accuracy([]) is None
    assert M.mean([0.25, 0.75]) == 0.5


def test_perplexity_and_ce_are_token_weighted():
    # two examples: 1 token with nll ln 2, 3 tokens with total nll 3 ln 8 -> ce = (ln2 + 3 ln8) / 4 = 2.5 ln 2
    total = math.log(2) + 3 * math.log(8)
    assert M.cross_entropy(total, 4) == pytest.approx(2.5 * math.log(2))
    assert M.perplexity(total, 4) == pytest.approx(2 ** 2.5)
    assert M.perplexity(0.0, 0) is None


def test_expected_calibration_error_hand_computed():
    # four bins of one example each: (|1-.95| + |0-.75| + |1-.62| + |1-.58|) / 4 = 1.6 / 4
    assert M.expected_calibration_error([0.95, 0.75, 0.62, 0.58], [True, False, True, True]) == pytest.approx(0.4)
    # one bin (0.9, 1.0] with two examples: accuracy 0.5, confidence 0.93 -> 0.43
    assert M.expected_calibration_error([0.95, 0.91], [True, False]) == pytest.approx(0.43)
    # bins are (k/10, (k+1)/10]: 0.5 is in (0.4, 0.5], 0.51 in (0.5, 0.6] -> 1/2 * |1-.5| + 1/2 * |0-.51|
    assert M.expected_calibration_error([0.5, 0.51], [True, False]) == pytest.approx(0.5 * 0.5 + 0.5 * 0.51)
    assert M.expected_calibration_error([1.0, 1.0], [True, True]) == 0.0
    assert M.expected_calibration_error([], []) is None
    with pytest.raises(ValueError):
        M.expected_calibration_error([1.5], [True])


def test_softmax():
    probs = M.softmax([math.log(1), math.log(3)])
    assert probs == pytest.approx([0.25, 0.75])


def test_retention_arithmetic():
    assert M.retention(0.24, 0.32, "accuracy") == pytest.approx(75.0)  # 100 * 0.24 / 0.32
    assert M.retention(0.4, 0.32, "accuracy") == pytest.approx(125.0)  # a student may beat its teacher
    # lower is better: 100 * teacher / student (a perplexity of 20 vs the teacher's 10 keeps 50%)
    assert M.retention(20.0, 10.0, "perplexity") == pytest.approx(50.0)
    assert M.retention(0.05, 0.10, "ece") == pytest.approx(200.0)
    # a teacher at 0: equal values are 100, anything else undefined (None)
    assert M.retention(0.0, 0.0, "accuracy") is None  # a teacher at 0 leaves nothing to retain
    assert M.retention(0.3, 0.3, "accuracy") == 100.0
    assert M.retention(0.1, 0.0, "accuracy") is None
    assert M.retention(0.0, 5.0, "perplexity") is None
    assert M.retention(None, 0.3) is None and M.retention(0.3, None) is None
    assert M.retention(float("nan"), 0.3) is None


def test_drop():
    assert M.drop(0.8, 0.6) == pytest.approx((0.2, 25.0))
    assert M.drop(0.5, 0.7) == pytest.approx((-0.2, -40.0))  # the OOD set can be easier
    assert M.drop(0.0, 0.0) == (0.0, None)
    assert M.drop(None, 0.3) == (None, None)


def test_attack_success_rate():
    clean = [True, True, False, True, True]
    perturbed = [True, False, None, False, True]  # the third was wrong on the clean input: ignored
    assert M.attack_success_rate(clean, perturbed) == (pytest.approx(0.5), 4)
    assert M.attack_success_rate([False, False], [None, None]) == (None, 0)
    with pytest.raises(ValueError):
        M.attack_success_rate([True], [])


def test_repeated_ngram_share_counts_repeats_within_each_text():
    from kdlm.evaluation.metrics import repeated_ngram_share

    assert repeated_ngram_share(["a b c d e f"]) == 0.0
    # "a b c d" x3: 9 four-grams, the first 4 new, the other 5 repeats
    assert repeated_ngram_share(["a b c d a b c d a b c d"]) == 5 / 9
    # n-grams are not compared across texts
    assert repeated_ngram_share(["a b c d", "a b c d"]) == 0.0
    assert repeated_ngram_share(["too short"]) is None
