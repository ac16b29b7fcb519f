"""Synthetic inputs for the report tests: one evaluation folder (1 teacher + 2 students, 2 tasks, every
section filled) and one finished distillation run folder whose student is one of the evaluated models."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

TEACHER, FKL, RKL = "teacher-135m", "student-fkl", "student-rkl"


def summary_dict(run_model_path: str = "runs/fkl/model") -> dict:
    """A complete summary.json in the `kdlm eval` schema, with numbers chosen so each column has one clear best."""
    return {
        "kdlm_eval_version": 1,
        "created": "2026-01-02T03:04:05+00:00",
        "device": "cpu",
        "reference": TEACHER,
        "models": [
            {"label": TEACHER, "path": "smollm2-135m-instruct", "parameters": 134_515_008, "disk_mb": 513.1},
            {"label": FKL, "path": run_model_path, "parameters": 81_412_416, "disk_mb": 310.6},
            {"label": RKL, "path": "runs/rkl/model", "parameters": 53_960_640, "disk_mb": 205.9},
        ],
        "tasks": [
            {"name": "gsm8k", "type": "generation", "primary_metric": "exact_match", "limit": 50},
            {"name": "ag_news", "type": "classification", "primary_metric": "accuracy", "limit": None},
        ],
        "results": {
            TEACHER: {"gsm8k": {"exact_match": 0.32, "n": 50}, "ag_news": {"accuracy": 0.874, "macro_f1": 0.871, "n": 200}},
            FKL: {"gsm8k": {"exact_match": 0.24, "n": 50}, "ag_news": {"accuracy": 0.812, "macro_f1": 0.805, "n": 200}},
            RKL: {"gsm8k": {"exact_match": 0.26, "n": 50}, "ag_news": {"accuracy": 0.755, "macro_f1": 0.749, "n": 200}},
        },
        "retention": {
            FKL: {"gsm8k": {"exact_match": 75.0}, "ag_news": {"accuracy": 92.9, "macro_f1": 92.4}},
            RKL: {"gsm8k": {"exact_match": 81.25}, "ag_news": {"accuracy": 86.4, "macro_f1": 86.0}},
        },
        "agreement": {
            FKL: {"gsm8k": {"kl_to_teacher": 0.412, "top1_agreement": 0.701, "ece": 0.051},
                  "ag_news": {"kl_to_teacher": 0.233, "top1_agreement": 0.811, "ece": None}},
            RKL: {"gsm8k": {"kl_to_teacher": 0.538, "top1_agreement": 0.655, "ece": 0.083},
                  "ag_news": {"kl_to_teacher": 0.301, "top1_agreement": 0.774, "ece": None}},
        },
        "robustness": {
            TEACHER: {"ag_news": {"clean_accuracy": 0.874, "asr": {"char": 0.121, "word": 0.187, "sentence": 0.064, "overall": 0.124}, "n_correct_clean": 175}},
            FKL: {"ag_news": {"clean_accuracy": 0.812, "asr": {"char": 0.173, "word": 0.246, "sentence": 0.091, "overall": 0.170}, "n_correct_clean": 162}},
            RKL: {"ag_news": {"clean_accuracy": 0.755, "asr": {"char": 0.158, "word": 0.231, "sentence": 0.088, "overall": 0.159}, "n_correct_clean": 151}},
        },
        "ood": {
            TEACHER: {"ag_news": {"in_distribution": 0.874, "ood": {"yahoo": 0.702, "dbpedia": 0.655}, "drop": {"yahoo": 0.172, "dbpedia": 0.219}}},
            FKL: {"ag_news": {"in_distribution": 0.812, "ood": {"yahoo": 0.601, "dbpedia": 0.588}, "drop": {"yahoo": 0.211, "dbpedia": 0.224}}},
            RKL: {"ag_news": {"in_distribution": 0.755, "ood": {"yahoo": 0.590, "dbpedia": 0.541}, "drop": {"yahoo": 0.165, "dbpedia": 0.214}}},
        },
        "efficiency": {
            TEACHER: {"parameters": 134_515_008, "disk_mb": 513.1, "peak_memory_mb": 1210.0, "latency_ms_p50": 41.7,
                      "latency_ms_p95": 55.2, "throughput_tok_s": 23.9, "ratios": {}},
            FKL: {"parameters": 81_412_416, "disk_mb": 310.6, "peak_memory_mb": 802.5, "latency_ms_p50": 26.3,
                  "latency_ms_p95": 33.0, "throughput_tok_s": 37.8,
                  "ratios": {"parameters": 0.605, "latency_ms_p50": 0.631, "throughput_tok_s": 1.582}},
            RKL: {"parameters": 53_960_640, "disk_mb": 205.9, "peak_memory_mb": 590.1, "latency_ms_p50": 18.4,
                  "latency_ms_p95": 24.9, "throughput_tok_s": 54.1,
                  "ratios": {"parameters": 0.401, "latency_ms_p50": 0.441, "throughput_tok_s": 2.264}},
        },
        "harness": {},
    }


def write_eval_folder(path: Path, summary: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps(summary, indent=2))
    return path


RECIPE = {
    "teacher": {"model": "smollm2-135m-instruct"},
    "student": {"model": "smollm2-135m-instruct", "keep_layers": 10},
    "loss": {"terms": [{"name": "forward_kl", "weight": 0.9, "temperature": None},
                       {"name": "ce", "weight": 0.1, "temperature": None}], "temperature": 2.0},
    "train": {"max_steps": 20, "batch_size": 8, "grad_accum": 1, "learning_rate": 3e-4},
    "output": {"dir": "runs/fkl"},
}


def write_run_folder(path: Path, *, finished: bool = True, recipe: dict | None = None) -> Path:
    """A run of 20 steps: training rows every 5 steps, validation at 0, 10 and 20."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "resolved_config.yaml").write_text(yaml.safe_dump(recipe or RECIPE, sort_keys=False))
    rows = []
    for step in (0, 10, 20):
        rows.append({"step": step, "time": 1000.0 + step, "val/ce": 9.0 - 0.2 * step, "val/kl_to_teacher": 7.5 - 0.25 * step,
                     "val/top1_agreement": 0.01 * step, "val/tokens": 2030, "val/teacher_ce": 0.874})
        if step:
            for sub in (step - 5, step):
                rows.append({"step": sub, "time": 1000.0 + sub, "loss/forward_kl": 8.0 - 0.3 * sub, "loss/ce": 9.0 - 0.25 * sub,
                             "loss/total": 0.9 * (8.0 - 0.3 * sub) + 0.1 * (9.0 - 0.25 * sub), "lr": 3e-4,
                             "tokens_per_s": 120.0 + sub, "counted_tokens": 500, "grad_norm": 3.0})
    rows.sort(key=lambda r: (r["step"], "val/ce" in r))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "model").mkdir(exist_ok=True)
    if finished:
        (path / "final_metrics.json").write_text(json.dumps({
            "steps": 20,
            "before": {"ce": 9.0, "kl_to_teacher": 7.5, "top1_agreement": 0.0, "tokens": 2030, "teacher_ce": 0.874},
            "after": {"ce": 5.0, "kl_to_teacher": 2.5, "top1_agreement": 0.2, "tokens": 2030, "teacher_ce": 0.874},
        }))
    return path


@dataclass
class Built:
    out: Path
    md: str
    html: str
    eval_dir: Path
    run_dir: Path


@pytest.fixture(scope="session")
def full_report(tmp_path_factory) -> Built:
    """The complete synthetic report (eval folder + the matching run), built once for the session."""
    from kdlm.report import make_report

    base = tmp_path_factory.mktemp("full")
    run = write_run_folder(base / "runs" / "fkl")
    ev = write_eval_folder(base / "eval", summary_dict(str(run / "model")))
    md_path, html_path = make_report([ev, run], base / "report")
    return Built(base / "report", md_path.read_text(), html_path.read_text(), ev, run)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run_folder(tmp_path / "runs" / "fkl")


@pytest.fixture
def summary(run_dir: Path) -> dict:
    return summary_dict(str(run_dir / "model"))


@pytest.fixture
def eval_dir(tmp_path: Path, summary: dict) -> Path:
    return write_eval_folder(tmp_path / "eval", summary)


@pytest.fixture
def make_summary():
    """A fresh deep copy of the synthetic summary, to modify per test."""
    return lambda **kw: copy.deepcopy(summary_dict(**kw))
