"""One interface for every teacher that writes text: what a request is, what comes back, what can fail.

A backend answers `SampleRequest`s (a chat, sampling parameters, how many samples) with `Sample`s.
It raises `RequestFailed` for a request that finally failed (it goes to the dead-letter file) and
`FatalBackendError` for a problem that stops the run (a 401, an unknown model, a missing engine).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Optional

from kdlm.errors import KdlmError


class FatalBackendError(KdlmError):
    """The run cannot go on: bad credentials, an unknown model or URL, a 4xx that every request would get."""


class RequestFailed(Exception):
    """One request failed for good (retries spent, or a status that is not retried); recorded, never a row."""

    def __init__(self, status: Optional[int], message: str, attempts: int):
        super().__init__(message)
        self.status = status
        self.message = message
        self.attempts = attempts


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of the teacher (separate from any loss temperature)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    stop: tuple[str, ...] = ()
    logprobs: int = 0  # top-k log-probs per generated token; 0: none

    def as_dict(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "stop": list(self.stop), "logprobs": self.logprobs}


@dataclass
class SampleRequest:
    """`n` samples of the teacher's answer to one chat; sample j uses seed `seed + j`."""

    messages: list[dict]
    sampling: Sampling
    n: int = 1
    seed: int = 0


@dataclass
class Sample:
    """One answer. `logprobs` (when asked): {"tokens": [...], "logprobs": [...], "top": [[[token, logprob], ...], ...]},
    tokens as the server spelled them (vLLM's `token_id:N` form when return_tokens_as_token_ids is set)."""

    text: str
    finish_reason: str
    completion_tokens: int
    prompt_tokens: int
    latency_s: float
    attempts: int = 1
    logprobs: Optional[dict] = None
    server: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        out = {"text": self.text, "finish_reason": self.finish_reason, "completion_tokens": self.completion_tokens,
               "prompt_tokens": self.prompt_tokens, "latency_s": round(self.latency_s, 4), "attempts": self.attempts}
        if self.server:
            out["server"] = self.server
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        return out


@dataclass
class Capabilities:
    """What the start-up probe found: does the backend honour n > 1, return log-probs, and how many top ones."""

    n: bool
    logprobs: bool
    max_top_logprobs: int
    model_id: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "logprobs": self.logprobs, "max_top_logprobs": self.max_top_logprobs,
                "model_id": self.model_id, "notes": self.notes}


@dataclass
class Counters:
    """Live figures for the progress bar and the closing summary."""

    http_requests: int = 0  # attempts sent, retries included
    retried: int = 0
    answered_requests: int = 0
    samples: int = 0
    cached: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0


class Backend:
    """Base class. Subclasses set `name` and implement `start`, `sample` and optionally `close`."""

    name = "base"

    def __init__(self, counters: Counters):
        self.counters = counters
        self.fingerprint = ""
        self.capabilities: Optional[Capabilities] = None

    async def start(self) -> Capabilities:
        raise NotImplementedError

    async def sample(self, request: SampleRequest) -> list[Sample]:
        """Exactly `request.n` samples, in sample order, or RequestFailed."""
        raise NotImplementedError

    async def close(self) -> None:
        return None


class LocalBatcher:
    """Gathers the requests that coroutines submit one at a time into batches for a local engine.

    Each `submit` waits on a future; one worker takes everything pending, sorts it by prompt length
    (less padding), groups equal sampling parameters and runs `run_batch(requests) -> list[list[Sample]]`
    in a thread, so the event loop keeps feeding it while the model computes.
    """

    def __init__(self, run_batch, batch_size: int, length_of):
        self.run_batch = run_batch
        self.batch_size = batch_size
        self.length_of = length_of
        self.queue: list[tuple[SampleRequest, asyncio.Future]] = []
        self._wake: Optional[asyncio.Event] = None
        self._worker: Optional[asyncio.Task] = None

    async def submit(self, request: SampleRequest) -> list[Sample]:
        if self._worker is None:
            self._wake = asyncio.Event()
            self._worker = asyncio.create_task(self._work())
        future = asyncio.get_running_loop().create_future()
        self.queue.append((request, future))
        self._wake.set()
        return await future

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(0)  # let every coroutine that is ready submit first
            self._wake.clear()
            pending, self.queue = self.queue, []
            pending.sort(key=lambda item: self.length_of(item[0]))
            groups: dict[tuple, list] = {}
            for item in pending:
                groups.setdefault((item[0].sampling, item[0].n), []).append(item)
            for items in groups.values():
                for start in range(0, len(items), self.batch_size):
                    chunk = items[start:start + self.batch_size]
                    try:
                        results = await asyncio.to_thread(self.run_batch, [req for req, _ in chunk])
                    except Exception as err:  # a local engine error fails the batch's requests, not the loop
                        for _, fut in chunk:
                            if not fut.done():
                                fut.set_exception(err)
                        continue
                    for (_, fut), result in zip(chunk, results):
                        if not fut.done():
                            fut.set_result(result)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except (asyncio.CancelledError, Exception):
                pass
