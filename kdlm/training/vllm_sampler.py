"""Student samples from a colocated vLLM engine (`sampling.engine: vllm`, GPU only).

On a GPU, vLLM's paged attention and continuous batching sample far faster than a Python decode loop.
The engine lives in the training process, next to the student, and shares the GPU:

    start        the student is saved once to <output.dir>/vllm-student (a plain HF folder) and vLLM loads it with
                 enable_sleep_mode, using sampling.vllm_gpu_memory_utilization of the GPU; then it sleeps
    each sample  wake_up -> if the student changed since the last sync (an optimizer step ran), push its
                 weights in place with the model's `load_weights` (no file written, no engine restart) ->
                 generate for all the step's prompts in one call -> sleep (level 1: weights offloaded, KV
                 cache freed, so training gets the memory back)

Only plain student samples: teacher-mixed sampling and the pg term need the teacher's and student's
distributions at every decode step, which vLLM does not expose; use the default `engine: kdlm` for them
(checked when the recipe loads). Randomness: one vLLM seed per step from (seed, step, rank), so a resumed
run asks for the same samples (vLLM's kernels are not bit-reproducible across GPUs, so the samples may
still differ slightly).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Collection, Optional

from torch import nn

from kdlm.errors import ModelError
from kdlm.training.sampling import Completions, SampleSettings


class VllmSampler:
    """A colocated vLLM engine that samples the student's completions (see the module docstring)."""

    def __init__(self, student: nn.Module, tokenizer, *, folder: Path, gpu_memory_utilization: float,
                 sleep: bool, max_model_len: int, seed: int):
        try:
            import vllm
        except ImportError:
            raise ModelError("sampling.engine: vllm needs vLLM installed in this environment (pip install vllm, on "
                             "a CUDA machine); or use sampling.engine: kdlm") from None
        self._vllm = vllm
        # the engine must run in this process for the in-place weight sync (vLLM V1 defaults to a worker process)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        folder.mkdir(parents=True, exist_ok=True)
        student.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        self.sleep_enabled = sleep
        self.llm = vllm.LLM(model=str(folder), tokenizer=str(folder), dtype="bfloat16", seed=seed,
                            gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep,
                            max_model_len=max_model_len)
        self.synced_version: Optional[int] = 0  # the saved folder is the student at version 0
        self._sleep()

    def sample(self, student: nn.Module, version: int, *, prompts: list[list[int]], settings: SampleSettings,
               stop_ids: Collection[int], seed: int) -> Completions:
        """One completion per prompt from the student as of `version` (its optimizer-step count)."""
        start = time.perf_counter()
        if self.sleep_enabled:
            self.llm.wake_up()
        if self.synced_version != version:
            self._push_weights(student)
            self.synced_version = version
        params = self._vllm.SamplingParams(
            n=1, temperature=settings.temperature, top_p=settings.top_p,
            top_k=settings.top_k if settings.top_k else -1, max_tokens=settings.max_new_tokens,
            stop_token_ids=sorted(int(s) for s in stop_ids), seed=seed)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        self._sleep()
        tokens, truncated = [], []
        stops = {int(s) for s in stop_ids}
        for out in outputs:
            ids = list(out.outputs[0].token_ids)[: settings.max_new_tokens]
            cut = next((i + 1 for i, t in enumerate(ids) if t in stops), None)
            tokens.append(ids[:cut] if cut is not None else ids)
            truncated.append(cut is None and len(ids) >= settings.max_new_tokens)
        return Completions(tokens=tokens, truncated=truncated, behavior_logprobs=None, student_logprobs=None,
                           teacher_logprobs=None, seconds=time.perf_counter() - start,
                           new_tokens=sum(len(t) for t in tokens))

    def _push_weights(self, student: nn.Module) -> None:
        """The student's current weights into the engine's model, in place (`load_weights`, as vLLM's RLHF
        examples and TRL's colocate mode do); the engine's model object moved between vLLM versions."""
        weights = [(name, p.detach()) for name, p in student.state_dict().items()]
        model = _engine_model(self.llm)
        model.load_weights(weights)
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None:  # cached prefixes hold the old weights' keys and values
            reset()

    def _sleep(self) -> None:
        if self.sleep_enabled:
            self.llm.sleep(level=1)


def _engine_model(llm):
    """The engine's nn.Module in this process (single-GPU colocated engine)."""
    paths = ("llm_engine.model_executor.driver_worker.worker.model_runner.model",
             "llm_engine.model_executor.driver_worker.model_runner.model")
    for path in paths:
        node = llm
        try:
            for part in path.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        if hasattr(node, "load_weights"):
            return node
    raise ModelError("sampling.engine: vllm: cannot reach the engine's model to sync weights in this vLLM version "
                     "(tried " + ", ".join(paths) + "); use sampling.engine: kdlm")
