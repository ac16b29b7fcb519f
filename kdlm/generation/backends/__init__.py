"""Teacher backends behind one interface (`Backend.start() -> Capabilities`, `Backend.sample(request) -> [Sample]`)."""

from __future__ import annotations

from kdlm.generation.backends.base import (
    Backend, Capabilities, Counters, FatalBackendError, RequestFailed, Sample, SampleRequest, Sampling,
)

BACKENDS = ("transformers", "vllm", "openai")


def make_backend(cfg, counters: Counters, *, concurrency: int, want_logprobs: int = 0, cache_dir=None,
                 model=None, tokenizer=None) -> Backend:
    """The backend `cfg.backend` names (`model`/`tokenizer`: an already loaded local model, for the API and tests)."""
    if cfg.backend == "openai":
        from kdlm.generation.backends.openai import OpenAIBackend

        return OpenAIBackend(cfg, counters, concurrency=concurrency, want_logprobs=want_logprobs, cache_dir=cache_dir)
    if cfg.backend == "vllm":
        from kdlm.generation.backends.local import VLLMBackend

        return VLLMBackend(cfg, counters, want_logprobs=want_logprobs)
    from kdlm.generation.backends.local import TransformersBackend

    return TransformersBackend(cfg, counters, model=model, tokenizer=tokenizer)


__all__ = ["BACKENDS", "Backend", "Capabilities", "Counters", "FatalBackendError", "RequestFailed", "Sample",
           "SampleRequest", "Sampling", "make_backend"]
