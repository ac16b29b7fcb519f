"""LLM-as-judge (`kdlm eval --judge-url`): verdict parsing, the position-swap arithmetic, and `kdlm eval` end to end
against a fake OpenAI-compatible judge server (in-process, standard library), including the servers that refuse."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional, Union

import pytest

from kdlm.evaluation import judge as J
from kdlm.evaluation.judge import aggregate_judgements, parse_verdict, student_outcome

REPO = Path(__file__).resolve().parents[2]
MARK = "STUDENT-MARK"


# ----------------------------------------------------------------------------- parse_verdict


@pytest.mark.parametrize("text, verdict", [
    ("Answer A is more complete.\nVerdict: A", "A"),
    ("B is better.\nVerdict: B", "B"),
    ("Both are equally good.\nVerdict: tie", "tie"),
    ("verdict: b", "B"),
    ("VERDICT:TIE", "tie"),
    ("Verdict = A", "A"),
    ("reason...\n**Verdict:** B", "B"),
    ("Verdict: **A**", "A"),
    ("Verdict: [B]", "B"),
    ("Verdict: A.", "A"),
    ("Verdict: B\nOn second thought, A is clearer.\nVerdict: A", "A"),  # the last verdict line wins
    ("Verdict: A\nthe rest is commentary", "A"),
    ("I first thought Verdict: A, but Verdict: B is right? no.\nVerdict: tie", "tie"),
    ("My verdict: A", "A"),
    ("[[A]]", "A"),
    ("Explanation. Final: [[B]]", "B"),
    ("[[C]]", "tie"),
    ("[[A]] at first, then [[B]]", "B"),
    ("Verdict: B and later [[A]]", "B"),  # a verdict line comes before the MT-bench fallback
])
def test_parse_verdict_forms(text, verdict):
    assert parse_verdict(text) == verdict


@pytest.mark.parametrize("text", [
    None, "", "A", "Answer A is better.", "The verdict is clear: A wins",  # no "verdict: X"
    "Verdict: Both are fine", "Verdict: Answer A", "Verdict: tied", "Verdict:", "Verdict: C",
    '"Verdict: A", "Verdict: B" or "Verdict: tie"',  # an echo of the instructions: ambiguous, not a guess
    "[A]", "[[D]]", "Verdict A",
])
def test_parse_verdict_garbage_is_none(text):
    assert parse_verdict(text) is None


def test_student_outcome_maps_positions():
    assert [student_outcome(v, "student_first") for v in ("A", "B", "tie", None)] == [1.0, 0.0, 0.5, None]
    assert [student_outcome(v, "teacher_first") for v in ("A", "B", "tie", None)] == [0.0, 1.0, 0.5, None]
    with pytest.raises(ValueError):
        student_outcome("A", "first")


# ----------------------------------------------------------------------------- the swap arithmetic


def judged(verdicts: dict[int, tuple[Optional[str], Optional[str]]]) -> dict:
    """aggregate_judgements over {index: (verdict student_first, verdict teacher_first)}."""
    rows = []
    for index, pair in verdicts.items():
        for order, verdict in zip(J.ORDERS, pair):
            rows.append({"index": index, "order": order, "verdict": verdict})
    return aggregate_judgements(rows)


def test_pure_position_bias_is_exactly_on_par():
    out = judged({i: ("A", "A") for i in range(7)})
    assert out["judge_win_rate"] == 0.5 and out["judge_position_consistency"] == 0.0
    assert (out["judge_wins"], out["judge_losses"], out["judge_ties"], out["judge_n"]) == (7, 7, 0, 7)
    out = judged({i: ("B", "B") for i in range(3)})
    assert out["judge_win_rate"] == 0.5 and out["judge_position_consistency"] == 0.0


def test_judge_preferring_the_student_everywhere_gives_one():
    out = judged({i: ("A", "B") for i in range(5)})  # the student's text is A first, B second
    assert out["judge_win_rate"] == 1.0 and out["judge_position_consistency"] == 1.0
    assert (out["judge_wins"], out["judge_ties"], out["judge_losses"], out["judge_unparseable"]) == (10, 0, 0, 0)
    assert judged({i: ("B", "A") for i in range(5)})["judge_win_rate"] == 0.0


def test_ties_give_one_half_and_are_consistent():
    out = judged({i: ("tie", "tie") for i in range(4)})
    assert out["judge_win_rate"] == 0.5 and out["judge_ties"] == 8 and out["judge_position_consistency"] == 1.0


def test_mixed_case_by_hand():
    out = judged({
        0: ("A", "B"),      # student wins both orders: 1.0, consistent
        1: ("A", "A"),      # position bias: 0.5, inconsistent
        2: ("tie", "B"),    # tie then win: 0.75, inconsistent
        3: ("B", None),     # a loss; the other order unparseable and left out: 0.0
        4: (None, "tie"),   # only a tie parsed: 0.5
        5: (None, None),    # nothing parsed: excluded from the win rate
    })
    assert out["judge_win_rate"] == pytest.approx((1.0 + 0.5 + 0.75 + 0.0 + 0.5) / 5)
    assert out["judge_n"] == 5 and out["judge_excluded"] == 1
    assert (out["judge_wins"], out["judge_ties"], out["judge_losses"], out["judge_unparseable"]) == (4, 2, 2, 4)
    assert out["judge_wins"] + out["judge_ties"] + out["judge_losses"] + out["judge_unparseable"] == 2 * 6
    assert out["judge_position_consistency"] == pytest.approx(1 / 3)  # examples 0, 1, 2 have both orders


def test_unparseable_is_never_guessed():
    # one example, its only parsed order a loss: a guess for the other order would move the score off 0
    assert judged({0: ("B", None)})["judge_win_rate"] == 0.0
    out = judged({0: (None, None), 1: (None, None)})
    assert out["judge_win_rate"] is None and out["judge_n"] == 0 and out["judge_excluded"] == 2
    assert out["judge_position_consistency"] is None and out["judge_unparseable"] == 4
    rows = [{"index": 0, "order": "student_first", "verdict": None, "error": "HTTP 422: no"},
            {"index": 0, "order": "teacher_first", "verdict": "B"}]
    out = aggregate_judgements(rows)
    assert out["judge_failed"] == 1 and out["judge_unparseable"] == 1 and out["judge_win_rate"] == 1.0


# ----------------------------------------------------------------------------- the prompt file


def test_shipped_prompt_is_versioned_and_packaged():
    prompt = J.load_prompt()
    path = REPO / "kdlm" / "evaluation" / "prompts" / "judge_pairwise_v1.txt"
    assert prompt.version == "pairwise_v1" and prompt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all("{" + p + "}" in prompt.text for p in J.PLACEHOLDERS)
    assert parse_verdict(prompt.text) is None  # the instructions themselves name no verdict
    text = (REPO / "pyproject.toml").read_text()
    globs = re.search(r"\[tool\.setuptools\.package-data\]\s*kdlm\s*=\s*\[([^\]]*)\]", text).group(1)
    assert any(fnmatch.fnmatch("evaluation/prompts/judge_pairwise_v1.txt", g.strip().strip('"')) for g in globs.split(","))


def test_render_substitutes_once(tmp_path):
    prompt = J.load_prompt()
    text = prompt.render("Say {answer_b} please", "first {instruction}", "second")
    assert "Say {answer_b} please" in text and "first {instruction}" in text
    assert text.index("first {instruction}") < text.index("second")
    bad = tmp_path / "bad.txt"
    bad.write_text("Only {instruction} and {answer_a}")
    from kdlm.errors import DataError

    with pytest.raises(DataError, match=r"\{answer_b\}"):
        J.load_prompt(str(bad))


# ----------------------------------------------------------------------------- a fake judge server

Decide = Callable[[str], Union[str, int]]  # prompt -> the judge's text, or an HTTP status to answer with


class FakeJudge:
    """An OpenAI-compatible judge: GET /v1/models lists `models`; POST /v1/chat/completions answers
    `decide(prompt)`; `status` answers every request (both endpoints) with that HTTP error."""

    def __init__(self, decide: Decide, models=("fake-judge",), status: Optional[int] = None):
        self.decide, self.models, self.status = decide, list(models), status
        self.bodies: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int) -> None:
                self._send(status, {"error": {"message": f"fake judge says {status}", "type": "invalid_request_error"}})

            def do_GET(self):
                if owner.status:
                    return self._error(owner.status)
                self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in owner.models]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.bodies.append(body)
                if owner.status:
                    return self._error(owner.status)
                answer = owner.decide(body["messages"][-1]["content"])
                if isinstance(answer, int):
                    return self._error(answer)
                self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": answer}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def __enter__(self) -> "FakeJudge":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def answers_of(prompt: str) -> tuple[str, str]:
    """(answer A, answer B) of a prompt rendered from the shipped template."""
    a = prompt.split("[Answer A]\n", 1)[1].split("\n\n[Answer B]\n", 1)
    return a[0], a[1].split("\n\nFirst give a short reason", 1)[0]


def marker_judge(prompt: str) -> str:
    """Prefers the answer holding MARK; an example about France gets no verdict at all (unparseable)."""
    if "France" in prompt:
        return "I cannot decide."
    a, b = answers_of(prompt)
    return "A is better.\nVerdict: " + ("A" if MARK in a else "B" if MARK in b else "tie")


@pytest.fixture
def scripted_predictions(monkeypatch):
    """The tiny random models' generations replaced by known texts: the student's (2 layers) hold MARK."""
    from kdlm.evaluation import scoring

    def generate(model, tokenizer, contexts, **kw):
        who = "student " + MARK if model.config.num_hidden_layers == 2 else "teacher"
        return [f"{who} answer {i}" for i in range(len(contexts))]

    monkeypatch.setattr(scoring, "generate", generate)


def eval_args(teacher: Path, student: Path, data_dir: Path, out: Path, url: str, *more: str) -> list[str]:
    return ["eval", str(teacher), str(student), "--task", "selfinst", "--data-dir", str(data_dir), "--output", str(out),
            "--max-new-tokens", "4", "--batch-size", "4", "--no-progress", "--judge-url", url, *more]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_with_marker_judge_end_to_end(tiny_model_dir, tiny_student_dir, data_dir, sentiment_task, tmp_path,
                                           scripted_predictions, one_thread, capsys):
    from kdlm.cli import main

    out = tmp_path / "out"
    with FakeJudge(marker_judge, models=("judge-1", "judge-2")) as srv:
        args = eval_args(tiny_model_dir, tiny_student_dir, data_dir, out, srv.base_url, "--task", str(sentiment_task),
                         "--judge-max-tokens", "64", "--judge-concurrency", "2")
        assert main(args) == 0
        bodies = srv.bodies
    summary = json.loads((out / "summary.json").read_text())
    teacher, student = summary["reference"], summary["models"][1]["label"]
    figures = summary["judge"][student]["selfinst"]
    # 3 SelfInst examples: two the student wins in both orders, the France one unparseable twice (excluded)
    assert figures["judge_win_rate"] == 1.0 and figures["judge_n"] == 2
    assert (figures["judge_wins"], figures["judge_ties"], figures["judge_losses"], figures["judge_unparseable"]) == (4, 0, 0, 2)
    assert figures["judge_position_consistency"] == 1.0 and figures["judge_excluded"] == 1
    assert set(summary["judge"]) == {student} and set(summary["judge"][student]) == {"selfinst"}
    assert any("tiny_sentiment: not judged" in n for n in summary["notes"])
    settings = summary["settings"]["judge"]
    assert settings["model"] == "judge-1" and settings["prompt_version"] == "pairwise_v1"
    assert settings["prompt_sha256"] == J.load_prompt().sha256 and settings["url"] == srv.base_url
    # requests: greedy, unseeded, the max tokens asked for, the first listed model
    assert len(bodies) == 6 and all(b["temperature"] == 0.0 and b["max_tokens"] == 64 and "seed" not in b
                                    and b["model"] == "judge-1" for b in bodies)
    rows = read_jsonl(out / student / "selfinst" / "judge.jsonl")
    assert len(rows) == 6 and [r["order"] for r in rows] == ["student_first", "teacher_first"] * 3
    assert [r["index"] for r in rows] == [0, 0, 1, 1, 2, 2]
    first = rows[0]
    assert set(first) >= {"index", "order", "prompt", "response", "verdict", "outcome"}
    assert answers_of(first["prompt"]) == ("student STUDENT-MARK answer 0", "teacher answer 0")
    assert answers_of(rows[1]["prompt"]) == ("teacher answer 0", "student STUDENT-MARK answer 0")
    assert "Rewrite the sentence to be shorter." in first["prompt"]
    assert [(r["verdict"], r["outcome"]) for r in rows[:2]] == [("A", 1.0), ("B", 1.0)]
    assert [(r["verdict"], r["outcome"]) for r in rows[4:]] == [(None, None), (None, None)]
    assert rows[4]["response"] == "I cannot decide."
    metrics = json.loads((out / student / "selfinst" / "metrics.json").read_text())
    assert metrics["judge"]["judge_win_rate"] == 1.0 and metrics["judge"]["judge"]["prompt_version"] == "pairwise_v1"
    assert metrics["judge"]["file"] == "judge.jsonl"
    assert not (out / teacher / "selfinst" / "judge.jsonl").exists()
    assert not (out / student / "tiny_sentiment" / "judge.jsonl").exists()


def test_eval_with_position_biased_judge_real_generation(tiny_model_dir, tiny_student_dir, data_dir, tmp_path,
                                                         one_thread):
    """Real (random) generations, a judge that always says A, one request refused with 422 (recorded, left out)."""
    from kdlm.evaluation.cli import main

    lock, refused = threading.Lock(), []

    def always_a(prompt: str):
        with lock:
            if "Say hello" in prompt and not refused:  # the first request of that example: 422, not retried
                refused.append(prompt)
                return 422
        return "Verdict: A"

    out = tmp_path / "out"
    with FakeJudge(always_a) as srv:
        assert main(eval_args(tiny_model_dir, tiny_student_dir, data_dir, out, srv.base_url)[1:]) == 0
    summary = json.loads((out / "summary.json").read_text())
    student = summary["models"][1]["label"]
    figures = summary["judge"][student]["selfinst"]
    rows = read_jsonl(out / student / "selfinst" / "judge.jsonl")
    failed = [r for r in rows if r.get("error")]
    assert len(rows) == 6 and len(failed) == 1 and "422" in failed[0]["error"] and failed[0]["verdict"] is None
    assert figures["judge_failed"] == 1 and figures["judge_unparseable"] == 1 and figures["judge_n"] == 3
    assert figures["judge_wins"] + figures["judge_ties"] + figures["judge_losses"] + figures["judge_unparseable"] == 6
    # the one example with a single parsed order scores that order alone (1.0 or 0.0); the other two 0.5 exactly
    lone = 1.0 if failed[0]["order"] == "teacher_first" else 0.0
    assert figures["judge_win_rate"] == pytest.approx((0.5 + 0.5 + lone) / 3)
    assert figures["judge_position_consistency"] == 0.0


def test_without_judge_url_nothing_changes(tiny_model_dir, data_dir, tmp_path, one_thread):
    from kdlm.evaluation.run import EvalSettings, run_evaluation

    summary = run_evaluation(EvalSettings(models=[str(tiny_model_dir)], tasks=["selfinst"], output=tmp_path / "o",
                                          data_dir=data_dir, max_new_tokens=2, show_progress=False))
    assert summary["judge"] == {} and "judge" not in summary["settings"]
    assert not any(p.name == "judge.jsonl" for p in (tmp_path / "o").rglob("*"))


REFUSALS = [
    ("401", lambda: FakeJudge(lambda p: "Verdict: A", status=401), [], r"HTTP 401 .*fake judge says 401"),
    ("404", lambda: FakeJudge(lambda p: "Verdict: A", status=404), [], r"HTTP 404"),
    ("unknown model", lambda: FakeJudge(lambda p: "Verdict: A", models=("judge-1",)), ["--judge-model", "gpt-9"],
     r"model 'gpt-9' is not served there \(served: judge-1\)"),
    ("unset key", lambda: FakeJudge(lambda p: "Verdict: A"), ["--judge-api-key-env", "KDLM_TEST_NO_SUCH_KEY"],
     r"KDLM_TEST_NO_SUCH_KEY is not set"),
    ("bad max tokens", lambda: FakeJudge(lambda p: "Verdict: A"), ["--judge-max-tokens", "0"], r"--judge-max-tokens"),
]


@pytest.mark.parametrize("name, server, more, message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusing_judge_is_one_line_before_any_model_loads(name, server, more, message, tiny_model_dir,
                                                           tiny_student_dir, data_dir, tmp_path, capsys, monkeypatch):
    from kdlm.cli import main
    from kdlm.evaluation import run as R

    monkeypatch.delenv("KDLM_TEST_NO_SUCH_KEY", raising=False)
    monkeypatch.setattr(R, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    with server() as srv:
        status = main(eval_args(tiny_model_dir, tiny_student_dir, data_dir, out, srv.base_url, *more))
        sent = list(srv.bodies)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("kdlm: error: ")
    assert re.search(message, err[0]), err[0]
    if name in ("401", "404", "unknown model"):
        assert srv.base_url in err[0]
    assert sent == []  # no judge request either
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "earlier work"


def test_connection_refused_and_flags_without_url(tiny_model_dir, tiny_student_dir, data_dir, tmp_path, capsys):
    import socket

    from kdlm.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    url = f"http://127.0.0.1:{port}/v1"
    assert main(eval_args(tiny_model_dir, tiny_student_dir, data_dir, out, url)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdlm: error: --judge-url " + url) and "does not answer" in err[0]
    assert not out.exists()
    args = eval_args(tiny_model_dir, tiny_student_dir, data_dir, out, url)
    args = args[:args.index("--judge-url")] + ["--judge-model", "x"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kdlm: error: --judge-model needs --judge-url (the judge server's base URL)"]
    assert main(eval_args(tiny_model_dir, tiny_student_dir, data_dir, out, "ftp://x/v1")) == 2
    assert "not an http(s) URL" in capsys.readouterr().err
