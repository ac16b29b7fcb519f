"""Fixtures for generation tests: a scripted teacher whose text the test decides, recipes and prompt files.

`ScriptedBackend(Counters(), fn)` answers every request with `request.n` samples; sample j's text is
`fn(messages, request.seed + j)` (a string, or a (text, finish_reason) pair). It records each request, so
a test can count what was sent and read what the teacher was shown; `delay_s` makes requests overlap in time. Nothing here loads a model.

Fixture names: `scripted` (make a ScriptedBackend), `make_recipe` (a GenerateRecipe writing under tmp_path),
`run_generate` (generate() with a scripted teacher, no progress bar), `read_dataset` (rows + manifest).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

import pytest

from kdlm.generation.backends.base import Backend, Capabilities, Counters, Sample, SampleRequest

TEACHER = {"backend": "openai", "model": "scripted-teacher"}  # what provenance names (the recipe's teacher)
FINGERPRINT = "scripted-fp-1"

Answer = Union[str, tuple[str, str]]


class ScriptedBackend(Backend):
    """A teacher with scripted text: sample j of a request is `fn(messages, request.seed + j)`."""

    name = "scripted"

    def __init__(self, counters: Counters, fn: Callable[[list[dict], int], Answer], *,
                 fingerprint: str = FINGERPRINT, logprobs: bool = False, delay_s: float = 0.0):
        super().__init__(counters)
        self.fn = fn
        self.delay_s = delay_s  # > 0: each request awaits, as a network call does, so requests overlap
        self._fingerprint = fingerprint
        self._logprobs = logprobs
        self.started = False
        self.calls = 0
        self.requests: list[SampleRequest] = []

    async def start(self) -> Capabilities:
        self.started = True
        self.fingerprint = self._fingerprint
        self.capabilities = Capabilities(n=True, logprobs=self._logprobs, max_top_logprobs=20 if self._logprobs else 0,
                                         model_id="scripted-teacher")
        return self.capabilities

    async def sample(self, request: SampleRequest) -> list[Sample]:
        self.calls += 1
        self.requests.append(request)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        prompt_tokens = sum(len(m["content"].split()) for m in request.messages)
        out = []
        for j in range(request.n):
            answer = self.fn(request.messages, request.seed + j)
            text, finish = answer if isinstance(answer, tuple) else (answer, "stop")
            out.append(Sample(text=text, finish_reason=finish, completion_tokens=len(text.split()),
                              prompt_tokens=prompt_tokens, latency_s=0.001))
        self.counters.answered_requests += 1
        self.counters.prompt_tokens += prompt_tokens
        self.counters.completion_tokens += sum(s.completion_tokens for s in out)
        return out

    def seen(self) -> list[list[dict]]:
        """The chats the teacher was sent, one per request, in order."""
        return [r.messages for r in self.requests]


def last_user(messages: list[dict]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


@pytest.fixture
def scripted() -> Callable[..., ScriptedBackend]:
    """`scripted(fn, **options)`: a fresh ScriptedBackend with its own Counters."""
    return lambda fn, **kw: ScriptedBackend(Counters(), fn, **kw)


@pytest.fixture
def make_recipe(tmp_path) -> Callable[..., Any]:
    """`make_recipe(prompts, out="out", teacher=None, output=None, **generate)`: a validated GenerateRecipe."""
    from kdlm.config import from_dict
    from kdlm.config.generation import GenerateRecipe

    def make(prompts: Union[str, Path], out: Union[str, Path] = "out", *, teacher: Optional[dict] = None,
             output: Optional[dict] = None, **generate: Any):
        folder = Path(out) if Path(out).is_absolute() else tmp_path / out
        return from_dict(GenerateRecipe, {
            "teacher": {**TEACHER, **(teacher or {})},
            "generate": {"prompts": str(prompts), "concurrency": 4, **generate},
            "output": {"dir": str(folder), **(output or {})},
        })

    return make


@pytest.fixture
def run_generate() -> Callable[..., Any]:
    """`run_generate(recipe, backend, **kw)`: kdlm.generation.run.generate with the scripted teacher."""
    from kdlm.generation.run import generate

    return lambda recipe, backend, **kw: generate(recipe, backend=backend, show_progress=False, **kw)


@pytest.fixture
def read_dataset() -> Callable[[Path], tuple[list[dict], dict]]:
    """`read_dataset(folder) -> (rows as kdlm.data.read_rows reads them, manifest)`."""
    from kdlm.data import read_rows

    def read(folder: Path) -> tuple[list[dict], dict]:
        rows = read_rows(str(folder), "train").rows
        return rows, json.loads((Path(folder) / "manifest.json").read_text())

    return read
