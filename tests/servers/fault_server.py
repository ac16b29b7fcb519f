"""A fault-injecting OpenAI-compatible server for tests (standard library only).

It answers like vLLM / SGLang / llama.cpp / a hosted API, fast and deterministically, and on
demand misbehaves in the ways real servers rarely do when you want them to: rate-limit storms,
5xx bursts, hangs, truncated bodies, dropped connections, refused credentials, ignored ``n``.
It starts in milliseconds, binds ``127.0.0.1`` only, and needs nothing installed.

In-process use::

    from servers.fault_server import FaultServer     # pytest puts tests/ on sys.path
    # (inside tests/servers/ itself: from .fault_server import FaultServer)

    with FaultServer(faults={"status_storm": {"status": 429, "attempts": 3, "retry_after": 0.05}}) as srv:
        client = make_client(base_url=srv.base_url)   # "http://127.0.0.1:PORT/v1"
        ...
        s = srv.stats()
        assert s["duplicate_answered"] == 0 and s["by_status"][429] == 3 * s["distinct_answered"]

As a separate process (for kill -9 scenarios); it prints the base URL on its first line::

    python tests/servers/fault_server.py --port 0 --faults '{"latency": 0.05}' [--seed 0]
        [--model fault-teacher] [--api-key KEY] [--strict-model] [--verbose]

Constructor: ``FaultServer(faults=None, seed=0, model="fault-teacher", api_key=None, port=0,
strict_model=False, verbose=False)``. ``seed`` is the *server's* seed: it only chooses which
requests a ``share`` of a fault hits; answers do not depend on it. Methods: ``start()`` /
``close()`` (or use ``with``), ``base_url``, ``url`` (the root), ``port``, ``stats()``, ``reset()`` (counters and
attempt history), ``set_faults(dict)`` (replaces all faults, live), ``faults`` (normalised copy),
``selected(fault, body, endpoint="chat")`` (would a ``share`` of this fault hit this body?),
``expected(body, endpoint="chat")`` (the choices a full 200 answer would carry).

Endpoints
---------
``GET  /v1/models``            ``{"object": "list", "data": [{"id": MODEL, "object": "model", ...}]}``
``POST /v1/chat/completions``  OpenAI chat response (``endpoint="chat"``)
``POST /v1/completions``       OpenAI legacy completion response (``endpoint="completions"``);
                               ``prompt`` may be a string, a list of strings, a list of token ids or a
                               list of lists of token ids (batch: choice index = prompt_i * n + j)
``GET  /stats``                the counters as JSON (``by_status`` keys are strings there)
``POST /reset``                zero the counters and forget attempt history (faults are kept)
``GET  /faults``, ``POST /faults``  read / replace the faults (JSON body), e.g. for the CLI process
``/stats``, ``/reset`` and ``/faults`` need no API key and are not counted.

Requests: ``stream: true`` is refused (400; streaming is not implemented); ``stop``,
``temperature``, ``top_p`` etc. are accepted and ignored. Validation (400, OpenAI error body):
``n`` an int in 1..128, ``max_tokens`` / ``max_completion_tokens`` an int >= 1, chat
``top_logprobs`` an int in 0..20 and only with ``logprobs: true``, completions ``logprobs`` an
int in 0..20. The response's ``model`` is the served model name; with ``strict_model=True`` a
request for another model gets 404 ``model_not_found``.

Deterministic answers
---------------------
The prompt is rendered as ``"\\n".join(f"{role}: {text}" for each message)`` (chat; a content list
contributes its ``text`` parts concatenated; ``None`` content renders as ``""``), or the prompt
string itself (completions; token ids render as ``" ".join(map(str, ids))``). Then::

    h = sha256(json.dumps([rendered, request_seed, j]).encode()).hexdigest()
    d = int(h[8:12], 16) % 10
    answer = f"Answer {h[:8]}. The answer is {d}.\\n#### {d}"

where ``request_seed`` is the request body's ``seed`` (``None`` when absent -> ``null``) and
``j`` the choice index (within its prompt). ``answer_text(rendered, seed, j)`` computes it.
Tokens are words with their leading whitespace (``split_tokens``: ``re.findall(r"\\s*\\S+")``),
so the answer above is 8 tokens, and ``"".join(tokens) == text`` always. ``max_tokens`` cuts the
answer to that many tokens with ``finish_reason: "length"``; otherwise ``"stop"``. ``usage``:
``prompt_tokens`` = words of the rendered prompt(s), ``completion_tokens`` = tokens of all choices.

Logprobs (chat, ``logprobs: true``): ``choices[i].logprobs.content`` has one entry per token,
``{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}``, with
``top_logprobs`` of exactly the requested length, sorted by logprob descending, its first entry the
sampled token itself; probabilities are deterministic (hash of answer and position) and sum to
< 1 per position. Completions ``logprobs: k`` returns the legacy ``{"tokens", "token_logprobs",
"top_logprobs": [{token: logprob} * k], "text_offset"}``.

Faults (``faults`` dict; a value of ``None``/``False`` turns a fault off; unknown keys raise)
------------------------------------------------------------------------------------------
A request's *key* is ``sha256(endpoint + "\\n" + canonical JSON of the body)`` (``request_key``),
so a retry must resend the same body (headers such as request ids do not matter). Its *attempt*
is how many times that key was received before (0 for the first); it is counted for every
parseable, valid request, including ones that a fault answers. Attempt-windowed faults hit
attempts ``first_attempt <= attempt < first_attempt + attempts`` (``attempts: None`` = every
attempt from ``first_attempt`` on) of the requests picked by ``share``: a request is picked when
``int(sha256(f"{server_seed}|{fault}|{key}")[:8], 16) < share * 2**32`` -- a fixed, seeded
choice per distinct request (``srv.selected`` tells you). Defaults: ``attempts`` 1,
``first_attempt`` 0, ``share`` 1.0. Faults are checked in this order and the first that applies
answers the attempt (stack them with ``first_attempt``)::

    status_always    {"status": 401}            every request (also /v1/models) gets it, OpenAI error body
                                                 (400 invalid_request_error, 401 invalid_api_key,
                                                 403 permission_error, 404 model_not_found, ...)
    max_concurrency  4 | {"limit": 4, "retry_after": 0.01}
                                                 429 when more than `limit` completion requests are
                                                 in flight at once (this one included)
    status_storm     {"status": 429, "attempts": 3, "retry_after": 0.05, "share": 1.0, "first_attempt": 0}
                                                 that status (408, 409, 429, 500, 503...) with an
                                                 OpenAI error body and, when given, `Retry-After`
    drop_connection  {"attempts": 1, "share": 1.0, "first_attempt": 0}
                                                 close the socket without any response
    hang             {"seconds": 5, "attempts": 1, "share": 0.2, "first_attempt": 0}
                                                 wait `seconds` before answering normally; a client
                                                 that gives up (closes) meanwhile is noticed within
                                                 ~20 ms and never gets (nor is counted as) an answer.
                                                 Make `seconds` well above the client's timeout: a
                                                 close racing the end of the hang can still be answered
    truncate         {"attempts": 1, "share": 0.2, "first_attempt": 0}
                                                 a 200 whose JSON body is cut in half (Content-Length
                                                 is that of the cut body)
    length           {"share": 0.2} | True       permanent, not an error: every choice of a picked
                                                 request is cut to half its tokens (and max_tokens),
                                                 finish_reason "length"
    ignore_n         True                        1 choice whatever `n` asks (as some servers do)
    latency          0.05                        seconds added to every answer (generation time)
    latency_per_token 0.001                      plus this times the longest choice's tokens

Authentication (``api_key=...``) is checked before all faults: without ``Authorization: Bearer
<key>`` a request gets 401 ``{"error": {"message": "Invalid API key", "type":
"invalid_request_error", "code": "invalid_api_key"}}``.

Counters (``stats()``; completion endpoints only; thread-safe)
-------------------------------------------------------------
``received``            HTTP requests to the completion endpoints (every one, even malformed)
``by_status``           {status code (int): responses sent}; a truncated 200 counts as 200.
                        Counters are updated just before a response's bytes go out, so a client
                        that has read a response and then reads ``stats()`` sees it counted
``answered``            200 responses with a full body
``distinct_answered``   distinct request keys that got a full 200
``duplicate_answered``  full 200s for a key that already had one -- a client must never cause it
                        (so give every request a distinct prompt, or distinct ``seed``)
``in_flight``           completion requests being handled now; ``max_in_flight``: its maximum
``completion_tokens``   completion tokens in full answers (``prompt_tokens`` likewise)
``dropped``             connections closed by ``drop_connection``
``abandoned``           requests whose client went away during ``hang`` / ``latency``
``faults``              {fault name: times it answered an attempt}
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import re
import select
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "DEFAULT_MODEL",
    "FaultServer",
    "answer_text",
    "normalize_faults",
    "render_prompts",
    "request_key",
    "split_tokens",
]

DEFAULT_MODEL = "fault-teacher"
HOST = "127.0.0.1"
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
MAX_TOP_LOGPROBS = 20
MAX_N = 128
_POLL_S = 0.02  # how often a waiting handler checks whether its client is gone

_ERROR_KIND = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("not_found_error", "model_not_found"),
    408: ("timeout_error", "request_timeout"),
    409: ("conflict_error", "conflict"),
    422: ("invalid_request_error", None),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}
_DEFAULT_MESSAGE = {
    400: "Bad request",
    401: "Invalid API key",
    403: "Permission denied",
    404: "The model does not exist",
    408: "Request timed out",
    409: "Conflict",
    429: "Rate limit reached",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
    504: "Gateway timeout",
}


# ----------------------------------------------------------------------------- answers


def split_tokens(text: str) -> list[str]:
    """Word tokens with their leading whitespace; ``"".join(split_tokens(t)) == t`` for text without trailing space."""
    return re.findall(r"\s*\S+", text)


def answer_text(rendered: str, seed: Any = None, index: int = 0) -> str:
    """The full (uncut) answer for a rendered prompt, the request's ``seed`` and the choice index."""
    h = hashlib.sha256(json.dumps([rendered, seed, index]).encode("utf-8")).hexdigest()
    d = int(h[8:12], 16) % 10
    return f"Answer {h[:8]}. The answer is {d}.\n#### {d}"


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type", "text") == "text"
        )
    return str(content)


def render_prompts(body: dict, endpoint: str = "chat") -> list[str]:
    """The rendered prompt(s) the answer is a function of (chat: always one)."""
    if endpoint == "chat":
        return ["\n".join(f"{m.get('role')}: {_content_text(m.get('content'))}" for m in body["messages"])]
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
        return [" ".join(map(str, prompt))]
    return [p if isinstance(p, str) else " ".join(map(str, p)) for p in prompt]


def request_key(endpoint: str, body: dict) -> str:
    """The hash attempts and duplicates are tracked by: endpoint + canonical JSON of the body."""
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{endpoint}\n{canon}".encode("utf-8")).hexdigest()


def _picked(server_seed: Any, fault: str, key: str, share: float) -> bool:
    h = hashlib.sha256(f"{server_seed}|{fault}|{key}".encode("utf-8")).hexdigest()
    return int(h[:8], 16) < share * 2**32


def _position_probs(answer_hash: str, position: int, k: int) -> list[float]:
    """Probabilities of the sampled token (first) and k-1 alternatives, descending, summing to < 1."""
    hh = hashlib.sha256(f"{answer_hash}|{position}".encode()).digest()  # 32 bytes -> 16 uniform draws
    u = [int.from_bytes(hh[2 * i : 2 * i + 2], "big") / 65536 for i in range(16)]
    p0 = 0.5 + 0.5 * u[0]  # in [0.5, 1)
    rest = 1.0 - p0
    probs = [p0]
    for j in range(1, max(k, 1)):
        probs.append(rest * 2.0**-j * (0.5 + 0.5 * u[j % 16]))  # in [rest*2^-(j+1), rest*2^-j): descending
    return probs


def _token_logprobs(text_tokens: list[str], answer_hash: str, k: int) -> list[dict]:
    out = []
    for t, tok in enumerate(text_tokens):
        probs = _position_probs(answer_hash, t, k)
        lead = tok[: len(tok) - len(tok.lstrip())]
        alts = [tok] + [f"{lead}~alt{j}" for j in range(1, k)]
        top = [{"token": a, "logprob": math.log(p), "bytes": list(a.encode("utf-8"))} for a, p in zip(alts, probs)][:k]
        out.append({"token": tok, "logprob": math.log(probs[0]), "bytes": list(tok.encode("utf-8")), "top_logprobs": top})
    return out


# ----------------------------------------------------------------------------- faults

_WINDOWED = {"status_storm", "hang", "truncate", "drop_connection"}
_FAULT_FIELDS = {
    "status_storm": {"status", "attempts", "first_attempt", "retry_after", "share"},
    "hang": {"seconds", "attempts", "first_attempt", "share"},
    "truncate": {"attempts", "first_attempt", "share"},
    "drop_connection": {"attempts", "first_attempt", "share"},
    "length": {"share"},
    "status_always": {"status", "message"},
    "max_concurrency": {"limit", "retry_after"},
}
_SCALAR_FAULTS = {"ignore_n", "latency", "latency_per_token"}
FAULT_NAMES = tuple(_FAULT_FIELDS) + tuple(sorted(_SCALAR_FAULTS))


def _num(name: str, value: Any, lo: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lo:
        raise ValueError(f"fault {name} must be a number >= {lo}, got {value!r}")
    return float(value)


def normalize_faults(faults: dict | None) -> dict:
    """Validate a faults dict and fill in defaults (raises ValueError on unknown keys or bad values)."""
    out: dict[str, Any] = {}
    for name, spec in (faults or {}).items():
        if name not in _FAULT_FIELDS and name not in _SCALAR_FAULTS:
            raise ValueError(f"unknown fault {name!r}; known: {', '.join(FAULT_NAMES)}")
        if spec is None or spec is False:
            continue
        if name == "ignore_n":
            out[name] = bool(spec)
            continue
        if name in ("latency", "latency_per_token"):
            out[name] = _num(name, spec)
            continue
        if name == "max_concurrency" and not isinstance(spec, dict):
            spec = {"limit": spec}
        elif name == "status_always" and not isinstance(spec, dict):
            spec = {"status": spec}
        elif name == "length" and spec is True:
            spec = {}
        if not isinstance(spec, dict):
            raise ValueError(f"fault {name} must be a dict, got {spec!r}")
        unknown = set(spec) - _FAULT_FIELDS[name]
        if unknown:
            raise ValueError(f"fault {name}: unknown keys {sorted(unknown)}; known: {sorted(_FAULT_FIELDS[name])}")
        f: dict[str, Any] = {}
        if name in _WINDOWED or name == "length":
            f["share"] = _num(f"{name}.share", spec.get("share", 1.0))
            if f["share"] > 1.0:
                raise ValueError(f"fault {name}.share must be in [0, 1], got {f['share']}")
        if name in _WINDOWED:
            attempts = spec.get("attempts", 1)
            f["attempts"] = None if attempts is None else int(_num(f"{name}.attempts", attempts))
            f["first_attempt"] = int(_num(f"{name}.first_attempt", spec.get("first_attempt", 0)))
        if name in ("status_storm", "status_always"):
            status = spec.get("status", 429 if name == "status_storm" else 500)
            if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
                raise ValueError(f"fault {name}.status must be an HTTP error code 400..599, got {status!r}")
            f["status"] = status
        if name in ("status_storm", "max_concurrency"):
            ra = spec.get("retry_after")
            f["retry_after"] = None if ra is None else _num(f"{name}.retry_after", ra)
        if name == "status_always":
            f["message"] = spec.get("message")
        if name == "hang":
            f["seconds"] = _num("hang.seconds", spec.get("seconds", 5.0))
        if name == "max_concurrency":
            limit = spec.get("limit")
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"fault max_concurrency must be an int >= 1, got {limit!r}")
            f["limit"] = limit
        out[name] = f
    return out


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _error_body(status: int, message: str | None = None, code: str | None = None, param: str | None = None) -> dict:
    etype, ecode = _ERROR_KIND.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {
        "error": {
            "message": message or _DEFAULT_MESSAGE.get(status, f"HTTP {status}"),
            "type": etype,
            "param": param,
            "code": code if code is not None else ecode,
        }
    }


def _opt_int(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        bound = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
        raise _BadRequest(400, f"'{name}' must be {bound}, got {v!r}", param=name)
    return v


def _validate(body: Any, endpoint: str) -> dict:
    """Parsed options of a request, or _BadRequest."""
    if not isinstance(body, dict):
        raise _BadRequest(400, "request body must be a JSON object")
    if body.get("stream"):
        raise _BadRequest(400, "stream is not supported by FaultServer", param="stream")
    if endpoint == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise _BadRequest(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    else:
        p = body.get("prompt")
        ok = isinstance(p, str) or (
            isinstance(p, list)
            and p
            and (
                all(isinstance(x, int) and not isinstance(x, bool) for x in p)
                or all(isinstance(x, str) or (isinstance(x, list) and all(isinstance(y, int) for y in x)) for x in p)
            )
        )
        if not ok:
            raise _BadRequest(400, "'prompt' must be a string, a list of strings or token ids", param="prompt")
    opts: dict[str, Any] = {"n": _opt_int(body, "n", 1, MAX_N) or 1}
    mt = _opt_int(body, "max_tokens", 1)
    mct = _opt_int(body, "max_completion_tokens", 1) if endpoint == "chat" else None
    opts["max_tokens"] = mct if mct is not None else mt
    if endpoint == "chat":
        lp = body.get("logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise _BadRequest(400, "'logprobs' must be a boolean", param="logprobs")
        top = _opt_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top is not None and not lp:
            raise _BadRequest(400, "'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
        opts["logprobs"] = top if top is not None else (0 if lp else None)
    else:
        opts["logprobs"] = _opt_int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    return opts


# ----------------------------------------------------------------------------- server


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 drops SYNs under concurrent clients
    allow_reuse_address = True

    def handle_error(self, request, client_address):  # client resets are normal here
        if self.owner.verbose:
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as pooled async clients expect
    server_version = "FaultServer/1.0"
    timeout = 120  # idle keep-alive connections are closed after this

    @property
    def owner(self) -> "FaultServer":
        return self.server.owner  # type: ignore[attr-defined]

    def setup(self):
        super().setup()
        self.owner._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.owner._track(self.connection, False)

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if self.owner.verbose:
            sys.stderr.write("fault_server: %s - %s\n" % (self.address_string(), format % args))

    # -- plumbing

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send_raw(self, status: int, payload: bytes, headers: dict | None = None, count: bool = True, answer=None) -> bool:
        """Send one response. Counters are updated *before* the bytes go out (a client that reads the
        response and then asks /stats must see it counted) and rolled back if the write fails."""
        undo = None
        if count:
            undo = self.owner._count_response(status, answer)
        if getattr(self, "_inflight", False):  # done before the bytes go out: a client's next request never
            self.owner._leave()                # meets this one still counted in flight
            self._inflight = False
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        except OSError:  # the client is gone: nothing was delivered, nothing stays counted
            self.close_connection = True
            if undo is not None:
                self.owner._uncount_response(undo)
            return False
        return True

    def _send_json(self, status: int, obj: Any, headers: dict | None = None, count: bool = True) -> bool:
        return self._send_raw(status, json.dumps(obj).encode("utf-8"), headers, count)

    def _send_error(self, status, message=None, code=None, param=None, headers=None, count=True) -> bool:
        return self._send_json(status, _error_body(status, message, code, param), headers, count)

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _wait(self, seconds: float) -> bool:
        """Sleep `seconds`; False as soon as the client closes its side or the server stops."""
        deadline = time.monotonic() + seconds
        while True:
            if self._client_gone():
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            if self.owner._stopping.wait(min(_POLL_S, left)):
                return False

    def _authorized(self) -> bool:
        key = self.owner.api_key
        return key is None or self.headers.get("Authorization", "") == f"Bearer {key}"

    # -- routes

    def do_GET(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/stats":
            s = self.owner.stats()
            s["by_status"] = {str(k): v for k, v in s["by_status"].items()}
            self._send_json(200, s, count=False)
        elif path == "/faults":
            self._send_json(200, self.owner.faults, count=False)
        elif path == "/v1/models":
            self._read_body()
            if not self._authorized():
                return self._send_error(401, "Invalid API key", "invalid_api_key", count=False)
            always = self.owner._faults.get("status_always")
            if always:
                return self._send_error(always["status"], always["message"], count=False)
            m = self.owner.model
            card = {"id": m, "object": "model", "created": 0, "owned_by": "kdlm-tests"}
            self._send_json(200, {"object": "list", "data": [card]}, count=False)
        elif path in ENDPOINTS:
            self._read_body()
            self._send_error(405, f"Method GET not allowed on {path}", count=False)
        else:
            self._send_error(404, f"No route {path}", "not_found", count=False)

    def do_POST(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in ENDPOINTS:
            return self._completion(ENDPOINTS[path])
        raw = self._read_body()
        if path == "/reset":
            self.owner.reset()
            self._send_json(200, {"ok": True}, count=False)
        elif path == "/faults":
            try:
                self.owner.set_faults(json.loads(raw or b"{}"))
            except (ValueError, TypeError) as e:
                return self._send_error(400, str(e), count=False)
            self._send_json(200, self.owner.faults, count=False)
        else:
            self._send_error(404, f"No route {path}", "not_found", count=False)

    def _completion(self, endpoint: str):
        srv = self.owner
        srv._on_received()
        try:
            raw = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        in_flight = srv._enter()
        self._inflight = True
        try:
            self._complete(endpoint, raw, in_flight)
        finally:
            if self._inflight:  # no response was sent (a dropped connection, an abandoned hang)
                srv._leave()
                self._inflight = False

    def _complete(self, endpoint: str, raw: bytes, in_flight: int):
        srv = self.owner
        if not self._authorized():
            return self._send_error(401, "Invalid API key", "invalid_api_key")
        faults = srv._faults  # one consistent snapshot for this request
        always = faults.get("status_always")
        if always:
            srv._count_fault("status_always")
            return self._send_error(always["status"], always["message"])
        try:
            body = json.loads(raw)
            opts = _validate(body, endpoint)
        except ValueError:
            return self._send_error(400, "request body is not valid JSON")
        except _BadRequest as e:
            return self._send_error(e.status, e.message, e.code, e.param)
        if srv.strict_model and body.get("model") != srv.model:
            return self._send_error(404, f"The model `{body.get('model')}` does not exist", "model_not_found", "model")
        key = request_key(endpoint, body)
        attempt = srv._next_attempt(key)

        def hits(name: str) -> bool:
            f = faults.get(name)
            if not f or attempt < f["first_attempt"]:
                return False
            if f["attempts"] is not None and attempt >= f["first_attempt"] + f["attempts"]:
                return False
            return _picked(srv.seed, name, key, f["share"])

        mc = faults.get("max_concurrency")
        if mc and in_flight > mc["limit"]:
            srv._count_fault("max_concurrency")
            headers = {"Retry-After": format(mc["retry_after"], "g")} if mc["retry_after"] is not None else None
            return self._send_error(429, f"Too many concurrent requests (limit {mc['limit']})", headers=headers)
        if hits("status_storm"):
            f = faults["status_storm"]
            srv._count_fault("status_storm")
            headers = {"Retry-After": format(f["retry_after"], "g")} if f["retry_after"] is not None else None
            return self._send_error(f["status"], headers=headers)
        if hits("drop_connection"):
            srv._count_fault("drop_connection")
            srv._count("dropped")
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if hits("hang"):
            srv._count_fault("hang")
            if not self._wait(faults["hang"]["seconds"]):
                srv._count("abandoned")
                self.close_connection = True
                return

        choices = srv._choices(body, endpoint, opts, key, faults)
        resp = _response(body, endpoint, choices, srv.model, key, attempt, opts)
        delay = faults.get("latency", 0.0) + faults.get("latency_per_token", 0.0) * max(c["n_tokens"] for c in choices)
        if delay > 0 and not self._wait(delay):
            srv._count("abandoned")
            self.close_connection = True
            return
        payload = json.dumps(resp).encode("utf-8")
        if hits("truncate"):
            srv._count_fault("truncate")
            return self._send_raw(200, payload[: len(payload) // 2])
        self._send_raw(200, payload, answer=(key, resp["usage"]))


def _response(body: dict, endpoint: str, choices: list[dict], model: str, key: str, attempt: int, opts: dict) -> dict:
    out_choices = []
    for c in choices:
        lp = None
        if opts["logprobs"] is not None:
            entries = _token_logprobs(c["tokens"], c["hash"], opts["logprobs"])
            if endpoint == "chat":
                lp = {"content": entries}
            else:
                offsets, pos = [], 0
                for t in c["tokens"]:
                    offsets.append(pos)
                    pos += len(t)
                lp = {
                    "tokens": [e["token"] for e in entries],
                    "token_logprobs": [e["logprob"] for e in entries],
                    "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries],
                    "text_offset": offsets,
                }
        choice: dict[str, Any] = {"index": c["index"]}
        if endpoint == "chat":
            choice["message"] = {"role": "assistant", "content": c["text"]}
        else:
            choice["text"] = c["text"]
        choice["finish_reason"] = c["finish_reason"]
        choice["logprobs"] = lp
        out_choices.append(choice)
    prompt_tokens = sum(len(p.split()) for p in render_prompts(body, endpoint))
    completion_tokens = sum(c["n_tokens"] for c in choices)
    return {
        "id": f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{key[:24]}-{attempt}",
        "object": "chat.completion" if endpoint == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": out_choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class FaultServer:
    """An OpenAI-compatible test server on 127.0.0.1 with injectable faults (see the module docstring)."""

    def __init__(
        self,
        faults: dict | None = None,
        seed: Any = 0,
        model: str = DEFAULT_MODEL,
        api_key: str | None = None,
        port: int = 0,
        strict_model: bool = False,
        verbose: bool = False,
    ):
        self.seed = seed
        self.model = model
        self.api_key = api_key
        self.strict_model = strict_model
        self.verbose = verbose
        self._requested_port = port
        self._lock = threading.Lock()
        self._faults: dict = normalize_faults(faults)
        self._stopping = threading.Event()
        self._conns: set = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._reset_state()

    # -- lifecycle

    def start(self) -> "FaultServer":
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _HTTPServer((HOST, self._requested_port), _Handler)
        self._httpd.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-server", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        with self._lock:
            conns = list(self._conns)
        for c in conns:  # wake handlers blocked on idle keep-alive connections
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FaultServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("FaultServer is not running")
        return self._httpd.server_address[1]

    @property
    def host(self) -> str:
        return HOST

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    @property
    def url(self) -> str:
        """The server root (for /stats, /reset, /faults)."""
        return f"http://{HOST}:{self.port}"

    # -- control

    @property
    def faults(self) -> dict:
        """The active faults, normalised (defaults filled in)."""
        return copy.deepcopy(self._faults)

    def set_faults(self, faults: dict | None = None, **more: Any) -> None:
        """Replace all faults (``set_faults({})`` / ``set_faults()`` turns them all off); takes effect for new requests."""
        merged = dict(faults or {})
        merged.update(more)
        normalized = normalize_faults(merged)
        with self._lock:
            self._faults = normalized

    def reset(self) -> None:
        """Zero the counters and forget attempt history (faults are kept)."""
        with self._lock:
            self._reset_state(keep_in_flight=True)

    def stats(self) -> dict:
        with self._lock:
            return {
                "received": self._received,
                "by_status": dict(sorted(self._by_status.items())),
                "answered": self._answered,
                "distinct_answered": len(self._answered_keys),
                "duplicate_answered": self._duplicates,
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
                "completion_tokens": self._completion_tokens,
                "prompt_tokens": self._prompt_tokens,
                "dropped": self._extra["dropped"],
                "abandoned": self._extra["abandoned"],
                "faults": dict(self._fault_counts),
            }

    def selected(self, fault: str, body: dict, endpoint: str = "chat") -> bool:
        """Whether `fault`'s ``share`` picks this request body (ignores attempt windows)."""
        f = self._faults.get(fault)
        share = f.get("share", 1.0) if isinstance(f, dict) else 1.0
        return _picked(self.seed, fault, request_key(endpoint, body), share)

    def expected(self, body: dict, endpoint: str = "chat") -> list[dict]:
        """The choices a full 200 answer to `body` carries now: ``[{index, text, finish_reason, tokens, n_tokens}]``."""
        opts = _validate(body, endpoint)
        out = self._choices(body, endpoint, opts, request_key(endpoint, body), self._faults)
        return [{k: v for k, v in c.items() if k != "hash"} for c in out]

    # -- internals

    def _choices(self, body: dict, endpoint: str, opts: dict, key: str, faults: dict) -> list[dict]:
        n = 1 if faults.get("ignore_n") else opts["n"]
        cut_half = "length" in faults and _picked(self.seed, "length", key, faults["length"]["share"])
        seed = body.get("seed")
        out = []
        for p_i, rendered in enumerate(render_prompts(body, endpoint)):
            for j in range(n):
                h = hashlib.sha256(json.dumps([rendered, seed, j]).encode("utf-8")).hexdigest()
                tokens = split_tokens(answer_text(rendered, seed, j))
                limit = len(tokens)
                if cut_half:
                    limit = max(1, len(tokens) // 2)
                if opts["max_tokens"] is not None:
                    limit = min(limit, opts["max_tokens"])
                finish = "length" if limit < len(tokens) else "stop"
                tokens = tokens[:limit]
                out.append(
                    {
                        "index": p_i * n + j,
                        "text": "".join(tokens),
                        "finish_reason": finish,
                        "tokens": tokens,
                        "n_tokens": len(tokens),
                        "hash": h,
                    }
                )
        return out

    def _reset_state(self, keep_in_flight: bool = False) -> None:
        self._generation = getattr(self, "_generation", 0) + 1
        self._received = 0
        self._by_status: Counter = Counter()
        self._answered = 0
        self._answered_keys: set[str] = set()
        self._duplicates = 0
        self._attempts: Counter = Counter()
        if not keep_in_flight:
            self._in_flight = 0
        self._max_in_flight = self._in_flight
        self._completion_tokens = 0
        self._prompt_tokens = 0
        self._extra: Counter = Counter()
        self._fault_counts: Counter = Counter()

    def _track(self, conn, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def _on_received(self) -> None:
        with self._lock:
            self._received += 1

    def _enter(self) -> int:
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            return self._in_flight

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _next_attempt(self, key: str) -> int:
        with self._lock:
            a = self._attempts[key]
            self._attempts[key] = a + 1
            return a

    def _count_response(self, status: int, answer: tuple | None) -> tuple:
        """Count a response about to be sent (`answer`: (key, usage) for a full 200); returns an undo token."""
        with self._lock:
            self._by_status[status] += 1
            fresh = None
            if answer is not None:
                key, usage = answer
                fresh = key not in self._answered_keys
                self._answered += 1
                if fresh:
                    self._answered_keys.add(key)
                else:
                    self._duplicates += 1
                self._completion_tokens += usage["completion_tokens"]
                self._prompt_tokens += usage["prompt_tokens"]
            return (self._generation, status, answer, fresh)

    def _uncount_response(self, undo: tuple) -> None:
        generation, status, answer, fresh = undo
        with self._lock:
            if generation != self._generation:  # reset() in between: nothing to take back
                return
            self._by_status[status] -= 1
            if not self._by_status[status]:
                del self._by_status[status]
            if answer is not None:
                key, usage = answer
                self._answered -= 1
                if fresh:
                    self._answered_keys.discard(key)
                else:
                    self._duplicates -= 1
                self._completion_tokens -= usage["completion_tokens"]
                self._prompt_tokens -= usage["prompt_tokens"]

    def _count_fault(self, name: str) -> None:
        with self._lock:
            self._fault_counts[name] += 1

    def _count(self, name: str) -> None:
        with self._lock:
            self._extra[name] += 1


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fault-injecting OpenAI-compatible test server (binds 127.0.0.1 only).")
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    ap.add_argument("--faults", default="{}", help="faults as a JSON object (see the module docstring)")
    ap.add_argument("--seed", type=int, default=0, help="server seed: which requests a fault's share picks")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--strict-model", action="store_true", help="404 for requests naming another model")
    ap.add_argument("--verbose", action="store_true", help="log requests to stderr")
    args = ap.parse_args(argv)
    try:
        faults = json.loads(args.faults)
        srv = FaultServer(
            faults=faults,
            seed=args.seed,
            model=args.model,
            api_key=args.api_key,
            port=args.port,
            strict_model=args.strict_model,
            verbose=args.verbose,
        )
    except ValueError as e:
        print(f"fault_server: {e}", file=sys.stderr)
        return 2
    srv.start()
    print(srv.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        srv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
