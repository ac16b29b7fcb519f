"""compare.json from hand-written evaluation folders: values, intervals and paired differences equal a direct
computation from the per-example rows; seeds give the mean and spread; failed and pending variants are recorded;
the majority-class baseline and the best variant per metric are right."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from kdlm.compare.collect import collect
from kdlm.compare.grid import load_grid
from kdlm.evaluation import stats as S

from .conftest import write_grid

LABELS = ["negative", "positive", "positive", "negative", "positive", "positive", "positive", "negative"]


def _eval_folder(folder: Path, label: str, correct: list[bool], kl: list[float] | None, *, reference: str = "teacher",
                 role: str = "student") -> None:
    # the input holds U+2028 written raw, as `kdlm eval` writes non-ASCII (a line separator for str.splitlines)
    rows = [{"index": i, "input": "a review\u2028with a line separator", "reference": ref,
             "prediction": ref if ok else ("positive" if ref == "negative" else "negative"),
             "correct": ok, "confidence": 0.6, **({"kl_to_teacher": kl[i], "top1_agreement": 1.0} if kl else {})}
            for i, (ref, ok) in enumerate(zip(LABELS, correct))]
    task_dir = folder / label / "tiny_sentiment"
    task_dir.mkdir(parents=True)
    (task_dir / "predictions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    models = [{"label": reference, "role": "reference"}] + ([{"label": label, "role": "student"}] if role == "student" else [])
    summary = {"kdlm_eval_version": 1, "reference": reference, "models": models,
               "tasks": [{"name": "tiny_sentiment", "type": "classification", "primary_metric": "balanced_accuracy",
                          "majority_baseline": S.majority_baseline([int(x == "positive") for x in LABELS])}],
               "results": {}, "efficiency": {label: {"parameters": 1000 if role == "student" else 4000}}}
    (folder / "summary.json").write_text(json.dumps(summary))


def _run_folder(run: Path, steps: int) -> None:
    (run / "model").mkdir(parents=True)
    (run / "final_metrics.json").write_text(json.dumps({"steps": steps, "after": {"ce": 2.0}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": steps, "counted_tokens": 50}) + "\n")


@pytest.fixture
def compared(tmp_path, tiny_grid):
    grid = load_grid(write_grid(tmp_path, tiny_grid, seeds=[0, 1], variants=[
        {"name": "kd", "set": ["loss.terms=[{name: forward_kl}]"]},
        {"name": "broken", "set": []}, {"name": "pending", "set": []}]))
    out = tmp_path / "out"
    _eval_folder(out / "baselines" / "teacher" / "eval", "teacher", [True] * 8, None, role="reference")
    _eval_folder(out / "baselines" / "initial" / "eval", "student", [False, True, True, False, True, True, True, False],
                 [3.0] * 8)
    sft = {0: [True, True, False, False, True, False, True, False], 1: [True, False, False, True, True, False, True, False]}
    kd = {0: [True, True, True, False, True, True, True, True], 1: [True, True, True, True, True, False, True, True]}
    for name, seeds, kl in (("sft", sft, 2.0), ("kd", kd, 1.0)):
        for seed, correct in seeds.items():
            sd = out / "variants" / name / f"seed{seed}"
            _eval_folder(sd / "eval", "run", correct, [kl + 0.1 * i + 0.05 * seed for i in range(8)])
            _run_folder(sd / "run", 3)
            (sd / "status.json").write_text(json.dumps({"status": "done", "distill_seconds": 10.0 + seed}))
    bad = out / "variants" / "broken" / "seed0"
    bad.mkdir(parents=True)
    (bad / "status.json").write_text(json.dumps({"status": "failed", "error": "out of memory"}))
    return grid, out, sft, kd


def test_values_intervals_and_paired_differences_match_a_direct_computation(compared):
    grid, out, sft, kd = compared
    result = collect(grid, out, resamples=400)
    assert json.loads((out / "compare.json").read_text())["table"] == result["table"]
    labels = [int(x == "positive") for x in LABELS]

    cell = result["table"]["kd"]["tiny_sentiment/balanced_accuracy"]
    per_seed = [S.balanced_accuracy(labels, kd[s]) for s in (0, 1)]
    assert cell["per_seed"] == pytest.approx(per_seed)
    assert cell["value"] == pytest.approx(sum(per_seed) / 2)
    assert cell["std"] == pytest.approx(statistics.stdev(per_seed))
    averaged = [(a + b) / 2 for a, b in zip(kd[0], kd[1])]  # the per-example score averaged over seeds
    direct = S.bootstrap_ci(S.balanced_accuracy_statistic("b", labels, averaged), resamples=400)
    assert (cell["ci_low"], cell["ci_high"]) == (pytest.approx(direct["ci_low"]), pytest.approx(direct["ci_high"]))

    diff = result["differences"]["kd"]["tiny_sentiment/balanced_accuracy"]
    sft_avg = [(a + b) / 2 for a, b in zip(sft[0], sft[1])]
    d = S.paired_bootstrap(S.balanced_accuracy_statistic("a", labels, averaged),
                           S.balanced_accuracy_statistic("b", labels, sft_avg), resamples=400)
    assert diff["vs"] == "sft"
    assert (diff["diff"], diff["ci_low"], diff["ci_high"]) == (pytest.approx(d["diff"]), pytest.approx(d["ci_low"]),
                                                               pytest.approx(d["ci_high"]))
    assert diff["significant"] == d["significant"]
    kl = result["differences"]["kd"]["tiny_sentiment/kl_to_teacher"]
    assert kl["diff"] == pytest.approx(-1.0) and kl["significant"]  # 1 nat/token less on every example


def test_statuses_baselines_retention_and_best(compared):
    grid, out, _, _ = compared
    result = collect(grid, out, resamples=200)
    status = {v["name"]: (v["status"], v["error"]) for v in result["variants"]}
    assert status == {"teacher": ("done", None), "initial": ("done", None), "sft": ("done", None),
                      "kd": ("done", None), "broken": ("failed", "seed 0: out of memory"), "pending": ("pending", None)}
    assert set(result["table"]) == {"teacher", "initial", "sft", "kd"}
    assert result["majority_baseline"] == {"tiny_sentiment/accuracy": 0.625, "tiny_sentiment/balanced_accuracy": 0.5}
    assert result["best"]["tiny_sentiment/kl_to_teacher"] == "kd"  # lower is better
    assert result["best"]["efficiency/parameters"] in ("initial", "sft", "kd")  # never the teacher
    assert "training/steps" not in result["best"]  # the budget is not a quality
    assert result["table"]["kd"]["training/steps"]["value"] == 3
    assert result["table"]["kd"]["training/train_seconds"]["value"] == pytest.approx(10.5)
    teacher_acc = result["table"]["teacher"]["tiny_sentiment/accuracy"]["value"]
    assert teacher_acc == 1.0
    assert result["retention"]["kd"]["tiny_sentiment/accuracy"] == pytest.approx(
        100 * result["table"]["kd"]["tiny_sentiment/accuracy"]["value"])
    groups = {m["key"]: m["group"] for m in result["metrics"]}
    assert groups["tiny_sentiment/accuracy"] == "task" and groups["efficiency/parameters"] == "efficiency"
    assert np.isfinite(result["table"]["initial"]["tiny_sentiment/kl_to_teacher"]["value"])


def test_a_variant_that_stopped_before_its_token_budget_is_noted(tmp_path, tiny_grid):
    grid = load_grid(write_grid(tmp_path, tiny_grid, baselines=False, budget={"kind": "tokens", "value": 1000},
                                variants=[{"name": "kd", "set": []}]))
    out = tmp_path / "out"
    _eval_folder(out / "baselines" / "teacher" / "eval", "teacher", [True] * 8, None, role="reference")
    sd = out / "variants" / "kd" / "seed0"
    _eval_folder(sd / "eval", "run", [True] * 8, [1.0] * 8)
    _run_folder(sd / "run", 3)  # 50 counted tokens
    result = collect(grid, out, resamples=100)
    assert result["notes"] == ["kd: trained on 50 counted tokens, less than the budget of 1000: it reached "
                               "train.max_steps first (raise it in the base recipe)"]


def test_the_ood_drop_is_positive_when_the_shifted_set_is_worse_whatever_the_metric():
    from kdlm.compare.collect import LOWER, ood_drop

    assert "drop" in LOWER  # ranked lower-is-better, so the orientation below decides the best variant
    assert ood_drop("balanced_accuracy", 0.8, 0.6) == pytest.approx(0.2)
    assert ood_drop("perplexity", 12.0, 300.0) == pytest.approx(288.0)  # perplexity rises OOD: a drop of 288
    assert ood_drop("perplexity", 12.0, 10.0) == pytest.approx(-2.0)
    assert ood_drop("rouge_l", 0.3, 0.35) == pytest.approx(-0.05)
