"""The fault-injecting OpenAI-compatible test server does what its docstring says (stdlib clients only)."""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .fault_server import DEFAULT_MODEL, FaultServer, answer_text, normalize_faults, request_key, split_tokens

SERVER_PY = Path(__file__).with_name("fault_server.py")


def post(srv, path, body, headers=None, timeout=5.0, raw=None):
    """(status, headers dict, body bytes) of one POST on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    try:
        data = raw if raw is not None else json.dumps(body).encode()
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def chat(srv, body, **kw):
    status, headers, data = post(srv, "/v1/chat/completions", body, **kw)
    return status, headers, data


def chat_json(srv, body, **kw):
    status, _, data = chat(srv, body, **kw)
    assert status == 200, data
    return json.loads(data)


def msg(text, **extra):
    return {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": text}], **extra}


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


@pytest.fixture
def srv():
    with FaultServer() as s:
        yield s


def test_models_and_base_url(srv):
    assert srv.base_url == f"http://127.0.0.1:{srv.port}/v1"
    with urllib.request.urlopen(srv.base_url + "/models", timeout=5) as r:
        listing = json.load(r)
    assert listing["object"] == "list"
    assert listing["data"][0]["id"] == "fault-teacher" and listing["data"][0]["object"] == "model"
    with FaultServer(model="other") as s2:
        with urllib.request.urlopen(s2.base_url + "/models", timeout=5) as r:
            assert json.load(r)["data"][0]["id"] == "other"


def test_binds_loopback_only(srv):
    assert srv._httpd.socket.getsockname()[0] == "127.0.0.1"
    # a non-loopback address of this machine (if it has one) must refuse the port
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it only picks a source address
        own = probe.getsockname()[0]
    except OSError:
        own = None
    finally:
        probe.close()
    if own and not own.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((own, srv.port), timeout=1).close()


def test_chat_shape_and_predictable_answer(srv):
    body = msg("What is 2+2?", seed=7)
    r = chat_json(srv, body)
    assert set(r) >= {"id", "object", "created", "model", "choices", "usage"}
    assert r["object"] == "chat.completion" and r["model"] == DEFAULT_MODEL
    (c,) = r["choices"]
    assert c["index"] == 0 and c["message"]["role"] == "assistant" and c["finish_reason"] == "stop"
    assert c["logprobs"] is None
    # the documented formula, recomputed here by hand
    h = hashlib.sha256(json.dumps(["user: What is 2+2?", 7, 0]).encode()).hexdigest()
    d = int(h[8:12], 16) % 10
    assert c["message"]["content"] == f"Answer {h[:8]}. The answer is {d}.\n#### {d}"
    assert c["message"]["content"] == answer_text("user: What is 2+2?", 7, 0)
    assert r["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12}  # "user:" is a word
    # deterministic: same request, same content (a fresh server too); another seed differs
    assert chat_json(srv, body)["choices"][0]["message"]["content"] == c["message"]["content"]
    with FaultServer(seed=123) as other:
        assert chat_json(other, body)["choices"][0]["message"]["content"] == c["message"]["content"]
    assert chat_json(srv, msg("What is 2+2?", seed=8))["choices"][0]["message"]["content"] != c["message"]["content"]
    assert srv.expected(body)[0]["text"] == c["message"]["content"]


def test_content_parts_and_system_message(srv):
    body = {
        "model": "x",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        ],
    }
    r = chat_json(srv, body)
    assert r["choices"][0]["message"]["content"] == answer_text("system: Be brief.\nuser: Hi there", None, 0)


def test_n_and_ignore_n(srv):
    r = chat_json(srv, msg("q", n=3))
    texts = [c["message"]["content"] for c in r["choices"]]
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert texts == [answer_text("user: q", None, j) for j in range(3)] and len(set(texts)) == 3
    assert r["usage"]["completion_tokens"] == 24
    srv.set_faults({"ignore_n": True})
    r = chat_json(srv, msg("q", n=3))
    assert len(r["choices"]) == 1 and r["choices"][0]["message"]["content"] == texts[0]


def test_max_tokens_cuts_with_length(srv):
    full = answer_text("user: q", None, 0)
    r = chat_json(srv, msg("q", max_tokens=3))
    c = r["choices"][0]
    assert c["finish_reason"] == "length"
    assert c["message"]["content"] == "".join(split_tokens(full)[:3]) and full.startswith(c["message"]["content"])
    assert r["usage"]["completion_tokens"] == 3
    r = chat_json(srv, msg("q", max_completion_tokens=8))
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["message"]["content"] == full


def test_chat_logprobs(srv):
    body = msg("q", logprobs=True, top_logprobs=5)
    r = chat_json(srv, body)
    c = r["choices"][0]
    entries = c["logprobs"]["content"]
    assert "".join(e["token"] for e in entries) == c["message"]["content"]
    assert len(entries) == len(split_tokens(c["message"]["content"]))
    for e in entries:
        tops = e["top_logprobs"]
        assert len(tops) == 5
        assert tops[0]["token"] == e["token"] and tops[0]["logprob"] == e["logprob"]
        lps = [t["logprob"] for t in tops]
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
        assert sum(math.exp(lp) for lp in lps) < 1.0
        assert len({t["token"] for t in tops}) == 5
    assert chat_json(srv, body)["choices"][0]["logprobs"] == c["logprobs"]  # deterministic
    r20 = chat_json(srv, msg("q", logprobs=True, top_logprobs=20))
    assert len(r20["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 20
    assert r20["choices"][0]["logprobs"]["content"][0]["top_logprobs"][:5] == entries[0]["top_logprobs"]
    only = chat_json(srv, msg("q", logprobs=True))["choices"][0]["logprobs"]["content"]
    assert only[0]["top_logprobs"] == [] and only[0]["logprob"] == entries[0]["logprob"]
    for bad in (msg("q", logprobs=True, top_logprobs=21), msg("q", top_logprobs=2), msg("q", n=0), msg("q", max_tokens=0)):
        status, _, data = chat(srv, bad)
        assert status == 400 and json.loads(data)["error"]["type"] == "invalid_request_error"
    assert srv.stats()["by_status"][400] == 4


def test_completions_endpoint(srv):
    status, _, data = post(srv, "/v1/completions", {"model": "m", "prompt": "2+2=", "logprobs": 2, "max_tokens": 4})
    assert status == 200
    r = json.loads(data)
    assert r["object"] == "text_completion"
    (c,) = r["choices"]
    assert c["text"] == "".join(split_tokens(answer_text("2+2=", None, 0))[:4]) and c["finish_reason"] == "length"
    lp = c["logprobs"]
    assert "".join(lp["tokens"]) == c["text"] and len(lp["token_logprobs"]) == 4
    assert all(len(t) == 2 for t in lp["top_logprobs"]) and lp["text_offset"][0] == 0
    # batch prompts: choice index = prompt_i * n + j
    status, _, data = post(srv, "/v1/completions", {"model": "m", "prompt": ["a", "b"], "n": 2, "seed": 1})
    texts = [(c["index"], c["text"]) for c in json.loads(data)["choices"]]
    assert texts == [(0, answer_text("a", 1, 0)), (1, answer_text("a", 1, 1)), (2, answer_text("b", 1, 0)), (3, answer_text("b", 1, 1))]
    status, _, data = post(srv, "/v1/completions", {"model": "m", "prompt": [1, 2, 3]})
    assert json.loads(data)["choices"][0]["text"] == answer_text("1 2 3", None, 0)


def test_api_key(srv):
    with FaultServer(api_key="sekret") as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, _, data = chat(s, msg("q"), headers=headers)
            assert status == 401
            assert json.loads(data) == {
                "error": {"message": "Invalid API key", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
            }
        status, _, _ = chat(s, msg("q"), headers={"Authorization": "Bearer sekret"})
        assert status == 200
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(s.base_url + "/models", timeout=5)
        assert e.value.code == 401
        st = s.stats()
        assert st["by_status"] == {200: 1, 401: 2} and st["received"] == 3 and st["answered"] == 1


def test_status_storm_then_answer():
    with FaultServer(faults={"status_storm": {"status": 429, "attempts": 3, "retry_after": 0.05}}) as srv:
        body = msg("storm")
        for _ in range(3):
            status, headers, data = chat(srv, body)
            assert status == 429 and headers["Retry-After"] == "0.05"
            assert json.loads(data)["error"]["type"] == "rate_limit_error"
        status, _, _ = chat(srv, body)
        assert status == 200
        st = srv.stats()
        assert st["received"] == 4 and st["by_status"] == {200: 1, 429: 3}
        assert st["answered"] == 1 and st["distinct_answered"] == 1 and st["duplicate_answered"] == 0
        assert st["faults"] == {"status_storm": 3}
        # another status, no Retry-After
        srv.set_faults(status_storm={"status": 503, "attempts": 1})
        status, headers, data = chat(srv, msg("storm 2"))
        assert status == 503 and "Retry-After" not in headers and json.loads(data)["error"]["type"] == "server_error"


def test_share_is_seeded_and_predictable():
    faults = {"status_storm": {"status": 500, "attempts": 1, "share": 0.5}}
    bodies = [msg(f"q{i}") for i in range(40)]
    with FaultServer(faults=faults, seed=0) as srv:
        got = [chat(srv, b)[0] == 500 for b in bodies]
        assert got == [srv.selected("status_storm", b) for b in bodies]
        assert 8 <= sum(got) <= 32
        assert all(chat(srv, b)[0] == 200 for b in bodies)  # second attempts all pass
    with FaultServer(faults=faults, seed=0) as again:
        assert [again.selected("status_storm", b) for b in bodies] == got
    with FaultServer(faults=faults, seed=1) as other:
        assert [other.selected("status_storm", b) for b in bodies] != got


def test_hang_client_timeout_then_retry():
    with FaultServer(faults={"hang": {"seconds": 3, "attempts": 1}}) as srv:
        body = msg("slow")
        t0 = time.monotonic()
        with pytest.raises((TimeoutError, socket.timeout)):
            chat(srv, body, timeout=0.2)
        assert time.monotonic() - t0 < 2.5  # the client gave up long before the 3 s hang ended
        assert wait_for(lambda: srv.stats()["abandoned"] == 1)  # noticed the client left; no answer sent
        status, _, _ = chat(srv, body)
        assert status == 200
        st = srv.stats()
        assert st["answered"] == 1 and st["duplicate_answered"] == 0 and st["faults"] == {"hang": 1}
        assert st["by_status"] == {200: 1} and st["received"] == 2
        # a patient client just gets a slow answer
        srv.set_faults(hang={"seconds": 0.2})
        t0 = time.monotonic()
        assert chat(srv, msg("slow 2"))[0] == 200 and time.monotonic() - t0 >= 0.2


def test_truncate():
    with FaultServer(faults={"truncate": {"attempts": 1}}) as srv:
        body = msg("cut")
        status, headers, data = chat(srv, body)
        assert status == 200 and int(headers["Content-Length"]) == len(data)
        with pytest.raises(ValueError):
            json.loads(data)
        full = chat_json(srv, body)
        assert json.dumps(full).encode()[: len(data)][:20] == data[:20]
        st = srv.stats()
        assert st["by_status"] == {200: 2} and st["answered"] == 1 and st["faults"] == {"truncate": 1}


def test_drop_connection():
    with FaultServer(faults={"drop_connection": {"attempts": 2}}) as srv:
        body = msg("drop")
        for _ in range(2):
            with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
                chat(srv, body)
        assert chat(srv, body)[0] == 200
        st = srv.stats()
        assert st["dropped"] == 2 and st["received"] == 3 and st["by_status"] == {200: 1} and st["answered"] == 1


def test_stacked_windows():
    faults = {
        "status_storm": {"status": 429, "attempts": 2},
        "drop_connection": {"first_attempt": 2, "attempts": 1},
        "truncate": {"first_attempt": 3},
    }
    with FaultServer(faults=faults) as srv:
        body = msg("stack")
        assert chat(srv, body)[0] == 429
        assert chat(srv, body)[0] == 429
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            chat(srv, body)
        status, _, data = chat(srv, body)
        assert status == 200 and data != b"" and srv.stats()["answered"] == 0
        assert chat_json(srv, body)["choices"][0]["message"]["content"] == answer_text("user: stack", None, 0)
        assert srv.stats()["faults"] == {"status_storm": 2, "drop_connection": 1, "truncate": 1}


def test_length_fault_is_permanent():
    with FaultServer(faults={"length": {"share": 1.0}}) as srv:
        body = msg("long", n=2)
        for _ in range(2):
            r = chat_json(srv, body)
            for j, c in enumerate(r["choices"]):
                assert c["finish_reason"] == "length"
                assert c["message"]["content"] == "".join(split_tokens(answer_text("user: long", None, j))[:4])
        assert srv.expected(body)[1]["finish_reason"] == "length"
        assert srv.stats()["duplicate_answered"] == 1  # the same body answered twice, on purpose here


@pytest.mark.parametrize(
    "status,etype,code",
    [(400, "invalid_request_error", None), (401, "invalid_request_error", "invalid_api_key"),
     (403, "permission_error", "permission_denied"), (404, "not_found_error", "model_not_found")],
)
def test_status_always(status, etype, code):
    with FaultServer(faults={"status_always": {"status": status}}) as srv:
        for i in range(3):
            s, _, data = chat(srv, msg(f"x{i}"))
            err = json.loads(data)["error"]
            assert s == status and err["type"] == etype and err["code"] == code and err["message"]
        assert srv.stats()["by_status"] == {status: 3} and srv.stats()["answered"] == 0


def test_latency_and_max_concurrency():
    with FaultServer(faults={"latency": 0.4, "max_concurrency": 2}) as srv:
        results = []
        threads = [threading.Thread(target=lambda i=i: results.append(chat(srv, msg(f"c{i}"))[0])) for i in range(2)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        assert wait_for(lambda: srv.stats()["in_flight"] == 2)
        status, _, data = chat(srv, msg("third"))
        assert status == 429 and json.loads(data)["error"]["code"] == "rate_limit_exceeded"
        for t in threads:
            t.join(5)
        assert results == [200, 200] and time.monotonic() - t0 >= 0.4
        st = srv.stats()
        assert st["max_in_flight"] == 3 and st["in_flight"] == 0 and st["by_status"] == {200: 2, 429: 1}
        assert st["faults"] == {"max_concurrency": 1} and st["completion_tokens"] == 16


def test_latency_per_token():
    with FaultServer(faults={"latency_per_token": 0.05}) as srv:
        t0 = time.monotonic()
        chat_json(srv, msg("t", max_tokens=4))
        assert time.monotonic() - t0 >= 0.2


def test_duplicates_stats_reset_and_faults_over_http(srv):
    body = msg("dup")
    chat_json(srv, body)
    chat_json(srv, body)
    chat_json(srv, msg("other"))
    with urllib.request.urlopen(srv.url + "/stats", timeout=5) as r:
        st = json.load(r)
    assert st["answered"] == 3 and st["distinct_answered"] == 2 and st["duplicate_answered"] == 1
    assert st["by_status"] == {"200": 3} and st["received"] == 3 and st["max_in_flight"] == 1
    assert st["completion_tokens"] == 24
    status, _, _ = post(srv, "/reset", {})
    assert status == 200
    assert srv.stats()["answered"] == 0 and srv.stats()["received"] == 0
    status, _, data = post(srv, "/faults", {"status_storm": {"status": 500}})
    assert status == 200 and json.loads(data)["status_storm"]["status"] == 500
    assert chat(srv, body)[0] == 500  # attempt history was reset too: attempt 0 again
    assert chat(srv, body)[0] == 200
    status, _, data = post(srv, "/faults", {"no_such_fault": 1})
    assert status == 400
    # malformed bodies are counted as received, answered 400
    status, _, _ = post(srv, "/v1/chat/completions", None, raw=b"{not json")
    assert status == 400 and srv.stats()["received"] == 3


def test_keep_alive_connection_reuse(srv):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        for i in range(3):
            conn.request("POST", "/v1/chat/completions", body=json.dumps(msg(f"k{i}")), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200
            json.loads(resp.read())
    finally:
        conn.close()


def test_fault_validation():
    with pytest.raises(ValueError, match="unknown fault"):
        FaultServer(faults={"status_strom": {}})
    with pytest.raises(ValueError, match="unknown keys"):
        normalize_faults({"hang": {"secs": 1}})
    with pytest.raises(ValueError):
        normalize_faults({"status_storm": {"status": 200}})
    n = normalize_faults({"max_concurrency": 3, "length": True, "hang": None})
    assert n == {"max_concurrency": {"limit": 3, "retry_after": None}, "length": {"share": 1.0}}
    assert request_key("chat", {"a": 1, "b": 2}) == request_key("chat", {"b": 2, "a": 1}) != request_key("completions", {"a": 1, "b": 2})


def test_cli_process():
    faults = json.dumps({"status_storm": {"status": 503, "attempts": 1}})
    proc = subprocess.Popen(
        [sys.executable, str(SERVER_PY), "--port", "0", "--faults", faults],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "the CLI server printed nothing within 10 s"
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        port = int(base_url.rsplit(":", 1)[1].split("/")[0])
        with urllib.request.urlopen(base_url + "/models", timeout=5) as r:
            assert json.load(r)["data"][0]["id"] == DEFAULT_MODEL

        class _P:  # post() needs only .port
            pass

        p = _P()
        p.port = port
        assert post(p, "/v1/chat/completions", msg("cli"))[0] == 503
        assert post(p, "/v1/chat/completions", msg("cli"))[0] == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
            assert json.load(r)["by_status"] == {"200": 1, "503": 1}
    finally:
        proc.kill()
        proc.wait(5)
    assert proc.returncode == -9 if os.name == "posix" else proc.returncode != 0
