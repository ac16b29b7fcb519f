"""Evaluation metrics as pure functions (no model, no I/O). Every value is a fraction in [0, 1] unless named
otherwise; `kdlm eval` averages per-example scores over the examples of a task.

- rouge_l: ROUGE-L F-measure of `rouge-score` (`rougeL`, Porter stemming), as MiniLLM/DistiLLM report SelfInst
  (they print it x100);
- exact_match / token_f1: SQuAD-style, after lower-casing and removing punctuation, articles and extra spaces;
- accuracy: share of correct examples;
- ce / perplexity: token-weighted mean negative log-likelihood (nats/token) and its exponential;
- expected_calibration_error: ECE with equal-width confidence bins (Guo et al. 2017);
- retention / drop / attack_success_rate: the arithmetic of the summary (docs/guides/evaluation.md).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from functools import lru_cache
from typing import Iterable, Optional, Sequence

# metrics where a lower value is better: retention is then teacher / student instead of student / teacher
LOWER_IS_BETTER = frozenset({"perplexity", "ce", "ece", "kl_to_teacher"})


# ----------------------------------------------------------------------------- text overlap


@lru_cache(maxsize=2)
def _rouge_scorer(stem: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)


def rouge_l(prediction: str, reference: str, *, stem: bool = True) -> float:
    """ROUGE-L F-measure (longest common subsequence of words) of `prediction` against `reference`."""
    return float(_rouge_scorer(stem).score(reference, prediction)["rougeL"].fmeasure)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles (a/an/the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two strings are equal after `normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall of the normalised words (multiset overlap).
    Two empty answers score 1; one empty answer scores 0."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------- aggregates


def mean(values: Iterable[float]) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def accuracy(correct: Sequence[bool]) -> Optional[float]:
    """Share of True values (None for no examples)."""
    return mean(float(c) for c in correct)


def cross_entropy(total_nll: float, tokens: int) -> Optional[float]:
    """Mean negative log-likelihood per token (nats), over all tokens of all examples."""
    return total_nll / tokens if tokens else None


def perplexity(total_nll: float, tokens: int) -> Optional[float]:
    """exp(cross-entropy per token): the corpus-level perplexity (token-weighted, not a mean of per-example values)."""
    ce = cross_entropy(total_nll, tokens)
    return math.exp(ce) if ce is not None else None


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], *, bins: int = 10) -> Optional[float]:
    """ECE = sum over bins b of |B_b|/n * |accuracy(B_b) - mean confidence(B_b)|.

    Bins are equal-width intervals (k/bins, (k+1)/bins] of the confidence (the probability the model gives its chosen
    answer); a confidence of exactly 0 falls in the first bin. Empty bins count 0. None for no examples.
    """
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} correctness values")
    n = len(confidences)
    if n == 0:
        return None
    members: list[list[int]] = [[] for _ in range(bins)]
    for i, conf in enumerate(confidences):
        if not 0.0 <= conf <= 1.0:
            raise ValueError(f"confidence {conf} is outside [0, 1]")
        members[min(max(math.ceil(conf * bins) - 1, 0), bins - 1)].append(i)
    total = 0.0
    for idx in members:
        if idx:
            acc = sum(float(correct[i]) for i in idx) / len(idx)
            conf = sum(confidences[i] for i in idx) / len(idx)
            total += len(idx) / n * abs(acc - conf)
    return total


def softmax(scores: Sequence[float]) -> list[float]:
    """Probabilities from log-scores (stable)."""
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


# ----------------------------------------------------------------------------- summary arithmetic


def retention(student: Optional[float], teacher: Optional[float], metric: str = "") -> Optional[float]:
    """The student's metric as a percentage of the teacher's on the same examples.

    Higher-is-better metrics: 100 * student / teacher. Lower-is-better ones (perplexity, ce, ece, kl_to_teacher):
    100 * teacher / student, so that 100 means "as good as the teacher" and less means worse in both cases.
    Equal non-zero values give 100. A zero denominator (a teacher with nothing to retain, e.g. accuracy 0,
    even when the student also scores 0) or a missing value gives None: there is no percentage to report.
    """
    if student is None or teacher is None or not (math.isfinite(student) and math.isfinite(teacher)):
        return None
    if student == teacher and teacher != 0:
        return 100.0
    num, den = (teacher, student) if metric in LOWER_IS_BETTER else (student, teacher)
    if den == 0:
        return None
    return 100.0 * num / den


def drop(in_distribution: Optional[float], shifted: Optional[float]) -> tuple[Optional[float], Optional[float]]:
    """(absolute drop, relative drop %) from the in-distribution value to the shifted one (OOD or adversarial):
    in - shifted in the metric's own units, and 100 * (in - shifted) / in (None when in is 0)."""
    if in_distribution is None or shifted is None:
        return None, None
    absolute = in_distribution - shifted
    return absolute, (100.0 * absolute / in_distribution if in_distribution else None)


def attack_success_rate(clean_correct: Sequence[bool], perturbed_correct: Sequence[Optional[bool]]) -> tuple[Optional[float], int]:
    """Among the examples answered correctly on the clean input, the share answered incorrectly once perturbed.

    `perturbed_correct[i]` is ignored where `clean_correct[i]` is False (it may be None there). Returns
    (ASR or None when no example was correct, number of clean-correct examples).
    """
    if len(clean_correct) != len(perturbed_correct):
        raise ValueError(f"{len(clean_correct)} clean results but {len(perturbed_correct)} perturbed ones")
    kept = [bool(p) for c, p in zip(clean_correct, perturbed_correct) if c]
    if not kept:
        return None, 0
    return sum(1 for p in kept if not p) / len(kept), len(kept)


def repeated_ngram_share(texts: Iterable[str], n: int = 4) -> Optional[float]:
    """Share of word n-grams that repeat an n-gram seen earlier in the same text, pooled over `texts` (a
    degeneration measure: 0 for text that never repeats itself, near 1 for a loop). None when no text has n words."""
    repeated = total = 0
    for text in texts:
        words = text.split()
        seen = set()
        for i in range(len(words) - n + 1):
            gram = tuple(words[i:i + n])
            repeated += gram in seen
            seen.add(gram)
            total += 1
    return repeated / total if total else None
