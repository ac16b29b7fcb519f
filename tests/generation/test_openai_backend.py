"""The openai backend against the fault-injecting server: every requested sample ends in the output or in
failed.jsonl, none empty, none twice; fatal statuses stop the run with one line naming the base URL."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdlm.config import from_dict
from kdlm.config.generation import GenerateRecipe
from kdlm.errors import ConfigError
from kdlm.generation.backends.base import FatalBackendError
from kdlm.generation.backends.openai import RateLimiter, retry_after_seconds
from kdlm.generation.run import Limits, generate
from servers.fault_server import FaultServer, answer_text

N_PROMPTS = 24


def write_prompts(path: Path, n: int = N_PROMPTS) -> Path:
    path.write_text("".join(json.dumps({"question": f"Question number {i}: what is {i} + {i}?",
                                        "answer": f"#### {2 * i}"}) + "\n" for i in range(n)))
    return path


def recipe_for(tmp_path: Path, url: str, **generate_fields) -> GenerateRecipe:
    g = {"pipeline": "responses", "prompts": str(write_prompts(tmp_path / "prompts.jsonl")), "max_new_tokens": 32,
         "concurrency": 8, **generate_fields}
    return from_dict(GenerateRecipe, {
        "teacher": {"backend": "openai", "model": "fault-teacher", "base_url": url, "timeout_s": 1.0,
                    "max_retries": 6, "backoff_base_s": 0.01, "backoff_max_s": 0.05},
        "generate": g, "output": {"dir": str(tmp_path / "out")}})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def output_rows(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [r for shard in manifest["shards"] for r in read_jsonl(out / shard)]


def test_clean_run_rows_and_provenance(tmp_path):
    with FaultServer() as srv:
        result = generate(recipe_for(tmp_path, srv.base_url), show_progress=False)
        stats = srv.stats()
    rows = output_rows(result.output_dir)
    assert len(rows) == N_PROMPTS and len({r["id"] for r in rows}) == N_PROMPTS
    first = rows[0]
    rendered = "user: " + first["messages"][0]["content"]
    assert first["messages"][-1]["content"] == answer_text(rendered, 0, 0)  # the server's answer, untouched
    prov = first["provenance"]
    assert prov["finish_reason"] == "stop" and prov["usage"]["completion_tokens"] > 0 and prov["latency_s"] >= 0
    assert prov["sample_index"] == 0 and prov["source"].endswith("prompts.jsonl:1")
    assert stats["duplicate_answered"] == 0
    assert stats["answered"] == N_PROMPTS + 1  # + the capability probe


def test_fault_storm_every_sample_once_in_output_or_dead_letters(tmp_path):
    faults = {"status_storm": {"status": 503, "attempts": 2, "retry_after": 0.01, "share": 0.4},
              "truncate": {"attempts": 1, "share": 0.3, "first_attempt": 0},
              "drop_connection": {"attempts": 1, "share": 0.2},
              "hang": {"seconds": 3.0, "attempts": 1, "share": 0.15},
              "length": {"share": 0.2}}
    with FaultServer(faults=faults, seed=3) as srv:
        recipe = recipe_for(tmp_path, srv.base_url, n=2, temperature=0.8)
        recipe.teacher.max_retries = 3
        result = generate(recipe, show_progress=False)
        stats = srv.stats()
    out = result.output_dir
    rows = output_rows(out)
    failed = read_jsonl(out / "failed.jsonl")
    keys = [r["provenance"]["request_key"] for r in rows] + [f["request_key"] for f in failed]
    assert len(keys) == 2 * N_PROMPTS and len(set(keys)) == len(keys)  # every sample exactly once
    assert all(r["messages"][-1]["content"].strip() for r in rows)  # never an empty row
    assert result.summary["retried"] > 0
    assert stats["duplicate_answered"] == 0
    lengths = [r for r in rows if r["provenance"]["finish_reason"] == "length"]
    assert lengths, "finish_reason=length is a real outcome and is kept (a filter may drop it)"


def test_retries_exhausted_go_to_dead_letters_and_a_rerun_retries_them(tmp_path):
    with FaultServer(faults={"status_storm": {"status": 500, "attempts": None, "share": 0.25}}, seed=1) as srv:
        recipe = recipe_for(tmp_path, srv.base_url)
        recipe.teacher.max_retries = 2
        first = generate(recipe, show_progress=False)
        failed = read_jsonl(first.output_dir / "failed.jsonl")
        assert failed and all(f["status"] == 500 and f["attempts"] == 3 for f in failed)
        assert len(output_rows(first.output_dir)) + len(failed) == N_PROMPTS
        srv.set_faults({})
        before = srv.stats()["answered"]
        second = generate(recipe, show_progress=False)
        assert srv.stats()["answered"] - before == len(failed)  # only the failed ones are sent again
        assert srv.stats()["duplicate_answered"] == 0
    assert len(output_rows(second.output_dir)) == N_PROMPTS
    assert not (second.output_dir / "failed.jsonl").exists()


@pytest.mark.parametrize("status", [401, 403, 404, 400])
def test_fatal_status_stops_with_one_line_naming_the_url(tmp_path, status, capsys):
    from kdlm.cli import main

    with FaultServer(faults={"status_always": status}) as srv:
        path = tmp_path / "r.yaml"
        path.write_text(json.dumps({"teacher": {"backend": "openai", "model": "fault-teacher", "base_url": srv.base_url},
                                    "generate": {"prompts": str(write_prompts(tmp_path / "p.jsonl"))},
                                    "output": {"dir": str(tmp_path / "out")}}))
        code = main(["generate", str(path), "--no-progress"])
        received = srv.stats()["received"]
        url = srv.base_url
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("kdlm: error: ") and url in err[0] and str(status) in err[0]
    assert received == 0  # stopped at GET /models, before any completion request
    assert not (tmp_path / "out").exists()  # nothing written


def test_401_mid_run_stops(tmp_path):
    with FaultServer() as srv:
        recipe = recipe_for(tmp_path, srv.base_url, concurrency=1)
        srv.set_faults({"status_storm": {"status": 401, "attempts": None, "share": 1.0}})  # models ok, completions 401
        with pytest.raises(FatalBackendError, match="401"):
            generate(recipe, show_progress=False)


def test_400_dead_lettered_when_asked(tmp_path):
    with FaultServer(seed=2) as srv:
        recipe = recipe_for(tmp_path, srv.base_url)
        recipe.teacher.stop_on_400 = False
        generate(recipe, limits=Limits(max_requests=1), show_progress=False)  # the probe, answered and cached
        srv.set_faults({"status_storm": {"status": 400, "attempts": None, "share": 0.3}})
        result = generate(recipe, show_progress=False)
    failed = read_jsonl(result.output_dir / "failed.jsonl")
    assert failed and all(f["status"] == 400 and f["attempts"] == 1 for f in failed)  # never retried


def test_server_ignoring_n_is_emulated_with_seeded_requests(tmp_path):
    with FaultServer(faults={"ignore_n": True}) as srv:
        result = generate(recipe_for(tmp_path, srv.base_url, n=3, temperature=0.7), show_progress=False)
        stats = srv.stats()
    rows = output_rows(result.output_dir)
    assert len(rows) == 3 * N_PROMPTS
    texts = {(r["provenance"]["source"], r["messages"][-1]["content"]) for r in rows}
    assert len(texts) == 3 * N_PROMPTS  # seeds seed+0, +1, +2 gave three different samples per prompt
    assert result.summary["teacher"]["capabilities"]["n"] is False
    assert stats["duplicate_answered"] == 0


def test_api_key_from_env_never_written(tmp_path, monkeypatch):
    secret = "sk-test-very-secret-123"
    monkeypatch.setenv("KDLM_TEST_KEY", secret)
    with FaultServer(api_key=secret) as srv:
        recipe = recipe_for(tmp_path, srv.base_url)
        recipe.teacher.api_key_env = "KDLM_TEST_KEY"
        result = generate(recipe, show_progress=False)
    assert len(output_rows(result.output_dir)) == N_PROMPTS
    for f in result.output_dir.rglob("*"):
        if f.is_file():
            assert secret not in f.read_text(errors="replace"), f
    monkeypatch.delenv("KDLM_TEST_KEY")
    with pytest.raises(ConfigError, match="KDLM_TEST_KEY"):
        generate(recipe, show_progress=False)


def test_several_base_urls_share_the_work(tmp_path):
    with FaultServer() as a, FaultServer() as b:
        recipe = recipe_for(tmp_path, a.base_url)
        recipe.teacher.base_url = [a.base_url, b.base_url]
        result = generate(recipe, show_progress=False)
        got_a, got_b = a.stats()["answered"], b.stats()["answered"]
    assert len(output_rows(result.output_dir)) == N_PROMPTS
    assert got_a > 3 and got_b > 3 and got_a + got_b == N_PROMPTS + 1


def test_concurrency_limit_is_honoured(tmp_path):
    with FaultServer(faults={"max_concurrency": 4, "latency": 0.05}) as srv:
        generate(recipe_for(tmp_path, srv.base_url, concurrency=4), show_progress=False)
        stats = srv.stats()
    assert stats["max_in_flight"] <= 4 and stats["by_status"].get(429, 0) == 0


def test_max_requests_stops_and_a_rerun_continues(tmp_path):
    with FaultServer() as srv:
        recipe = recipe_for(tmp_path, srv.base_url, concurrency=2)
        first = generate(recipe, limits=Limits(max_requests=5), show_progress=False)
        assert first.summary["stopped"] and first.summary["requests"] == 5
        assert json.loads((first.output_dir / "manifest.json").read_text())["complete"] is False
        second = generate(recipe, show_progress=False)
        stats = srv.stats()
    assert second.summary["requests"] == N_PROMPTS - 5 and second.summary["samples_cached"] == 5
    assert stats["duplicate_answered"] == 0 and len(output_rows(second.output_dir)) == N_PROMPTS


def test_dry_run_sends_nothing(tmp_path, capsys):
    with FaultServer() as srv:
        result = generate(recipe_for(tmp_path, srv.base_url, n=2, temperature=0.5), dry_run=True, show_progress=False)
        assert srv.stats()["received"] == 0
    assert result.summary["requests"] == N_PROMPTS and result.summary["samples"] == 2 * N_PROMPTS
    assert "dry run" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_dead_server_stops_the_run(tmp_path):
    with FaultServer() as srv:
        recipe = recipe_for(tmp_path, srv.base_url, concurrency=2)
        recipe.teacher.max_retries = 0
        recipe.teacher.max_consecutive_failures = 4
        generate(recipe, limits=Limits(max_requests=1), show_progress=False)  # probe answered (and cached)
        srv.set_faults({"status_storm": {"status": 503, "attempts": None, "share": 1.0}})
        with pytest.raises(FatalBackendError, match="4 requests in a row failed"):
            generate(recipe, show_progress=False)
        assert srv.stats()["received"] < 4 + 2 + 1 + 1  # stopped, not every prompt dead-lettered


def test_failed_probe_is_fatal(tmp_path):
    with FaultServer(faults={"status_storm": {"status": 503, "attempts": None, "share": 1.0}}) as srv:
        recipe = recipe_for(tmp_path, srv.base_url)
        recipe.teacher.max_retries = 1
        with pytest.raises(FatalBackendError, match="capability probe failed: HTTP 503"):
            generate(recipe, show_progress=False)


def test_retry_after_parsing_and_rate_limiter():
    import asyncio
    import email.utils

    assert retry_after_seconds("2.5") == 2.5
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < retry_after_seconds(when) <= 31

    async def timed() -> float:
        limiter = RateLimiter(600)  # 10 per second, bucket of 600
        limiter.level = 0.0  # empty bucket: every unit waits for the refill
        start = time.monotonic()
        for _ in range(3):
            await limiter.acquire(1)
        return time.monotonic() - start

    assert 0.25 < asyncio.run(timed()) < 1.0  # 3 units at 10/s


def test_kill_9_halfway_then_restart_sends_no_request_twice(tmp_path):
    """`kdlm generate` in a child process, killed with SIGKILL mid-run, then run again to the end: the server
    answered every request once, and the output has every row once."""
    server = subprocess.Popen([sys.executable, str(Path(__file__).parents[1] / "servers" / "fault_server.py"),
                               "--port", "0", "--faults", json.dumps({"latency": 0.15})],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        n = 40
        recipe = tmp_path / "r.yaml"
        recipe.write_text(json.dumps({
            "teacher": {"backend": "openai", "model": "fault-teacher", "base_url": url},
            "generate": {"prompts": str(write_prompts(tmp_path / "p.jsonl", n)), "concurrency": 2, "max_new_tokens": 16},
            "output": {"dir": str(tmp_path / "out")}}))
        cmd = [sys.executable, "-m", "kdlm", "generate", str(recipe), "--no-progress"]
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = tmp_path / "out" / "request_cache" / "responses.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < n // 3):
            time.sleep(0.05)
        child.kill()  # SIGKILL: no cleanup, maybe a torn last line
        child.wait()
        time.sleep(0.5)  # requests the server was still working on finish (or are abandoned) now
        at_kill = stats_of(url)
        cached = len(read_jsonl_tolerant(log))
        assert 0 < cached < n, "the kill must land mid-run"
        # answers the server sent that the killed client never stored (in flight at the kill): at most concurrency
        lost = at_kill["answered"] - 1 - cached
        assert 0 <= lost <= 2
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        stats = stats_of(url)
    finally:
        server.kill()
        server.wait()
    rows = output_rows(tmp_path / "out")
    assert len(rows) == n and len({r["id"] for r in rows}) == n
    assert sorted(r["provenance"]["source"] for r in rows) == sorted(f"{tmp_path / 'p.jsonl'}:{i + 1}" for i in range(n))
    # no stored answer was asked for again (the capability probe is cached too); only the lost ones were resent
    assert stats["duplicate_answered"] == lost
    assert stats["answered"] == n + 1 + lost


def stats_of(url: str) -> dict:
    import urllib.request

    return json.loads(urllib.request.urlopen(url.removesuffix("/v1") + "/stats").read())


def read_jsonl_tolerant(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out
