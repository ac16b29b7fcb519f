"""Bootstrap intervals, the paired bootstrap, balanced accuracy and the majority baseline, checked against direct
computations on fixed data (plain Python loops over the same resampled indices, and hand-worked values)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from kdlm.evaluation import stats as S


def _direct_percentile(values: list[float], q: float) -> float:
    """numpy's default (linear) quantile, written out."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _direct_bootstrap(fn, columns, resamples, seed):
    idx = np.random.default_rng(seed).integers(0, len(columns[0]), size=(resamples, len(columns[0])))
    reps = [fn(*[[col[i] for i in row] for col in columns]) for row in idx.tolist()]
    return _direct_percentile(reps, 0.025), _direct_percentile(reps, 0.975)


VALUES = [0.1, 0.9, 0.4, 0.35, 0.8, 0.05, 0.6, 0.7, 0.2, 0.55, 0.3, 0.95]


def test_mean_interval_matches_a_direct_loop():
    ci = S.bootstrap_ci(S.mean_statistic("m", VALUES), resamples=500, seed=3)
    lo, hi = _direct_bootstrap(lambda v: sum(v) / len(v), [VALUES], 500, 3)
    assert ci["value"] == pytest.approx(sum(VALUES) / len(VALUES))
    assert (ci["ci_low"], ci["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert ci["ci_low"] < ci["value"] < ci["ci_high"] and ci["n"] == len(VALUES)


def test_perplexity_interval_is_token_weighted_like_the_reported_figure():
    nll, tokens = [12.0, 3.0, 40.0, 7.5, 20.0, 9.0], [4, 2, 10, 3, 8, 5]
    stat = S.ratio_statistic("perplexity", nll, tokens, transform=np.exp)
    assert stat.point() == pytest.approx(math.exp(sum(nll) / sum(tokens)))
    ci = S.bootstrap_ci(stat, resamples=400, seed=0)
    lo, hi = _direct_bootstrap(lambda a, b: math.exp(sum(a) / sum(b)), [nll, tokens], 400, 0)
    assert (ci["ci_low"], ci["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))


def _direct_balanced(labels, correct):
    recalls = []
    for c in sorted(set(labels)):
        members = [ok for lab, ok in zip(labels, correct) if lab == c]
        recalls.append(sum(members) / len(members))
    return sum(recalls) / len(recalls)


def test_balanced_accuracy_exposes_a_one_class_answerer():
    labels = [1] * 9 + [0]  # 90% positive
    always_positive = [lab == 1 for lab in labels]
    assert S.mean_statistic("acc", [float(c) for c in always_positive]).point() == pytest.approx(0.9)
    assert S.balanced_accuracy(labels, always_positive) == pytest.approx(0.5)
    assert S.majority_baseline(labels) == {"accuracy": 0.9, "balanced_accuracy": 0.5, "class": 1}
    assert S.balanced_accuracy([0, 0, 1, 2], [True, False, True, False]) == pytest.approx((0.5 + 1 + 0) / 3)


def test_balanced_accuracy_interval_matches_a_direct_loop():
    rng = random.Random(1)
    labels = [rng.randrange(3) for _ in range(30)]
    correct = [rng.random() < 0.6 for _ in range(30)]
    ci = S.bootstrap_ci(S.balanced_accuracy_statistic("b", labels, correct), resamples=300, seed=5)
    lo, hi = _direct_bootstrap(lambda lab, ok: _direct_balanced(lab, ok), [labels, correct], 300, 5)
    assert ci["value"] == pytest.approx(_direct_balanced(labels, correct))
    assert (ci["ci_low"], ci["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))


def test_paired_bootstrap_resamples_both_variants_with_the_same_indices():
    a = VALUES
    b = [v - 0.05 + (0.01 if i % 2 else -0.01) for i, v in enumerate(VALUES)]  # a beats b by ~0.05 on every example
    d = S.paired_bootstrap(S.mean_statistic("a", a), S.mean_statistic("b", b), resamples=500, seed=2)
    lo, hi = _direct_bootstrap(lambda x, y: sum(x) / len(x) - sum(y) / len(y), [a, b], 500, 2)
    assert (d["ci_low"], d["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert d["diff"] == pytest.approx(0.05) and d["significant"]
    # unpaired, the same two lists would overlap widely: the pairing is what makes this difference visible
    ca, cb = S.bootstrap_ci(S.mean_statistic("a", a), seed=2), S.bootstrap_ci(S.mean_statistic("b", b), seed=2)
    assert ca["ci_low"] < cb["ci_high"]


def test_a_difference_whose_interval_crosses_zero_is_not_significant():
    a = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    b = [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    d = S.paired_bootstrap(S.mean_statistic("a", a), S.mean_statistic("b", b), resamples=500)
    assert d["diff"] == 0.0 and d["ci_low"] < 0 < d["ci_high"] and not d["significant"]
    with pytest.raises(ValueError, match="same examples"):
        S.paired_bootstrap(S.mean_statistic("a", a), S.mean_statistic("b", b[:-1]))


def test_the_same_seed_gives_the_same_interval_and_empty_input_gives_none():
    s = S.mean_statistic("m", VALUES)
    assert S.bootstrap_ci(s, seed=7) == S.bootstrap_ci(s, seed=7)
    assert S.bootstrap_ci(S.mean_statistic("m", []))["value"] is None


def test_statistics_for_rows_follow_the_task_type():
    rows = [{"reference": "pos", "correct": True}, {"reference": "neg", "correct": False},
            {"reference": "pos", "correct": True}, {"reference": "pos", "correct": True}]
    stats = S.statistics_for_rows("classification", ["accuracy"], rows, ["neg", "pos"])
    assert stats["accuracy"].point() == pytest.approx(0.75)
    assert stats["balanced_accuracy"].point() == pytest.approx(0.5)
    ppl = S.statistics_for_rows("perplexity", ["perplexity", "ce"], [{"nll": 2.0, "tokens": 2}, {"nll": 4.0, "tokens": 2}])
    assert ppl["ce"].point() == pytest.approx(1.5) and ppl["perplexity"].point() == pytest.approx(math.exp(1.5))
    gen = S.statistics_for_rows("generation", ["rouge_l"], [{"rouge_l": 0.2, "kl_to_teacher": 1.0},
                                                            {"rouge_l": 0.4, "kl_to_teacher": 3.0}])
    assert gen["rouge_l"].point() == pytest.approx(0.3) and gen["kl_to_teacher"].point() == pytest.approx(2.0)
