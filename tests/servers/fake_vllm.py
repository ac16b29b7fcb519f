"""A stand-in `vllm` module for tests: vLLM needs a CUDA GPU (or its own CPU environment), and kdlm's vLLM code
paths are checked against this on every machine; on a GPU machine the same code runs against the real engine."""

from __future__ import annotations

import sys
import types


class FakeSamplingParams:
    """Records the keyword arguments kdlm passes to vllm.SamplingParams."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


def install(monkeypatch, llm_class) -> types.SimpleNamespace:
    """Put a `vllm` module whose LLM is `llm_class` into sys.modules for the test's duration."""
    module = types.SimpleNamespace(LLM=llm_class, SamplingParams=FakeSamplingParams, __version__="fake")
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module
