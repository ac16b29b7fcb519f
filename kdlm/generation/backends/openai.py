"""The `openai` backend: any OpenAI-compatible chat-completions server, with network code that assumes failure.

- async requests (httpx) under a concurrency limit, with optional requests/tokens-per-minute limiters;
- retries with exponential backoff and full jitter, wait = uniform(0, min(max, base * 2^attempt)), on 408, 409,
  429, 5xx, timeouts, dropped connections and truncated or malformed 200 bodies; a server's Retry-After wins;
- no retry on 400/401/403/404: the run stops with one line naming the base URL (400 optionally dead-lettered);
- a per-request timeout; n > 1 emulated with seeded n = 1 requests where the server ignores `n`;
- several base URLs: requests spread round-robin, and a retry moves to the next server;
- the API key is read from the environment variable the recipe names; it is sent in a header and never logged.

httpx instead of the `openai` SDK: the SDK retries inside one call and hides each attempt's status, which the
dead-letter file, the retried counter and the Retry-After handling here need.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import os
import random
import time
from typing import Any, Optional

from kdlm.errors import ConfigError
from kdlm.generation.backends.base import (
    Backend, Capabilities, Counters, FatalBackendError, RequestFailed, Sample, SampleRequest,
)

RETRY_STATUSES = {408, 409, 429}
FATAL_STATUSES = {401, 403, 404}
PROBE_MESSAGES = [{"role": "user", "content": "Reply with the word OK."}]


class RateLimiter:
    """Token bucket over a minute: `acquire(amount)` waits until `amount` units fit under `per_minute`."""

    def __init__(self, per_minute: Optional[float]):
        self.rate = per_minute / 60.0 if per_minute else None
        self.capacity = per_minute or 0.0
        self.level = self.capacity
        self.updated = time.monotonic()
        self.lock = asyncio.Lock()

    async def acquire(self, amount: float) -> None:
        if self.rate is None:
            return
        amount = min(amount, self.capacity)  # a request larger than a minute's budget waits for a full bucket
        async with self.lock:
            while True:
                now = time.monotonic()
                self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
                self.updated = now
                if self.level >= amount:
                    self.level -= amount
                    return
                await asyncio.sleep((amount - self.level) / self.rate)


def retry_after_seconds(value: Optional[str]) -> Optional[float]:
    """A Retry-After header as seconds: a number, or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_message(body: bytes, limit: int = 200) -> str:
    """The server's error message from an OpenAI-style error body, else the start of the body."""
    try:
        data = json.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message") if isinstance(err, dict) else None
        text = str(msg if msg else err)
    except ValueError:
        text = body.decode("utf-8", "replace")
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, cfg, counters: Counters, *, concurrency: int, want_logprobs: int = 0, cache_dir=None):
        super().__init__(counters)
        urls = cfg.base_url if isinstance(cfg.base_url, list) else [cfg.base_url] if cfg.base_url else []
        if not urls:
            raise ConfigError("teacher.base_url: the openai backend needs the server's base URL, e.g. http://127.0.0.1:8000/v1")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"teacher.base_url: {url!r} is not an http(s) URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.cfg = cfg
        self.model = cfg.model
        self.want_logprobs = want_logprobs
        self.cache_dir = cache_dir
        key = None
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ConfigError(f"teacher.api_key_env: the environment variable {cfg.api_key_env} is not set")
        self._headers = {"Content-Type": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self.concurrency = concurrency
        self._semaphore = asyncio.Semaphore(concurrency)
        self._next_url = itertools.cycle(range(len(self.urls)))
        self._rpm = RateLimiter(cfg.requests_per_minute)
        self._tpm = RateLimiter(cfg.tokens_per_minute)
        self._client = None
        self._rng = random.Random()
        self._failures_in_a_row = 0

    # ------------------------------------------------------------------ start-up

    async def start(self) -> Capabilities:
        import httpx

        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.cfg.timeout_s, connect=min(10.0, self.cfg.timeout_s)),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )
        model_ids = []
        for url in self.urls:
            model_ids.append(await self._check_models(url))
        self.fingerprint = self.cfg.fingerprint or model_ids[0]
        self.capabilities = await self._probe()
        return self.capabilities

    async def _check_models(self, url: str) -> str:
        """GET /models: the server answers, the key is accepted, the model is served. Returns the served id."""
        import httpx

        try:
            resp = await self._client.get(f"{url}/models", headers=self._headers)
        except httpx.HTTPError as err:
            raise FatalBackendError(f"{url}: the teacher server does not answer ({type(err).__name__}: {err})") from None
        if resp.status_code in FATAL_STATUSES or resp.status_code == 400:
            raise FatalBackendError(f"{url}: HTTP {resp.status_code} from GET /models: {error_message(resp.content)}")
        if resp.status_code != 200:
            return self.model  # some servers do not list models; the first request will tell
        try:
            served = [m.get("id") for m in resp.json().get("data", [])]
        except (ValueError, AttributeError):
            return self.model
        if served and self.model not in served:
            raise FatalBackendError(f"{url}: model {self.model!r} is not served there (served: {', '.join(map(str, served))}); "
                                    "set teacher.model to the served name")
        return self.model

    async def _probe(self) -> Capabilities:
        """One tiny request: does the server honour n = 2, return log-probs, and how many top log-probs?
        The answer is cached next to the request cache, so a restart does not send it again."""
        cache = self.cache_dir / "capabilities.json" if self.cache_dir else None
        ident = {"urls": self.urls, "model": self.model, "logprobs": self.want_logprobs}
        if cache is not None and cache.is_file():
            try:
                saved = json.loads(cache.read_text())
                if saved.get("ident") == ident:
                    return Capabilities(**saved["capabilities"])
            except (ValueError, TypeError, KeyError):
                pass
        body = {"model": self.model, "messages": PROBE_MESSAGES, "max_tokens": 1, "n": 2, "temperature": 1.0}
        if self.cfg.send_seed:
            body["seed"] = 0
        if self.want_logprobs:
            body.update(logprobs=True, top_logprobs=self.want_logprobs)
        try:
            data, _ = await self._post(body, url_index=0)
        except RequestFailed as err:
            raise FatalBackendError(f"{self.urls[0]}: the capability probe failed: {err.message}") from None
        choices = data.get("choices") or []
        notes = []
        n_ok = len(choices) >= 2
        if not n_ok:
            notes.append("the server ignores n > 1: samples are requested one at a time with seeds seed + i")
        top = 0
        has_lp = False
        if self.want_logprobs:
            content = ((choices[0].get("logprobs") or {}).get("content") or []) if choices else []
            has_lp = bool(content)
            top = len(content[0].get("top_logprobs") or []) if content else 0
            if not has_lp:
                notes.append("the server returns no log-probs")
        caps = Capabilities(n=n_ok, logprobs=has_lp, max_top_logprobs=top, model_id=str(data.get("model") or self.model),
                            notes=notes)
        if cache is not None:
            from kdlm.generation.store import atomic_write_text

            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache, json.dumps({"ident": ident, "capabilities": caps.as_dict()}) + "\n")
        return caps

    # ------------------------------------------------------------------ requests

    async def sample(self, request: SampleRequest) -> list[Sample]:
        if request.n == 1 or (self.capabilities and self.capabilities.n):
            return await self._request(request, request.n, request.seed)
        # the server ignores n: one seeded request per sample
        parts = await asyncio.gather(*(self._request(request, 1, request.seed + j) for j in range(request.n)),
                                     return_exceptions=True)
        for part in parts:
            if isinstance(part, BaseException):
                raise part
        return [s for part in parts for s in part]

    def _body(self, request: SampleRequest, n: int, seed: int) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {"model": self.model, "messages": request.messages, "max_tokens": s.max_new_tokens,
                                "temperature": s.temperature, "top_p": s.top_p, "n": n}
        if self.cfg.send_seed:
            body["seed"] = seed
        if s.top_k is not None:
            body["top_k"] = s.top_k  # vLLM / SGLang extension
        if s.stop:
            body["stop"] = list(s.stop)
        if s.logprobs:
            body.update(logprobs=True, top_logprobs=s.logprobs)
        body.update(self.cfg.extra_body or {})
        return body

    async def _request(self, request: SampleRequest, n: int, seed: int) -> list[Sample]:
        body = self._body(request, n, seed)
        estimate = sum(len(m.get("content", "")) for m in request.messages) / 4 + request.sampling.max_new_tokens * n
        await self._rpm.acquire(1)
        await self._tpm.acquire(estimate)
        started = time.perf_counter()
        try:
            data, (attempts, url) = await self._post(body, url_index=next(self._next_url))
        except RequestFailed as err:
            self._failures_in_a_row += 1
            if self._failures_in_a_row >= self.cfg.max_consecutive_failures:
                raise FatalBackendError(f"{', '.join(self.urls)}: {self._failures_in_a_row} requests in a row failed "
                                        f"(last: {err.message}); stopping (teacher.max_consecutive_failures)") from None
            raise
        self._failures_in_a_row = 0
        latency = time.perf_counter() - started
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        if len(choices) < n:
            raise RequestFailed(200, f"{url}: asked for {n} choices, got {len(choices)}", attempts)
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        total_completion = int(usage.get("completion_tokens") or 0)
        samples = []
        for c in choices[:n]:
            text = (c.get("message") or {}).get("content")
            if text is None:
                text = c.get("text")
            if not isinstance(text, str):
                raise RequestFailed(200, f"{url}: a choice without text content", attempts)
            samples.append(Sample(text=text, finish_reason=str(c.get("finish_reason") or "unknown"),
                                  completion_tokens=0, prompt_tokens=prompt_tokens, latency_s=latency,
                                  attempts=attempts, logprobs=_logprobs(c), server=url))
        # usage counts all choices together; split it by each choice's share of tokens (or evenly)
        counts = [len(s.logprobs["tokens"]) if s.logprobs else 0 for s in samples]
        for s, c in zip(samples, counts):
            s.completion_tokens = c if sum(counts) == total_completion and c else round(total_completion / n)
        self.counters.answered_requests += 1
        self.counters.prompt_tokens += prompt_tokens
        self.counters.completion_tokens += total_completion
        self.counters.cost += ((self.cfg.price_input_per_1m or 0.0) * prompt_tokens
                               + (self.cfg.price_output_per_1m or 0.0) * total_completion) / 1e6
        return samples

    async def _post(self, body: dict, *, url_index: int) -> tuple[dict, tuple[int, str]]:
        """POST /chat/completions with retries. Returns (parsed body, (attempts, url)), or raises
        RequestFailed (spent, or not retried) / FatalBackendError (the run must stop)."""
        import httpx

        last_status: Optional[int] = None
        last_message = ""
        for attempt in range(self.cfg.max_retries + 1):
            url = self.urls[(url_index + attempt) % len(self.urls)]
            wait: Optional[float] = None
            async with self._semaphore:
                self.counters.http_requests += 1
                try:
                    resp = await self._client.post(f"{url}/chat/completions", content=json.dumps(body), headers=self._headers)
                    status, content = resp.status_code, resp.content
                except httpx.TimeoutException:
                    status, content = None, b""
                    last_message = f"no answer within teacher.timeout_s = {self.cfg.timeout_s:g} s"
                except httpx.HTTPError as err:
                    status, content = None, b""
                    last_message = f"{type(err).__name__}: {err}".strip()
            if status == 200:
                try:
                    data = json.loads(content)
                    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
                        raise ValueError("no choices")
                    return data, (attempt + 1, url)
                except ValueError:
                    last_status, last_message = 200, "truncated or malformed JSON body"
            elif status is not None:
                last_status, last_message = status, error_message(content)
                if status in FATAL_STATUSES or (status == 400 and self.cfg.stop_on_400):
                    raise FatalBackendError(f"{url}: HTTP {status}: {last_message}")
                if not (status in RETRY_STATUSES or status >= 500):
                    raise RequestFailed(status, f"HTTP {status}: {last_message}", attempt + 1)
                wait = retry_after_seconds(resp.headers.get("retry-after"))
            else:
                last_status = None
            if attempt == self.cfg.max_retries:
                break
            self.counters.retried += 1
            if wait is None:  # full jitter (AWS architecture blog, "Exponential Backoff And Jitter")
                wait = self._rng.uniform(0, min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** attempt))
            await asyncio.sleep(min(wait, 600.0))
        what = f"HTTP {last_status}: {last_message}" if last_status else last_message
        raise RequestFailed(last_status, f"{what} (after {self.cfg.max_retries + 1} attempts)", self.cfg.max_retries + 1)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def _logprobs(choice: dict) -> Optional[dict]:
    """A chat choice's log-probs as {"tokens", "logprobs", "top"} (None when the server sent none)."""
    content = (choice.get("logprobs") or {}).get("content")
    if not content:
        return None
    return {"tokens": [e.get("token") for e in content],
            "logprobs": [e.get("logprob") for e in content],
            "top": [[[t.get("token"), t.get("logprob")] for t in (e.get("top_logprobs") or [])] for e in content]}
