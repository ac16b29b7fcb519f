"""Local teachers: `transformers` (any HF causal LM, batched by length) and `vllm` (vLLM's offline engine).

Both receive requests one at a time from the pipelines' coroutines and answer them in batches
(`LocalBatcher`). Neither sends anything over a network, so nothing here is retried: an engine
error fails the batch's requests into the dead-letter file.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from kdlm.errors import ConfigError
from kdlm.generation.backends.base import Backend, Capabilities, Counters, FatalBackendError, LocalBatcher, Sample, SampleRequest


def generation_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs with bf16 and on CPUs with native bf16 (AVX512-BF16/AMX; ~2.4x faster generation there),
    else fp32. Teacher text is data, so bf16's rounding of the sampling distribution is harmless."""
    from kdlm.models.generate import cpu_has_fast_bf16

    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


class TransformersBackend(Backend):
    """A local Hugging Face model. n samples per prompt via num_return_sequences; greedy when temperature is 0."""

    name = "transformers"

    def __init__(self, cfg, counters: Counters, *, model=None, tokenizer=None):
        super().__init__(counters)
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.batcher: Optional[LocalBatcher] = None

    async def start(self) -> Capabilities:
        from kdlm.models import bundled
        from kdlm.models.loading import load_model, load_tokenizer, resolve_device, resolve_source

        source = resolve_source(self.cfg.model, self.cfg.gguf_file, self.cfg.revision)
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(source, trust_remote_code=self.cfg.trust_remote_code)
        if self.model is None:
            device = resolve_device(self.cfg.device)
            self.model = load_model(source, dtype=generation_dtype(self.cfg.dtype, device), device=device,
                                    trust_remote_code=self.cfg.trust_remote_code, frozen=True)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"teacher.model: {self.cfg.model} has no chat template; kdlm generate sends chats")
        self.fingerprint = self.cfg.fingerprint or _local_fingerprint(self.cfg, source)
        dtype = next(self.model.parameters()).dtype
        self.batcher = LocalBatcher(self._run_batch, self.cfg.batch_size, self._length)
        self.capabilities = Capabilities(n=True, logprobs=False, max_top_logprobs=0, model_id=self.cfg.model,
                                         notes=[f"local {str(dtype).removeprefix('torch.')} on {self.model.device}"])
        return self.capabilities

    def _length(self, request: SampleRequest) -> int:
        return sum(len(m["content"]) for m in request.messages)

    async def sample(self, request: SampleRequest) -> list[Sample]:
        return await self.batcher.submit(request)

    @torch.no_grad()
    def _run_batch(self, requests: list[SampleRequest]) -> list[list[Sample]]:
        tok = self.tokenizer
        s, n = requests[0].sampling, requests[0].n  # the batcher groups equal sampling and n
        side = tok.padding_side
        tok.padding_side = "left"  # decoder-only generation continues from the right edge
        try:
            enc = tok.apply_chat_template([r.messages for r in requests], add_generation_prompt=True, padding=True,
                                          return_dict=True, return_tensors="pt").to(self.model.device)
        finally:
            tok.padding_side = side
        greedy = s.temperature == 0
        # one seed per batch on the global RNG: a sampled text depends on its batch (greedy ones do not), so a
        # partial re-run may sample other text; the request cache keeps what was sampled first
        torch.manual_seed(requests[0].seed)
        stops = {"stop_strings": list(s.stop), "tokenizer": tok} if s.stop else {}  # stop there, not at max_new_tokens
        started = time.perf_counter()
        out = self.model.generate(**enc, max_new_tokens=s.max_new_tokens, do_sample=not greedy,
                                  temperature=None if greedy else s.temperature, top_p=None if greedy else s.top_p,
                                  top_k=s.top_k if not greedy else None, num_return_sequences=n,
                                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                                  **stops)
        latency = (time.perf_counter() - started) / len(requests)
        new = out[:, enc["input_ids"].shape[1]:]  # [B*n, new tokens]
        stop_ids = set(_stop_ids(self.model, tok))
        prompt_lengths = enc["attention_mask"].sum(1).tolist()
        results = []
        for i, req in enumerate(requests):
            samples = []
            for j in range(n):
                row = new[i * n + j].tolist()
                end = next((k for k, t in enumerate(row) if t in stop_ids), None)
                finish = "stop" if end is not None else "length"
                tokens = row[:end] if end is not None else row
                text = tok.decode(tokens, skip_special_tokens=True)
                text, cut = _apply_stop_strings(text, s.stop)
                samples.append(Sample(text=text.strip(), finish_reason="stop" if cut else finish,
                                      completion_tokens=len(tokens) + (end is not None),
                                      prompt_tokens=int(prompt_lengths[i]), latency_s=latency))
            results.append(samples)
            self.counters.answered_requests += 1
            self.counters.prompt_tokens += int(prompt_lengths[i])
            self.counters.completion_tokens += sum(x.completion_tokens for x in samples)
        return results

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()


class VLLMBackend(Backend):
    """vLLM's offline engine in this process: LLM.chat with one SamplingParams(n, seed, logprobs) per request.
    Tensor parallelism (teacher.tensor_parallel_size) and data parallelism (teacher.data_parallel_size) are vLLM's."""

    name = "vllm"

    def __init__(self, cfg, counters: Counters, *, want_logprobs: int = 0):
        super().__init__(counters)
        self.cfg = cfg
        self.want_logprobs = want_logprobs
        self.llm = None
        self.batcher: Optional[LocalBatcher] = None

    async def start(self) -> Capabilities:
        try:
            import vllm
        except ImportError:
            raise FatalBackendError("teacher.backend: vllm is not installed in this environment; install vllm, or "
                                    "serve the model with `vllm serve` and use teacher.backend: openai") from None
        from kdlm.models.loading import resolve_source

        source = resolve_source(self.cfg.model, self.cfg.gguf_file, self.cfg.revision)
        kwargs = dict(model=source.path, tokenizer=source.path, dtype="auto" if self.cfg.dtype == "auto" else self.cfg.dtype,
                      tensor_parallel_size=self.cfg.tensor_parallel_size, gpu_memory_utilization=self.cfg.gpu_memory_utilization,
                      trust_remote_code=self.cfg.trust_remote_code, max_logprobs=max(20, self.want_logprobs))
        if self.cfg.data_parallel_size > 1:
            kwargs["data_parallel_size"] = self.cfg.data_parallel_size
        if self.cfg.max_model_len:
            kwargs["max_model_len"] = self.cfg.max_model_len
        if self.cfg.revision:
            kwargs["revision"] = self.cfg.revision
        self.llm = vllm.LLM(**kwargs)
        self._vllm = vllm
        self.fingerprint = self.cfg.fingerprint or _local_fingerprint(self.cfg, source)
        self.batcher = LocalBatcher(self._run_batch, 1 << 16, lambda r: 0)  # vLLM schedules its own batches
        self.capabilities = Capabilities(n=True, logprobs=True, max_top_logprobs=20, model_id=self.cfg.model,
                                         notes=[f"vLLM {getattr(vllm, '__version__', '?')}"])
        return self.capabilities

    async def sample(self, request: SampleRequest) -> list[Sample]:
        return await self.batcher.submit(request)

    def _run_batch(self, requests: list[SampleRequest]) -> list[list[Sample]]:
        params = []
        for r in requests:
            s = r.sampling
            params.append(self._vllm.SamplingParams(
                n=r.n, seed=r.seed, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k else -1,
                max_tokens=s.max_new_tokens, stop=list(s.stop) or None, logprobs=s.logprobs or None))
        started = time.perf_counter()
        outputs = self.llm.chat([r.messages for r in requests], params, use_tqdm=False)
        latency = (time.perf_counter() - started) / max(1, len(requests))
        results = []
        for r, out in zip(requests, outputs):
            prompt_tokens = len(out.prompt_token_ids or [])
            samples = []
            for c in out.outputs:
                lp = None
                if r.sampling.logprobs and c.logprobs:
                    lp = {"tokens": [f"token_id:{t}" for t in c.token_ids],
                          "logprobs": [step[t].logprob for t, step in zip(c.token_ids, c.logprobs)],
                          "top": [[[f"token_id:{tid}", x.logprob] for tid, x in sorted(step.items(), key=lambda kv: kv[1].rank)
                                   ][: r.sampling.logprobs] for step in c.logprobs]}
                samples.append(Sample(text=c.text, finish_reason=str(c.finish_reason or "unknown"),
                                      completion_tokens=len(c.token_ids), prompt_tokens=prompt_tokens,
                                      latency_s=latency, logprobs=lp))
            results.append(samples)
            self.counters.answered_requests += 1
            self.counters.prompt_tokens += prompt_tokens
            self.counters.completion_tokens += sum(x.completion_tokens for x in samples)
        return results

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()


def _local_fingerprint(cfg, source) -> str:
    """sha256 of the weight files when they are on disk (reusing kdlm's teacher-cache hashing), else the name."""
    from kdlm.cache import format as fmt

    files = fmt.weight_files(cfg, resolved_path=source.path)
    return f"sha256:{fmt.weights_sha(files)[:16]}" if files else f"name:{cfg.model}"


def _stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a turn: the generation config's eos ids and the tokenizer's eos."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return [i for i in ids if i is not None]


def _apply_stop_strings(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
