"""Tests for kdlm.report.build: the tables' numbers and bold, the charts, the page, partial inputs, atomic writes."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from kdlm.errors import DataError, KdlmError
from kdlm.report import build as build_module
from kdlm.report import make_report
from kdlm.report.build import fmt_num, lower_is_better
from kdlm.report.plots import Point, pareto_front

from .conftest import FKL, RKL, TEACHER, write_eval_folder, write_run_folder


def md_table(md: str, first_header: str) -> list[dict[str, str]]:
    """The Markdown table whose header row starts with `| first_header |`, as one dict per row (escapes undone)."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().replace("\\", "") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    header, body = rows[0], rows[2:]
    return [dict(zip(header, row)) for row in body]


def by_model(rows: list[dict[str, str]], key: str = "model") -> dict[str, dict[str, str]]:
    return {row[key]: row for row in rows}


def png_ok(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    Image.open(io.BytesIO(data)).verify()  # checks chunk CRCs
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.size


# ----------------------------------------------------------------------------- the complete report


def test_comparison_table_numbers_and_bold(full_report):
    rows = by_model(md_table(full_report.md, "model | params | method"))
    assert list(rows) == [TEACHER, FKL, RKL]  # the reference first
    t, f, r = rows[TEACHER], rows[FKL], rows[RKL]
    assert t["params"] == "134.5M" and f["params"] == "81.4M" and r["params"] == "54.0M"
    assert t["method"] == "teacher (reference)"
    assert f["method"] == "0.9·forward_kl + 0.1·ce (T=2); 10 layers kept"  # from the matched run's recipe
    assert r["method"] == "—"
    # the teacher is shown but never bold; the best student is bold, per column and direction
    assert t["gsm8k: exact_match ↑"] == "0.320"
    assert f["gsm8k: exact_match ↑"] == "0.240" and r["gsm8k: exact_match ↑"] == "**0.260**"
    assert f["ag_news: accuracy ↑"] == "**0.812**" and r["ag_news: accuracy ↑"] == "0.755"
    assert f["retention % (mean) ↑"] == "**84.0**" and r["retention % (mean) ↑"] == "83.8"  # (75+92.9)/2, (81.25+86.4)/2
    assert t["retention % (mean) ↑"] == "100.0"
    assert r["ASR overall (mean) ↓"] == "**0.159**" and f["ASR overall (mean) ↓"] == "0.170"
    assert t["ASR overall (mean) ↓"] == "0.124"  # better than both students, still not bold
    assert r["OOD drop (mean) ↓"] == "**0.190**" and f["OOD drop (mean) ↓"] == "0.217"
    assert r["latency p50 ms ↓"] == "**18.40**" and r["throughput tok/s ↑"] == "**54.10**"
    assert not any("**" in v for v in t.values())


def test_retention_and_asr_tables(full_report):
    retention = by_model(md_table(full_report.md, "student"), "student")
    assert retention[FKL] == {"student": FKL, "gsm8k: exact_match % ↑": "75.0", "ag_news: accuracy % ↑": "**92.9**",
                              "mean % ↑": "**84.0**"}
    assert retention[RKL]["gsm8k: exact_match % ↑"] == f"**{81.25:.1f}**"
    asr = by_model(md_table(full_report.md, "task | model"))
    assert asr[FKL]["ASR char ↓"] == "0.173" and asr[RKL]["ASR char ↓"] == "**0.158**"
    assert asr[RKL]["ASR overall ↓"] == "**0.159**" and asr[TEACHER]["ASR overall ↓"] == "0.124"
    assert asr[FKL]["clean accuracy ↑"] == "**0.812**" and asr[FKL]["n correct (clean)"] == "162"
    ood = by_model(md_table(full_report.md, "model | in-distribution ↑"))
    assert ood[RKL]["yahoo drop ↓"] == "**0.165**" and ood[FKL]["dbpedia ↑"] == "**0.588**"


def test_efficiency_agreement_and_training_tables(full_report):
    eff = by_model(md_table(full_report.md, "model | params ↓"))
    assert eff[FKL]["params ÷ teacher"] == "0.60×" and eff[RKL]["throughput ÷ teacher"] == "2.26×"
    assert eff[TEACHER]["peak memory MB ↓"] == "1,210" and eff[RKL]["peak memory MB ↓"] == "**590.1**"
    agree = by_model(md_table(full_report.md, "model | gsm8k: KL to teacher ↓"))
    assert agree[FKL]["gsm8k: KL to teacher ↓"] == "**0.412**" and agree[RKL]["gsm8k: ECE ↓"] == "0.083"
    assert "ag_news: ECE ↓" not in agree[FKL]  # all null: column dropped
    before_after = {row["metric"]: row for row in md_table(full_report.md, "metric | before")}
    assert before_after["CE (nats/token) ↓"] == {"metric": "CE (nats/token) ↓", "before": "9.000", "after": "5.000",
                                                 "change": "-4.000"}
    assert before_after["top-1 agreement ↑"]["change"] == "+0.200"
    assert "evaluated as: student-fkl" in full_report.md.replace("\\", "")


def test_images_are_written_and_valid(full_report):
    names = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", full_report.md)
    assert set(names) == {"retention.png", "pareto.png", "robustness_asr.png", "ood_drop.png", "training_fkl.png"}
    for name in names:
        width, height = png_ok((full_report.out / name).read_bytes())
        assert width >= 600 and height >= 200


def test_html_is_one_self_contained_page(full_report):
    page = full_report.html
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    assert "<style>" in page and "Content-Security-Policy" in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 5
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        png_ok(base64.b64decode(src.split(",", 1)[1]))
    assert "<strong>0.260</strong>" in page  # the same bold as the Markdown


def test_text_is_escaped(tmp_path, make_summary):
    evil = '<script>alert("x")</script> | *a*'
    summary = make_summary()
    for section in ("results", "retention", "robustness", "ood", "efficiency", "agreement"):
        summary[section][evil] = summary[section].pop(RKL)
    summary["models"][2]["label"] = evil
    out = tmp_path / "out"
    md_path, html_path = make_report([write_eval_folder(tmp_path / "eval", summary)], out)
    page, md = html_path.read_text(), md_path.read_text()
    assert "<script" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; | *a*" in page
    assert "<script" not in md and "&lt;script&gt;alert(\"x\")&lt;/script&gt; \\| \\*a\\*" in md
    assert by_model(md_table(md, "model | params | method"))[evil.replace("<", "&lt;").replace(">", "&gt;")]


# ----------------------------------------------------------------------------- partial inputs


def test_partial_summary_renders_with_notes(tmp_path, make_summary):
    summary = make_summary()
    for section in ("robustness", "ood", "agreement"):
        summary[section] = {}
    del summary["harness"]  # a missing key is read as {}
    md_path, html_path = make_report([write_eval_folder(tmp_path / "eval", summary)], tmp_path / "out")
    md = md_path.read_text()
    assert "*No robustness results in the inputs: section omitted.*" in md
    assert "*No out-of-distribution results in the inputs: section omitted.*" in md
    assert "*No distillation run folder given: training curves omitted.*" in md
    assert not (tmp_path / "out" / "robustness_asr.png").exists()
    header = md_table(md, "model | params | method")[0]
    assert "ASR overall (mean) ↓" not in header and "OOD drop (mean) ↓" not in header
    assert "No robustness results" in html_path.read_text()


def test_means_cover_only_the_tasks_every_model_has(tmp_path, make_summary):
    # a student whose single correct gsm8k answer flipped (ASR 1.0, n = 1) next to a teacher with no gsm8k ASR,
    # and an OOD set only one model was evaluated on: neither may move that model's mean
    summary = make_summary()
    summary["robustness"][FKL]["gsm8k"] = {"clean_accuracy": 0.02, "asr": {"overall": 1.0}, "n_correct_clean": 1}
    summary["ood"][RKL]["ag_news"]["drop"]["amazon"] = 0.9
    summary["retention"][RKL]["gsm8k"] = {"exact_match": None}
    md = make_report([write_eval_folder(tmp_path / "eval", summary)], tmp_path / "out")[0].read_text()
    rows = by_model(md_table(md, "model | params | method"))
    assert rows[FKL]["ASR overall (mean) ↓"] == "0.170"  # ag_news only, as for the others
    assert rows[RKL]["OOD drop (mean) ↓"] == "**0.190**"  # yahoo and dbpedia only
    assert rows[FKL]["retention % (mean) ↑"] == "**92.9**" and rows[RKL]["retention % (mean) ↑"] == "86.4"
    assert "retention over ag_news; ASR over ag_news; OOD drop over ag_news/yahoo, ag_news/dbpedia" in md.replace("\\", "")


def test_results_only_summary(tmp_path, make_summary):
    summary = make_summary()
    for section in ("retention", "agreement", "robustness", "ood", "efficiency", "harness"):
        summary[section] = {}
    for model in summary["models"]:
        del model["parameters"]
    md = make_report([write_eval_folder(tmp_path / "eval", summary)], tmp_path / "out")[0].read_text()
    assert "No retention results" in md and "No efficiency results" in md
    assert "Pareto view omitted" in md
    rows = by_model(md_table(md, "model | params | method"))
    assert rows[TEACHER]["params"] == "n/a" and rows[RKL]["gsm8k: exact_match ↑"] == "**0.260**"


def test_run_folders_only(tmp_path):
    done = write_run_folder(tmp_path / "a" / "run")
    unfinished = write_run_folder(tmp_path / "b" / "run", finished=False)
    with (unfinished / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 25, "time": 10')  # a half-written line: the run is still going
    md = make_report([done, unfinished], tmp_path / "out")[0].read_text()
    assert "No evaluation folder given" in md
    runs = by_model(md_table(md, "run | method"), "run")
    assert set(runs) == {"a/run", "b/run"}  # same folder names: told apart by their parents
    assert runs["a/run"]["val CE ↓"] == "**5.000**" and runs["b/run"]["val CE ↓"] == "**5.000**"
    assert "no final_metrics.json yet" in md.replace("\\", "") and "incomplete" in md
    assert (tmp_path / "out" / "training_a_run.png").is_file() and (tmp_path / "out" / "training_b_run.png").is_file()


def test_two_eval_folders_are_merged(tmp_path, make_summary):
    first = make_summary()
    second = {"kdlm_eval_version": 1, "reference": TEACHER, "models": [{"label": "student-jsd", "parameters": 40_000_000}],
              "tasks": [{"name": "wiki", "type": "perplexity", "primary_metric": "perplexity", "limit": None}],
              "results": {TEACHER: {"wiki": {"perplexity": 12.5}}, FKL: {"wiki": {"perplexity": 18.25}},
                          "student-jsd": {"wiki": {"perplexity": 17.0}, "gsm8k": {"exact_match": 0.2}}}}
    md = make_report([write_eval_folder(tmp_path / "e1", first), write_eval_folder(tmp_path / "e2", second)],
                     tmp_path / "out")[0].read_text()
    rows = by_model(md_table(md, "model | params | method"))
    assert list(rows) == [TEACHER, FKL, RKL, "student-jsd"]
    assert rows["student-jsd"]["wiki: perplexity ↓"] == "**17.00**"  # lower is better for perplexity
    assert rows[FKL]["wiki: perplexity ↓"] == "18.25" and rows[RKL]["wiki: perplexity ↓"] == "n/a"
    assert rows[FKL]["gsm8k: exact_match ↑"] == "0.240"  # the first folder's values are kept


# ----------------------------------------------------------------------------- writing


def test_bad_input_leaves_existing_report_untouched(tmp_path, eval_dir):
    out = tmp_path / "out"
    make_report([eval_dir], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdlmError, match="empty: neither an evaluation folder"):
        make_report([eval_dir, tmp_path / "empty"], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_failure_while_rendering_leaves_existing_report(tmp_path, eval_dir, monkeypatch):
    out = tmp_path / "out"
    make_report([eval_dir], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(build_module.plots, "pareto_scatter", boom)
    with pytest.raises(RuntimeError):
        make_report([eval_dir], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp files either


def test_rerun_replaces_report_and_drops_stale_images(tmp_path, eval_dir, make_summary):
    out = tmp_path / "out"
    make_report([eval_dir], out)
    assert (out / "robustness_asr.png").is_file()
    (out / "notes.txt").write_text("mine")
    summary = make_summary()
    summary["robustness"] = {}
    make_report([write_eval_folder(tmp_path / "eval2", summary)], out)
    assert not (out / "robustness_asr.png").exists()
    assert (out / "notes.txt").read_text() == "mine"  # files the report did not write are left alone
    assert "No robustness results" in (out / "report.md").read_text()


def test_output_path_is_a_file(tmp_path, eval_dir):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(KdlmError, match="not a folder"):
        make_report([eval_dir], target)


def test_malformed_summary_is_reported_with_its_path(tmp_path):
    folder = tmp_path / "ev"
    folder.mkdir()
    (folder / "summary.json").write_text('{"kdlm_eval_version": 1, "models": [')
    with pytest.raises(DataError) as err:
        make_report([folder], tmp_path / "out")
    assert str(folder / "summary.json") in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- helpers


def test_pareto_front():
    pts = [Point("big", 100, 100, "k"), Point("mid", 60, 90, "k"), Point("bad", 70, 80, "k"),
           Point("small", 30, 70, "k"), Point("tie", 60, 85, "k")]
    assert [p.label for p in pareto_front(pts, higher_is_better=True)] == ["small", "mid", "big"]
    assert [p.label for p in pareto_front(pts, higher_is_better=False)] == ["small"]


@pytest.mark.parametrize("metric,lower", [("accuracy", False), ("exact_match", False), ("perplexity", True),
                                          ("kl_to_teacher", True), ("val/ce", True), ("latency_ms_p50", True),
                                          ("throughput_tok_s", False), ("macro_f1", False), ("ece", True)])
def test_lower_is_better(metric, lower):
    assert lower_is_better(metric) is lower


def test_fmt_num():
    assert [fmt_num(v) for v in (None, 0, 0.8123, 12.345, 123.45, 12345.6, 0.00012)] == \
        ["n/a", "0", "0.812", "12.35", "123.5", "12,346", "1.20e-04"]

