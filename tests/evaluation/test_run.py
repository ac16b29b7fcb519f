"""`kdlm eval` end to end on the tiny random models: files, metrics, summary.json, retention, agreement,
robustness, OOD; and the checks that fail before any model is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from kdlm.errors import ConfigError, DataError, OutputError
from kdlm.evaluation import efficiency
from kdlm.evaluation.run import EvalSettings, resolve_models, run_evaluation
from kdlm.evaluation.summary import REQUIRED_KEYS, render_table
from .conftest import GSM_ROWS, SENTIMENT_TASK, write_jsonl

GSM_TASK = """\
name: tiny_gsm
type: generation
source: gsm8k/test.jsonl
template: "{question}\\nLet's think step by step."
reference: "{answer}"
input_field: question
extract: number
metrics: [accuracy]
"""
PPL_TASK = """\
name: tiny_ppl
type: perplexity
source: held_out.txt
template: ""
reference: "{text}"
"""


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_selfinst_rouge_l_equals_independent_rouge_score(tiny_model_dir, data_dir, tmp_path):
    from rouge_score import rouge_scorer

    out = tmp_path / "out"
    summary = run_evaluation(EvalSettings(models=[str(tiny_model_dir)], tasks=["selfinst"], output=out, data_dir=data_dir,
                                          max_new_tokens=6, sample=True, seed=1, show_progress=False))
    label = summary["reference"]
    folder = out / label / "selfinst"
    rows = read_jsonl(folder / "predictions.jsonl")
    assert len(rows) == 3 and {"input", "prediction", "reference", "rouge_l", "token_f1"} <= set(rows[0])
    assert any(r["prediction"] for r in rows)  # sampled from a random model: not empty
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    independent = sum(scorer.score(r["reference"], r["prediction"])["rougeL"].fmeasure for r in rows) / len(rows)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["metrics"]["rouge_l"] == pytest.approx(independent, abs=1e-12)
    assert summary["results"][label]["selfinst"] == {"rouge_l": pytest.approx(independent), "token_f1": pytest.approx(
        sum(r["token_f1"] for r in rows) / 3), "n": 3}
    # re-running into the same folder needs --overwrite
    with pytest.raises(OutputError, match="already holds an evaluation"):
        run_evaluation(EvalSettings(models=[str(tiny_model_dir)], tasks=["selfinst"], output=out, data_dir=data_dir))


@pytest.fixture(scope="module")
def full_eval(tiny_model_dir, tiny_student_dir, tmp_path_factory):
    """Teacher + student, four task types, --robustness (perturbations + OOD) and --efficiency (memory probe stubbed)."""
    from .conftest import OOD_ROWS, SELFINST_ROWS, SENTIMENT_ROWS

    base = tmp_path_factory.mktemp("full_eval")
    data = base / "data"
    write_jsonl(data / "self-instruct" / "user_oriented_instructions.jsonl", SELFINST_ROWS)
    write_jsonl(data / "t0" / "sentiment.jsonl", SENTIMENT_ROWS)
    write_jsonl(data / "t0" / "ood.jsonl", OOD_ROWS)
    write_jsonl(data / "gsm8k" / "test.jsonl", GSM_ROWS)
    (data / "held_out.txt").write_text("Hello world! How are you today?\nThe quick brown fox.\n")
    tasks = []
    for name, text in (("tiny_sentiment", SENTIMENT_TASK), ("tiny_gsm", GSM_TASK), ("tiny_ppl", PPL_TASK)):
        (base / f"{name}.yaml").write_text(text)
        tasks.append(str(base / f"{name}.yaml"))
    out = base / "out"
    mp = pytest.MonkeyPatch()
    mp.setattr(efficiency, "probe_cpu_memory", lambda *a, **k: 123.0)
    try:
        summary = run_evaluation(EvalSettings(
            models=[str(tiny_model_dir), str(tiny_student_dir)], tasks=["selfinst", *tasks], output=out, data_dir=data,
            max_new_tokens=5, sample=True, seed=0, robustness=True, efficiency=True, batch_size=4, show_progress=False))
    finally:
        mp.undo()
    return summary, out


def test_summary_schema(full_eval):
    summary, out = full_eval
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert set(REQUIRED_KEYS) <= set(summary)
    assert summary["kdlm_eval_version"] == 1 and summary["device"] == "cpu"
    assert summary["reference"] == summary["models"][0]["label"]
    labels = [m["label"] for m in summary["models"]]
    assert len(labels) == 2 and len(set(labels)) == 2
    for m in summary["models"]:
        assert set(m) >= {"label", "path", "parameters", "disk_mb"}
        assert isinstance(m["parameters"], int) and isinstance(m["disk_mb"], float)
    assert [(t["name"], t["type"], t["primary_metric"], t["limit"]) for t in summary["tasks"]] == [
        ("selfinst", "generation", "rouge_l", None), ("tiny_sentiment", "classification", "accuracy", None),
        ("tiny_gsm", "generation", "accuracy", None), ("tiny_ppl", "perplexity", "perplexity", None)]
    teacher, student = labels
    for label in labels:
        assert set(summary["results"][label]) == {"selfinst", "tiny_sentiment", "tiny_gsm", "tiny_ppl"}
        assert summary["results"][label]["tiny_sentiment"]["n"] == 4
        assert set(summary["results"][label]["tiny_ppl"]) == {"perplexity", "ce", "tokens", "n"}
        e = summary["efficiency"][label]
        assert set(e) >= {"parameters", "disk_mb", "peak_memory_mb", "latency_ms_p50", "latency_ms_p95",
                          "throughput_tok_s", "ratios"}
        assert e["latency_ms_p95"] >= e["latency_ms_p50"] > 0 and e["peak_memory_mb"] == 123.0
    assert set(summary["agreement"]) == {student}  # the reference is not compared with itself
    assert summary["efficiency"][student]["ratios"]["parameters"] == pytest.approx(
        summary["models"][1]["parameters"] / summary["models"][0]["parameters"])
    # the report's reader accepts it
    from kdlm.report.inputs import load_eval_folder

    load_eval_folder(out)
    assert "tiny_sentiment accuracy" in render_table(summary)


def test_retention_arithmetic(full_eval):
    summary, _ = full_eval
    teacher, student = [m["label"] for m in summary["models"]]
    for task, values in summary["results"][student].items():
        for metric, value in values.items():
            if metric in ("n", "tokens"):
                continue
            t = summary["results"][teacher][task][metric]
            got = summary["retention"][student][task][metric]
            if t == 0 or (metric in ("perplexity", "ce", "ece") and value == 0):
                assert got is None  # nothing to retain: no percentage
            elif value == t:
                assert got == 100.0
            elif metric in ("perplexity", "ce", "ece"):
                assert got == pytest.approx(100 * t / value)
            else:
                assert got == pytest.approx(100 * value / t)
    for task, per in summary["retention"][teacher].items():  # the reference retains all of itself, if anything
        for metric, v in per.items():
            assert v == (None if summary["results"][teacher][task][metric] == 0 else 100.0)


def test_agreement_section(full_eval):
    summary, out = full_eval
    student = summary["models"][1]["label"]
    for task in ("selfinst", "tiny_sentiment", "tiny_gsm", "tiny_ppl"):
        a = summary["agreement"][student][task]
        assert a["kl_to_teacher"] >= 0 and 0 <= a["top1_agreement"] <= 1 and a["tokens"] > 0
        assert (a["ece"] is not None) == (task == "tiny_sentiment")
    assert summary["agreement"][student]["tiny_sentiment"]["ece"] == summary["results"][student]["tiny_sentiment"]["ece"]
    rows = read_jsonl(out / student / "selfinst" / "predictions.jsonl")
    assert all("kl_to_teacher" in r for r in rows if r["prediction"])
    metrics = json.loads((out / student / "selfinst" / "metrics.json").read_text())
    assert metrics["agreement"]["on"] == "teacher answers"


def test_classification_rows(full_eval):
    summary, out = full_eval
    for m in summary["models"]:
        rows = read_jsonl(out / m["label"] / "tiny_sentiment" / "predictions.jsonl")
        for r in rows:
            best = max(r["option_logprobs"], key=r["option_logprobs"].get)
            assert r["prediction"] == best and r["correct"] == (best == r["reference"])
            assert r["confidence"] == pytest.approx(max(r["option_probs"].values()))
        acc = sum(r["correct"] for r in rows) / len(rows)
        assert summary["results"][m["label"]]["tiny_sentiment"]["accuracy"] == pytest.approx(acc)


def test_robustness_and_ood_sections(full_eval):
    summary, out = full_eval
    for m in summary["models"]:
        label = m["label"]
        rob = summary["robustness"][label]["tiny_sentiment"]
        assert set(rob) >= {"clean_accuracy", "asr", "n_correct_clean"}
        assert set(rob["asr"]) == {"char", "word", "sentence", "overall"}
        assert rob["clean_accuracy"] == summary["results"][label]["tiny_sentiment"]["accuracy"]
        rows = read_jsonl(out / label / "tiny_sentiment" / "robustness" / "predictions.jsonl")
        assert len(rows) == 3 * rob["n_correct_clean"]  # every kind on every clean-correct example
        for kind in ("char", "word", "sentence"):
            kind_rows = [r for r in rows if r["kind"] == kind]
            if kind_rows:
                assert rob["asr"][kind] == pytest.approx(sum(r["flipped"] for r in kind_rows) / len(kind_rows))
                assert all(r["input"] != r["clean_input"] for r in kind_rows)
        ood = summary["ood"][label]["tiny_sentiment"]
        assert set(ood["ood"]) == {"shop"}
        assert ood["drop"]["shop"] == pytest.approx(ood["in_distribution"] - ood["ood"]["shop"])
        shop_rows = read_jsonl(out / label / "tiny_sentiment" / "ood" / "shop" / "predictions.jsonl")
        assert {r["reference"] for r in shop_rows} == {"Positive", "Negative"}  # the set's own options
        assert "tiny_gsm" in summary["robustness"][label]  # generation with accuracy: perturbed too
        assert "tiny_ppl" not in summary["robustness"][label]
    assert any("tiny_ppl" in note for note in summary["notes"])


def test_checks_before_any_model_is_loaded(tmp_path, data_dir, tiny_model_dir):
    settings = lambda **kw: EvalSettings(**{"models": ["/no/such/model"], "tasks": ["selfinst"],
                                            "output": tmp_path / "o", "data_dir": data_dir, **kw})
    with pytest.raises(ConfigError, match="did you mean 'selfinst'"):
        run_evaluation(settings(tasks=["selfinstr"]))
    with pytest.raises(DataError, match=r"gsm8k/test.jsonl not found"):
        run_evaluation(settings(tasks=["gsm8k"], data_dir=tmp_path / "empty"))
    with pytest.raises(ConfigError, match="--limit must be >= 1"):
        run_evaluation(settings(limit=0))
    from kdlm.errors import ModelError

    with pytest.raises(ModelError, match="/no/such/model"):
        run_evaluation(settings())
    assert not (tmp_path / "o").exists()


def test_model_labels_run_folders_and_teacher(tmp_path, tiny_model_dir, tiny_student_dir):
    run = tmp_path / "runs" / "fkl"
    shutil.copytree(tiny_student_dir, run / "model")
    (run / "resolved_config.yaml").write_text(yaml.safe_dump({"output": {"dir": str(run)}}))
    (run / "metrics.jsonl").write_text("")
    other = tmp_path / "other" / "fkl"
    shutil.copytree(tiny_student_dir, other)
    entries = resolve_models([str(run), str(other), str(run / "model")], teacher=str(tiny_model_dir))
    assert [e.label for e in entries] == [tiny_model_dir.name, "fkl", "fkl-2", "fkl-3"]
    assert entries[1].path == str(run / "model") and entries[1].source.path == str(run / "model")
    # --teacher naming one of the models moves it first instead of adding it
    entries = resolve_models([str(other), str(tiny_model_dir)], teacher=str(tiny_model_dir))
    assert [e.label for e in entries] == [tiny_model_dir.name, "fkl"]


def test_references_checked_before_loading(tmp_path, write_task):
    write_jsonl(tmp_path / "q.jsonl", [{"question": "2+2?", "answer": "four"}])
    task = write_task("type: generation\nsource: q.jsonl\ntemplate: '{question}'\nreference: '{answer}'\n"
                      "extract: number\nmetrics: [accuracy]\n")
    with pytest.raises(DataError, match=r"q.jsonl line 1: no answer can be extracted from the reference"):
        run_evaluation(EvalSettings(models=["/no/model"], tasks=[str(task)], output=tmp_path / "o", data_dir=tmp_path))


def test_reference_from_reuses_the_teachers_predictions_and_refuses_other_settings(tiny_model_dir, tiny_student_dir,
                                                                                    data_dir, sentiment_task, tmp_path):
    common = dict(tasks=["selfinst", str(sentiment_task)], data_dir=data_dir, max_new_tokens=4, batch_size=4,
                  robustness=True, show_progress=False)
    first = run_evaluation(EvalSettings(models=[str(tiny_model_dir)], output=tmp_path / "teacher", **common))
    both = run_evaluation(EvalSettings(models=[str(tiny_model_dir), str(tiny_student_dir)], output=tmp_path / "s",
                                       reference_from=tmp_path / "teacher", **common))
    ref = first["reference"]
    assert both["results"][ref] == first["results"][ref]
    assert both["ood"][ref] == first["ood"][ref] and both["robustness"][ref] == first["robustness"][ref]
    assert read_jsonl(tmp_path / "s" / ref / "selfinst" / "predictions.jsonl") == \
        read_jsonl(tmp_path / "teacher" / ref / "selfinst" / "predictions.jsonl")
    assert any("reused" in n for n in both["notes"])
    student = next(m["label"] for m in both["models"] if m["role"] == "student")
    assert both["agreement"][student]["tiny_sentiment"]["kl_to_teacher"] is not None
    with pytest.raises(ConfigError, match="max_new_tokens=4.*max_new_tokens=5"):
        run_evaluation(EvalSettings(models=[str(tiny_model_dir), str(tiny_student_dir)], output=tmp_path / "x",
                                    reference_from=tmp_path / "teacher", **{**common, "max_new_tokens": 5}))
    with pytest.raises(ConfigError, match="no summary.json"):
        run_evaluation(EvalSettings(models=[str(tiny_model_dir)], output=tmp_path / "y", reference_from=tmp_path,
                                    **common))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_classification_reports_balanced_accuracy_majority_baseline_and_intervals(full_eval):
    summary, out = full_eval
    task = next(t for t in summary["tasks"] if t["name"] == "tiny_sentiment")
    assert task["majority_baseline"] == {"accuracy": 0.5, "balanced_accuracy": 0.5, "class": 0}
    for label, per_task in summary["results"].items():
        assert 0.0 <= per_task["tiny_sentiment"]["balanced_accuracy"] <= 1.0
        ci = summary["intervals"][label]["tiny_sentiment"]["balanced_accuracy"]
        assert ci["ci_low"] <= per_task["tiny_sentiment"]["balanced_accuracy"] <= ci["ci_high"]
        ppl = summary["intervals"][label]["tiny_ppl"]["perplexity"]
        assert ppl["ci_low"] <= per_task["tiny_ppl"]["perplexity"] <= ppl["ci_high"]
