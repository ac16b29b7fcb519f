"""Tests for kdlm.report.compare_section: a `kdlm compare` folder (compare.json + run folders) as the report's
"Method comparison" section: every variant a row, intervals and n.s. markers, bold, seeds, validation, the CLI."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from kdlm.errors import DataError
from kdlm.report import make_report
from kdlm.report.inputs import load_inputs

from .conftest import RECIPE, write_eval_folder, write_run_folder
from .test_build import by_model, md_table, png_ok

TASK, TASK2, BACC, ASR, OOD = ("selfinst/rouge_l", "dolly/rouge_l", "sentiment/balanced_accuracy", "sentiment/asr",
                               "sentiment/ood:amazon_polarity/drop")
LATENCY, TPUT, STEPS, VAL_CE = ("efficiency/latency_ms_p50", "efficiency/throughput_tok_s", "training/steps",
                                "training/val_ce")


def _cell(value, low=None, high=None, n=100):
    return {"value": value, "ci_low": low, "ci_high": high, "n": n, "std": None, "per_seed": [value]}


def _diff(diff, low, high):
    return {"vs": "sft", "diff": diff, "ci_low": low, "ci_high": high, "significant": not low <= 0 <= high}


def compare_dict() -> dict:
    """A one-seed grid, as kdlm compare writes it: teacher, initial student, SFT, two methods and one that failed.

    The numbers give each column one clear best among the non-teacher rows; the teacher is better still on
    ASR and OOD drop (it must not be bold), and the initial student has the lowest OOD drop (it must be)."""
    return {
        "kdlm_compare_version": 1,
        "grid": "smollm2",
        "grid_file": "benchmarks/grids/smollm2.yaml",
        "description": "SmolLM2 students at one budget",
        "created": "2026-12-03T08:00:00+00:00",
        "budget": {"kind": "steps", "value": 20, "description": "20 optimizer steps x 8 sequences x 256 tokens"},
        "seeds": [0],
        "reference": "teacher",
        "baseline": "sft",
        "variants": [
            {"name": "teacher", "role": "teacher", "description": "the teacher itself", "status": "done", "error": None,
             "runs": []},
            {"name": "forward_kl", "role": "method", "description": "forward KL 0.9 + CE 0.1", "status": "done",
             "error": None, "runs": ["variants/forward_kl/seed0/run"], "overrides": ["loss=forward_kl"],
             "train": {"steps": 20, "counted_tokens": 40960, "train_seconds": 61.0, "val_ce": 5.0}},
            {"name": "initial", "role": "initial", "description": "the student before training", "status": "done",
             "error": None, "runs": []},
            {"name": "reverse_kl", "role": "method", "description": "reverse KL", "status": "failed",
             "error": "ModelError: student <s> diverged (loss nan at step 3)\nTraceback ...", "runs": []},
            {"name": "sft", "role": "sft", "description": "SFT on the same data", "status": "done", "error": None,
             "runs": ["variants/sft/seed0/run"],
             "train": {"steps": 20, "counted_tokens": 40960, "train_seconds": 55.5, "val_ce": 5.4}},
            {"name": "jsd", "role": "method", "description": "JSD beta 0.5", "status": "done", "error": None,
             "runs": ["variants/jsd/seed0/run"],
             "train": {"steps": 20, "counted_tokens": 40960, "train_seconds": 63.2, "val_ce": 5.2}},
        ],
        "metrics": [
            {"key": TASK, "task": "selfinst", "metric": "rouge_l", "higher_is_better": True, "group": "task",
             "label": "SelfInst ROUGE-L"},
            {"key": TASK2, "task": "dolly", "metric": "rouge_l", "higher_is_better": True, "group": "task",
             "label": "Dolly ROUGE-L"},
            {"key": BACC, "task": "sentiment", "metric": "balanced_accuracy", "higher_is_better": True, "group": "task",
             "label": "Sentiment balanced accuracy"},
            {"key": ASR, "task": "sentiment", "metric": "asr", "higher_is_better": False, "group": "robustness",
             "label": "ASR (char/word/sentence)"},
            {"key": OOD, "task": "sentiment", "metric": "ood_drop", "higher_is_better": False, "group": "ood",
             "label": "OOD drop (amazon_polarity)"},
            {"key": LATENCY, "task": None, "metric": "latency_ms_p50", "higher_is_better": False, "group": "efficiency",
             "label": "latency p50 ms"},
            {"key": TPUT, "task": None, "metric": "throughput_tok_s", "higher_is_better": True, "group": "efficiency",
             "label": "throughput tok/s"},
            {"key": STEPS, "task": None, "metric": "steps", "higher_is_better": True, "group": "training",
             "label": "steps"},
            {"key": VAL_CE, "task": None, "metric": "val_ce", "higher_is_better": False, "group": "training",
             "label": "held-out CE"},
        ],
        "table": {
            "teacher": {TASK: _cell(0.30, 0.28, 0.32), TASK2: _cell(0.25, 0.23, 0.27), BACC: _cell(0.90, 0.86, 0.94),
                        ASR: _cell(0.05, 0.03, 0.07), OOD: _cell(0.02, 0.00, 0.04),
                        LATENCY: _cell(40.0, n=None), TPUT: _cell(25.0, n=None)},
            "initial": {TASK: _cell(0.10, 0.08, 0.12), TASK2: _cell(0.08, 0.06, 0.10), BACC: _cell(0.50, 0.45, 0.55),
                        ASR: _cell(0.40, 0.35, 0.45), OOD: _cell(0.01, -0.01, 0.03),
                        LATENCY: _cell(20.0, n=None), TPUT: _cell(50.0, n=None)},
            "sft": {TASK: _cell(0.21, 0.19, 0.23), TASK2: _cell(0.17, 0.15, 0.19), BACC: _cell(0.70, 0.65, 0.75),
                    ASR: _cell(0.20, 0.16, 0.24), OOD: _cell(0.06, 0.04, 0.08),
                    LATENCY: _cell(20.5, n=None), TPUT: _cell(49.0, n=None), STEPS: _cell(20, n=None),
                    VAL_CE: _cell(5.4, n=None)},
            "forward_kl": {TASK: _cell(0.231, 0.21, 0.25), TASK2: _cell(0.18, 0.16, 0.20), BACC: _cell(0.78, 0.74, 0.82),
                           ASR: _cell(0.12, 0.09, 0.15), OOD: _cell(0.05, 0.03, 0.07),
                           LATENCY: _cell(19.8, n=None), TPUT: _cell(51.0, n=None), STEPS: _cell(20, n=None),
                           VAL_CE: _cell(5.0, n=None)},
            "jsd": {TASK: _cell(0.19, 0.17, 0.21), TASK2: _cell(0.20, 0.18, 0.22), BACC: _cell(0.72, 0.67, 0.77),
                    ASR: _cell(0.18, 0.14, 0.22), OOD: _cell(0.07, 0.05, 0.09),
                    LATENCY: _cell(20.1, n=None), TPUT: _cell(50.5, n=None), STEPS: _cell(20, n=None),
                    VAL_CE: _cell(5.2, n=None)},
        },
        "differences": {
            "forward_kl": {TASK: _diff(0.021, -0.005, 0.04), TASK2: _diff(0.01, -0.01, 0.03),
                           BACC: _diff(0.08, 0.03, 0.13), ASR: _diff(-0.08, -0.12, -0.04), OOD: _diff(-0.01, -0.03, 0.01)},
            "jsd": {TASK: _diff(-0.02, -0.035, -0.005), TASK2: _diff(0.03, 0.01, 0.05),
                    BACC: _diff(0.02, -0.02, 0.06), ASR: _diff(-0.02, -0.05, 0.01), OOD: _diff(0.01, 0.002, 0.02)},
            "initial": {TASK: _diff(-0.11, -0.13, -0.09)},
        },
        "retention": {
            "initial": {TASK: 33.3, TASK2: 32.0, BACC: 55.6},
            "sft": {TASK: 70.0, TASK2: 68.0, BACC: 77.8},
            "forward_kl": {TASK: 77.0, TASK2: 72.0, BACC: 86.7},
            "jsd": {TASK: 63.3, TASK2: 80.0, BACC: 80.0},
        },
        "majority_baseline": {BACC: 0.5, "sentiment/accuracy": 0.555},
        "best": {TASK: "forward_kl", TASK2: "jsd", BACC: "forward_kl", ASR: "forward_kl", OOD: "initial",
                 LATENCY: "forward_kl", TPUT: "forward_kl", STEPS: "sft", VAL_CE: "forward_kl"},
        "bootstrap": {"resamples": 1000, "confidence": 0.95, "method": "percentile; paired for differences"},
        "notes": ["reverse_kl failed; its row is kept so the grid stays visible."],
    }


def write_compare_folder(path: Path, compare: dict | None = None, *, runs: bool = True) -> Path:
    """A compare folder: compare.json and, for each listed run, a tiny finished run folder."""
    compare = compare_dict() if compare is None else compare
    path.mkdir(parents=True, exist_ok=True)
    (path / "compare.json").write_text(json.dumps(compare, indent=2))
    if runs:
        for variant in compare["variants"]:
            for rel in variant.get("runs") or []:
                recipe = copy.deepcopy(RECIPE)
                recipe["output"] = {"dir": str(path / rel)}
                write_run_folder(path / rel, recipe=recipe)
    return path


@pytest.fixture
def compare_dir(tmp_path: Path) -> Path:
    return write_compare_folder(tmp_path / "cmp")


def render(tmp_path: Path, *folders: Path) -> str:
    md_path, _ = make_report(list(folders), tmp_path / "report")
    return md_path.read_text()


def section(md: str, heading: str) -> str:
    """The Markdown from `heading` (a whole line) to the next heading."""
    lines = md.splitlines()
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines))
    return "\n".join(lines[start:end])


def main_table(md: str) -> dict[str, dict[str, str]]:
    return by_model(md_table(section(md, "## Method comparison"), "variant"), "variant")


# ----------------------------------------------------------------------------- the main table


def test_every_variant_is_a_row_in_role_order_with_the_failure(tmp_path, compare_dir):
    rows = main_table(render(tmp_path, compare_dir))
    # teacher, initial, sft first; then the methods in file order; the majority-class row last
    assert list(rows) == ["teacher", "initial", "sft", "forward_kl", "reverse_kl", "jsd", "majority class"]
    failed = rows["reverse_kl"]
    assert failed["description"] == "failed: ModelError: student &lt;s&gt; diverged (loss nan at step 3)"
    assert all(failed[h] == "—" for h in failed if h not in ("variant", "description"))
    assert rows["teacher"]["description"] == "the teacher itself"
    assert rows["majority class"]["Sentiment balanced accuracy ↑"] == "0.500"
    assert rows["majority class"]["SelfInst ROUGE-L ↑"] == "n/a"
    header = list(rows["teacher"])
    assert header == ["variant", "description", "SelfInst ROUGE-L ↑", "Dolly ROUGE-L ↑", "Sentiment balanced accuracy ↑",
                      "ASR (char/word/sentence) ↓", "OOD drop (amazon_polarity) ↓"]  # task + robustness + ood only


def test_cells_intervals_and_ns_markers_exactly_where_the_interval_contains_zero(tmp_path, compare_dir):
    rows = main_table(render(tmp_path, compare_dir))
    fkl, jsd = rows["forward_kl"], rows["jsd"]
    assert fkl["SelfInst ROUGE-L ↑"] == "**0.231 [0.210, 0.250] (+0.021 n.s.)**"
    assert fkl["Sentiment balanced accuracy ↑"] == "**0.780 [0.740, 0.820] (+0.080)**"
    assert fkl["ASR (char/word/sentence) ↓"] == "**0.120 [0.090, 0.150] (-0.080)**"
    assert fkl["OOD drop (amazon_polarity) ↓"] == "0.050 [0.030, 0.070] (-0.010 n.s.)"
    assert jsd["SelfInst ROUGE-L ↑"] == "0.190 [0.170, 0.210] (-0.020)"
    assert jsd["Sentiment balanced accuracy ↑"] == "0.720 [0.670, 0.770] (+0.020 n.s.)"
    assert rows["sft"]["SelfInst ROUGE-L ↑"] == "0.210 [0.190, 0.230]"  # the baseline: no difference to itself
    expected_ns = {("forward_kl", TASK), ("forward_kl", TASK2), ("forward_kl", OOD), ("jsd", BACC), ("jsd", ASR)}
    labels = {m["label"]: m["key"] for m in compare_dict()["metrics"]}
    found = {(name, labels[h.rsplit(" ", 1)[0]]) for name, row in rows.items() for h, text in row.items()
             if "n.s." in text and h not in ("variant", "description")}
    assert found == expected_ns


def test_bold_is_the_best_non_teacher_value_and_respects_lower_is_better(tmp_path, compare_dir):
    rows = main_table(render(tmp_path, compare_dir))
    assert not any("**" in text for text in rows["teacher"].values())  # best on every column, never bold
    bold = {h: name for name, row in rows.items() for h, text in row.items() if text.startswith("**")}
    assert bold == {"SelfInst ROUGE-L ↑": "forward_kl", "Dolly ROUGE-L ↑": "jsd",
                    "Sentiment balanced accuracy ↑": "forward_kl",
                    "ASR (char/word/sentence) ↓": "forward_kl",  # lowest ASR bar the teacher's
                    "OOD drop (amazon_polarity) ↓": "initial"}  # the untrained student drops least
    assert rows["initial"]["OOD drop (amazon_polarity) ↓"] == "**0.010 [-0.010, 0.030]**"


def test_paragraph_best_list_and_subsections(tmp_path, compare_dir):
    md = render(tmp_path, compare_dir)
    text = section(md, "## Method comparison").replace("\\", "")
    assert ("Grid smollm2 (benchmarks/grids/smollm2.yaml): SmolLM2 students at one budget; equal budget for every trained variant: 20 optimizer steps "
            "x 8 sequences x 256 tokens; seed 0; baseline sft. n.s. = the paired-bootstrap 95% interval of the "
            "difference to sft contains 0.") in text
    assert "*reverse_kl failed; its row is kept so the grid stays visible.*" in text
    assert ("- SelfInst ROUGE-L ↑: forward_kl, 0.231 [0.210, 0.250]; +0.021 [-0.005, 0.040] vs sft, "
            "not significant (n.s.)") in text
    assert "- Sentiment balanced accuracy ↑: forward_kl, 0.780 [0.740, 0.820]; +0.080 [0.030, 0.130] vs sft, significant" in text
    assert "- OOD drop (amazon_polarity) ↓: initial, 0.010 [-0.010, 0.030]\n" in text  # no difference to sft given
    assert "- latency p50 ms ↓: forward_kl, 19.80\n" in text
    assert "- steps" not in text and "- held-out CE" not in text  # training figures are not ranked in the list
    assert "- Dolly ROUGE-L ↑: jsd, 0.200 [0.180, 0.220]; +0.030 [0.010, 0.050] vs sft, significant" in text

    retention = by_model(md_table(section(md, "### Comparison: retention"), "variant"), "variant")
    assert list(retention) == ["initial", "sft", "forward_kl", "jsd"]  # no teacher, no failed variant
    assert retention["forward_kl"]["SelfInst ROUGE-L % ↑"] == "**77.0**"
    assert retention["jsd"]["Dolly ROUGE-L % ↑"] == "**80.0**"
    efficiency = by_model(md_table(section(md, "### Comparison: efficiency"), "variant"), "variant")
    assert efficiency["teacher"]["latency p50 ms ↓"] == "40.00"
    assert efficiency["forward_kl"]["latency p50 ms ↓"] == "**19.80**"
    assert efficiency["forward_kl"]["throughput tok/s ↑"] == "**51.00**"
    training_md = section(md, "### Comparison: training")
    training = by_model(md_table(training_md, "variant"), "variant")
    assert list(training) == ["sft", "forward_kl", "jsd"]
    # training/* metrics first (whole numbers as such), then the `train` figures no metric carries
    assert list(training["sft"])[2:] == ["steps ↑", "held-out CE ↓", "counted tokens", "train seconds"]
    assert training["sft"]["steps ↑"] == "**20**" and training["sft"]["counted tokens"] == "40,960"
    assert training["jsd"]["train seconds"] == "63.20"
    assert training["forward_kl"]["held-out CE ↓"] == "**5.000**" and training["jsd"]["held-out CE ↓"] == "5.200"
    assert "![Training curves of the compared variants](compare_training.png)" in training_md
    png_ok((tmp_path / "report" / "compare_training.png").read_bytes())


def test_section_comes_first_and_eval_folders_keep_their_sections(tmp_path, compare_dir, make_summary):
    ev = write_eval_folder(tmp_path / "eval", make_summary())
    md = render(tmp_path, ev, compare_dir)
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Method comparison" and headings[1] == "## Comparison"
    assert "comparison " + str(compare_dir) + " (grid smollm2, created 2026-12-03T08:00:00+00:00)" in md.replace("\\", "")


def test_compare_folder_alone_has_no_notes_about_missing_eval_or_runs(tmp_path, compare_dir):
    md = render(tmp_path, compare_dir)
    assert "No evaluation folder given" not in md and "No distillation run folder given" not in md
    assert "## Training runs" not in md  # the compare runs' curves live in its own training subsection
    inputs = load_inputs([compare_dir])
    assert inputs.evals is None and inputs.runs == [] and len(inputs.compares) == 1
    assert [r.label for r in inputs.compares[0].runs] == ["forward_kl", "sft", "jsd"]


def test_several_seeds_show_mean_and_std(tmp_path):
    compare = compare_dict()
    compare["seeds"] = [0, 1, 2]
    fkl = compare["table"]["forward_kl"][TASK]
    fkl.update(std=0.012, per_seed=[0.22, 0.231, 0.242])
    sft = compare["variants"][4]
    sft["runs"] = [f"variants/sft/seed{k}/run" for k in range(3)]
    compare["variants"][1]["description"] = ""  # described by its run's objective instead
    md = render(tmp_path, write_compare_folder(tmp_path / "cmp", compare))
    rows = main_table(md)
    assert rows["forward_kl"]["description"] == "0.9·forward_kl + 0.1·ce (T=2); 10 layers kept"
    assert rows["forward_kl"]["SelfInst ROUGE-L ↑"] == "**0.231 ± 0.012 [0.210, 0.250] (+0.021 n.s.)**"
    assert rows["sft"]["SelfInst ROUGE-L ↑"] == "0.210 [0.190, 0.230]"  # std null: no ± part
    assert "seeds 0, 1, 2" in md and "the value (mean ± standard deviation over the seeds)" in md
    assert [r.label for r in load_inputs([tmp_path / "cmp"]).compares[0].runs] == [
        "forward_kl", "sft seed0", "sft seed1", "sft seed2", "jsd"]


def test_no_finished_baseline_and_a_partial_variant(tmp_path):
    # what kdlm compare writes when SFT failed: baseline null, no differences; a variant with some seeds left
    compare = compare_dict()
    sft = compare["variants"][4]
    sft.update(status="failed", error="seed 0: OOM", runs=[])
    del sft["train"]
    compare["variants"][5].update(status="partial")
    for name in ("sft", "jsd"):
        del compare["table"][name], compare["retention"][name]
    compare.update(baseline=None, differences={})
    md = render(tmp_path, write_compare_folder(tmp_path / "cmp", compare))
    assert "; no baseline finished, so no differences are shown." in md and "n.s." not in md
    rows = main_table(md)
    assert rows["sft"]["description"] == "failed: seed 0: OOM" and rows["jsd"]["description"] == "partial"
    assert rows["jsd"]["SelfInst ROUGE-L ↑"] == "—"
    assert rows["forward_kl"]["SelfInst ROUGE-L ↑"] == "**0.231 [0.210, 0.250]**"


def test_two_compare_folders_get_a_section_each(tmp_path):
    second = compare_dict()
    second["grid"] = "gemma"
    md = render(tmp_path, write_compare_folder(tmp_path / "a"), write_compare_folder(tmp_path / "b", second))
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings == ["## Method comparison: smollm2", "## Method comparison: gemma"]
    assert "(compare_training_1.png)" in md and "(compare_training_2.png)" in md
    assert "### Comparison: retention (gemma)" in md


def test_a_listed_run_that_is_missing_is_a_note(tmp_path):
    md = render(tmp_path, write_compare_folder(tmp_path / "cmp", runs=False))
    assert ("Listed run folders that hold no run (resolved_config.yaml + metrics.jsonl): variants/forward_kl/seed0/run, "
            "variants/sft/seed0/run, variants/jsd/seed0/run; their curves are omitted.") in md.replace("\\", "")
    assert not (tmp_path / "report" / "compare_training.png").exists()


# ----------------------------------------------------------------------------- malformed compare.json


def _set(path: str, value):
    def mutate(c: dict) -> dict:
        *parents, last = path.split(".")
        node = c
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
        return c
    return mutate


_DELETE = object()


@pytest.mark.parametrize("mutate, message", [
    (lambda c: "{not json", "malformed compare.json: Expecting property name enclosed in double quotes at line 1"),
    (lambda c: [c], "malformed compare.json: expected a JSON object"),
    (_set("kdlm_compare_version", _DELETE), "no kdlm_compare_version"),
    (_set("kdlm_compare_version", 2), "kdlm_compare_version 2 is not supported (this kdlm reads version 1)"),
    (_set("table", _DELETE), "malformed compare.json: no table"),
    (_set(f"table.sft.{TASK}.value", "0.21"), f"table.sft.{TASK}.value must be a number or null, got str"),
    (_set(f"table.sft.{TASK}.per_seed", ["x"]), f"table.sft.{TASK}.per_seed must be a list of numbers"),
    (_set("table.ghost", {}), "table.ghost: no such variant in variants"),
    (_set("metrics.3.higher_is_better", "no"), "metrics[3].higher_is_better has the wrong type (str)"),
    (_set("metrics.3.higher_is_better", _DELETE), "metrics[3].higher_is_better must be true or false"),
    (_set("metrics.0.group", "quality"), "metrics[0].group must be one of task, robustness, ood, efficiency, training"),
    (_set("variants.1.name", ""), "variants[1].name must be a non-empty string"),
    (_set("variants.2.name", "teacher"), "variants[2].name 'teacher' appears twice"),
    (_set("seeds", [0, "1"]), "seeds must be a list of integers"),
    (_set(f"differences.jsd.{TASK}.significant", "yes"), f"differences.jsd.{TASK}.significant must be true"),
    (_set("retention.sft.selfinst/rouge_l", "high"), "retention.sft.selfinst/rouge_l must be a number or null"),
    (_set("variants.1.train.train_seconds", "1m"), "variants[1].train.train_seconds must be a number or null"),
    (_set("description", 3), "malformed compare.json: description must be a string"),
])
def test_malformed_compare_json_is_one_data_error_naming_file_and_field(tmp_path, mutate, message):
    folder = write_compare_folder(tmp_path / "cmp")
    bad = mutate(compare_dict())
    (folder / "compare.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(DataError) as err:
        make_report([folder], tmp_path / "out")
    text = str(err.value)
    assert text.startswith(f"{folder / 'compare.json'}: ") and message in text and "\n" not in text
    assert not (tmp_path / "out").exists()  # nothing written


# ----------------------------------------------------------------------------- the command


def test_kdlm_report_on_a_compare_folder(tmp_path, compare_dir, capsys):
    from kdlm.cli import main

    out = tmp_path / "out"
    assert main(["report", str(compare_dir), "-o", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "<h2 id=\"method-comparison\">Method comparison</h2>" in page
    assert "<strong>0.231 [0.210, 0.250] (+0.021 n.s.)</strong>" in page
    assert "<script" not in page.lower() and not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//)", page)
    assert "report written to" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing"), "-o", str(out)]) == 2
