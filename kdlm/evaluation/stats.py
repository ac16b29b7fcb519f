"""Honest statistics over per-example results: bootstrap 95% intervals, paired bootstrap differences, balanced
accuracy and the majority-class baseline. Pure functions over numpy arrays (no model, no I/O).

A *statistic* is a function of a task's per-example rows, so that the bootstrap recomputes exactly the figure the
task reports on every resample, not the mean of something else:

- mean metrics (ROUGE-L, token F1, accuracy, exact match, KL per example): the mean of one value per example;
- ratio metrics (perplexity, CE): exp / identity of sum(nll) / sum(tokens), token-weighted as `kdlm eval` reports;
- balanced accuracy: the mean per-class recall over the classes present in the resample.

The bootstrap is the percentile bootstrap (Efron & Tibshirani 1993) with `B` resamples of the examples drawn with
replacement from a seeded numpy Generator: the same seed gives the same interval. The paired bootstrap (Koehn 2004)
resamples example indices once per replicate and applies them to BOTH variants, so the interval of the
difference accounts for the examples being shared; a difference whose interval contains 0 is not significant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Statistic:
    """How a metric is computed from per-example columns. `columns` are equal-length float arrays; `fn` maps
    resampled columns (each of shape [B, n]) to B values. `point` is the value on the data as given."""

    name: str
    columns: tuple[np.ndarray, ...]
    fn: Callable[..., np.ndarray]

    @property
    def n(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    def point(self) -> Optional[float]:
        if self.n == 0:
            return None
        value = float(self.fn(*(c[None, :] for c in self.columns))[0])
        return value if math.isfinite(value) else None

    def on(self, idx: np.ndarray) -> np.ndarray:
        return self.fn(*(c[idx] for c in self.columns))


def _mean(values: np.ndarray) -> np.ndarray:
    return values.mean(axis=-1)


def mean_statistic(name: str, values: Sequence[float]) -> Statistic:
    return Statistic(name, (np.asarray(values, dtype=np.float64),), _mean)


def ratio_statistic(name: str, numerator: Sequence[float], denominator: Sequence[float], *,
                    transform: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> Statistic:
    """sum(numerator) / sum(denominator) per resample, optionally transformed (np.exp for perplexity)."""
    def fn(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ratio = num.sum(axis=-1) / den.sum(axis=-1)
            return transform(ratio) if transform is not None else ratio

    return Statistic(name, (np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)), fn)


def balanced_accuracy(labels: Sequence[int], correct: Sequence[bool]) -> Optional[float]:
    """Mean per-class recall over the classes that occur in `labels` (the gold classes). A classifier that always
    answers one class scores 1 / (number of classes) however skewed the labels are. None for no examples."""
    return balanced_accuracy_statistic("balanced_accuracy", labels, correct).point()


def balanced_accuracy_statistic(name: str, labels: Sequence[int], correct: Sequence[bool]) -> Statistic:
    labels_arr = np.asarray(labels, dtype=np.int64)
    classes = np.unique(labels_arr) if len(labels_arr) else np.zeros(0, dtype=np.int64)
    onehot = [(labels_arr == c).astype(np.float64) for c in classes]
    ok = np.asarray(correct, dtype=np.float64)

    def fn(ok_s: np.ndarray, *members: np.ndarray) -> np.ndarray:
        recalls = []
        for m in members:
            count = m.sum(axis=-1)
            with np.errstate(divide="ignore", invalid="ignore"):
                recalls.append(np.where(count > 0, (ok_s * m).sum(axis=-1) / np.maximum(count, 1), np.nan))
        stacked = np.stack(recalls, axis=0)
        present = ~np.isnan(stacked)
        return np.where(present.any(axis=0), np.nansum(stacked, axis=0) / np.maximum(present.sum(axis=0), 1), np.nan)

    return Statistic(name, (ok, *onehot), fn)


def majority_baseline(labels: Sequence[int]) -> dict[str, Optional[float]]:
    """What always answering the most frequent gold class would score: its accuracy (the majority share) and its
    balanced accuracy (1 / number of classes present)."""
    if not len(labels):
        return {"accuracy": None, "balanced_accuracy": None, "class": None}
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    top = int(np.argmax(counts))
    return {"accuracy": float(counts[top] / counts.sum()), "balanced_accuracy": 1.0 / len(values),
            "class": int(values[top])}


def resample_indices(n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """[resamples, n] example indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(values: np.ndarray, confidence: float) -> tuple[Optional[float], Optional[float]]:
    values = values[np.isfinite(values)]
    if not len(values):
        return None, None
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_ci(stat: Statistic, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                 confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Optional[float]]:
    """{"value", "ci_low", "ci_high", "n"}: the statistic and its percentile-bootstrap interval over examples.
    One example has no spread to resample: its interval is the point itself."""
    value = stat.point()
    if stat.n == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    low, high = _percentiles(stat.on(resample_indices(stat.n, resamples, seed)), confidence)
    return {"value": value, "ci_low": low, "ci_high": high, "n": stat.n}


def paired_bootstrap(a: Statistic, b: Statistic, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                     confidence: float = DEFAULT_CONFIDENCE) -> dict[str, object]:
    """{"diff", "ci_low", "ci_high", "significant", "n"} of a - b on the same examples (same order), with the same
    resampled indices applied to both. Significant when the interval excludes 0."""
    if a.n != b.n:
        raise ValueError(f"paired bootstrap needs the same examples: {a.name} has {a.n}, {b.name} has {b.n}")
    pa, pb = a.point(), b.point()
    if a.n == 0 or pa is None or pb is None:
        return {"diff": None, "ci_low": None, "ci_high": None, "significant": False, "n": a.n}
    idx = resample_indices(a.n, resamples, seed)
    low, high = _percentiles(a.on(idx) - b.on(idx), confidence)
    significant = low is not None and high is not None and (low > 0 or high < 0)
    return {"diff": pa - pb, "ci_low": low, "ci_high": high, "significant": bool(significant), "n": a.n}


# ----------------------------------------------------------------------------- from `kdlm eval` rows


def statistics_for_rows(task_type: str, metrics: Sequence[str], rows: list[dict],
                        options: Optional[Sequence[str]] = None) -> dict[str, Statistic]:
    """The bootstrappable statistics of one task's predictions.jsonl rows, keyed by metric name, in the same
    definitions as `kdlm.evaluation.run.aggregate` (plus balanced accuracy for classification)."""
    out: dict[str, Statistic] = {}
    if task_type == "classification":
        options = list(options or sorted({r["reference"] for r in rows}))
        labels = [options.index(r["reference"]) if r["reference"] in options else -1 for r in rows]
        correct = [bool(r["correct"]) for r in rows]
        out["accuracy"] = mean_statistic("accuracy", [float(c) for c in correct])
        out["balanced_accuracy"] = balanced_accuracy_statistic("balanced_accuracy", labels, correct)
    elif task_type == "perplexity":
        nll, tokens = [float(r["nll"]) for r in rows], [float(r["tokens"]) for r in rows]
        out["ce"] = ratio_statistic("ce", nll, tokens)
        out["perplexity"] = ratio_statistic("perplexity", nll, tokens, transform=np.exp)
        out = {m: s for m, s in out.items() if m in metrics}
    else:
        for m in metrics:
            if rows and all(isinstance(r.get(m), (int, float)) for r in rows):
                out[m] = mean_statistic(m, [float(r[m]) for r in rows])
    for m in ("kl_to_teacher", "top1_agreement"):
        if rows and all(isinstance(r.get(m), (int, float)) for r in rows):
            out[m] = mean_statistic(m, [float(r[m]) for r in rows])
    return out


def intervals_for_rows(task_type: str, metrics: Sequence[str], rows: list[dict],
                       options: Optional[Sequence[str]] = None, *, resamples: int = DEFAULT_RESAMPLES,
                       seed: int = 0) -> dict[str, list[Optional[float]]]:
    """{metric: [ci_low, ci_high]} for every bootstrappable metric of the rows."""
    out = {}
    for name, stat in statistics_for_rows(task_type, metrics, rows, options).items():
        ci = bootstrap_ci(stat, resamples=resamples, seed=seed)
        out[name] = [ci["ci_low"], ci["ci_high"]]
    return out
