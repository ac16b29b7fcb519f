"""--harness: lm-evaluation-harness results folded into summary.json (with a fake lm_eval), and the install hint."""

from __future__ import annotations

import sys
import types

import pytest

from kdlm.errors import KdlmError
from kdlm.evaluation import harness as H
from kdlm.evaluation.run import EvalSettings, run_evaluation

RAW = {"results": {"hellaswag": {"alias": "hellaswag", "acc,none": 0.31, "acc_stderr,none": 0.01,
                                 "acc_norm,none": 0.36, "acc_norm_stderr,none": 0.01},
                   "gsm8k": {"exact_match,strict-match": 0.02, "exact_match,flexible-extract": 0.05,
                             "exact_match_stderr,strict-match": 0.004, "bad": float("nan"), "flag": True}},
       "config": {"model": "hf"}}


def test_fold_results():
    assert H.fold_results(RAW) == {
        "hellaswag": {"acc": 0.31, "acc_norm": 0.36},
        "gsm8k": {"exact_match_strict-match": 0.02, "exact_match_flexible-extract": 0.05},
    }
    assert H.fold_results({}) == {}


def test_harness_folded_into_summary(monkeypatch, tiny_model_dir, tmp_path):
    calls = []

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return RAW

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    summary = run_evaluation(EvalSettings(models=[str(tiny_model_dir)], tasks=[], harness=["hellaswag", "gsm8k"],
                                          output=tmp_path / "out", limit=5, show_progress=False))
    label = summary["reference"]
    assert summary["harness"] == {label: H.fold_results(RAW)}
    [call] = calls
    assert call["model"] == "hf" and call["model_args"].startswith(f"pretrained={tiny_model_dir}")
    assert call["tasks"] == ["hellaswag", "gsm8k"] and call["limit"] == 5


def test_missing_lm_eval_says_how_to_install(monkeypatch, tiny_model_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(KdlmError, match="pip install lm-eval"):
        run_evaluation(EvalSettings(models=[str(tiny_model_dir)], tasks=[], harness=["hellaswag"],
                                    output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # failed before writing anything
    with pytest.raises(KdlmError, match="comma-separated"):
        H.parse_tasks(" , ")
