"""Batch sources: where each optimizer step's rows come from.

A distillation method is a batch source, a teacher signal and an objective. The loop asks the source for
one optimizer step's micro-batches and trains on them; it never knows which method it runs.

    StaticSource      the dataset's rows (token-level KD, SFT, seq-KD on `kdlm generate` output)
    SampledSource     completions sampled during training for the step's prompts:
                        student   on-policy (GKD lambda = 1, MiniLLM, optionally teacher-mixed)
                        teacher   sequence-level KD (GKD's seq_kd)
                        mixed     student samples with probability lmbda, else data or teacher samples (GKD)
                        replay    DistiLLM's adaptive off-policy schedule: fresh student samples with probability
                                  p (raised when validation CE worsens), else a replay buffer of earlier ones
Under both, the prompts come from an example stream: the shuffled dataset (`LoaderStream`, resumable by
position), or DDK's domain-weighted draw (`DomainStream`).

Rules kept here:
- one generation call per optimizer step for all its micro-batches, then split back (the peers generate per
  micro-batch);
- the per-step choice (on- or off-policy, fresh or replay) is drawn once on the main process and broadcast,
  so every rank trains on the same kind of batch (TRL draws it per rank, PEERS.md #14);
- every random draw comes from a generator seeded by (seed, step[, rank]), so a resumed run draws exactly
  what the uninterrupted run drew, with no RNG state to save; the replay buffer is saved per rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
from torch.utils.data import DataLoader

from kdlm.data.dataset import Collator, Example
from kdlm.data.encode import IGNORE
from kdlm.errors import DataError
from kdlm.training.sampling import SampleSettings, sample_completions
from kdlm.training.schedules import DomainWeights, FreshSchedule, ReplayBuffer

# Which per-step kind each source can produce; "data" is the dataset's own rows.
STEP_KINDS = ("data", "student", "teacher", "replay")


@dataclass
class StepRows:
    """One optimizer step's rows: collated micro-batches on the device, what kind they are, and figures."""

    micro: list[dict]
    kind: str
    metrics: dict[str, float] = field(default_factory=dict)


class ExampleStream(Protocol):
    def next_batch(self, step: int, index: int) -> list[Example]:
        """Micro-batch `index` of optimizer step `step` (this process's share)."""


class LoaderStream:
    """The dataset, shuffled per epoch by accelerate's seedable sampler; `state` records (epoch,
    batches_in_epoch) so a resume restarts at the same batch."""

    def __init__(self, loader: DataLoader, state: dict):
        self.loader = loader
        self.state = state
        self._it: Optional[Iterator[list[Example]]] = None

    def next_batch(self, step: int, index: int) -> list[Example]:
        if self._it is None:
            self._it = self._batches()
        return next(self._it)

    def _batches(self) -> Iterator[list[Example]]:
        from accelerate import skip_first_batches

        state = self.state
        while True:
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(state["epoch"])
            it = skip_first_batches(self.loader, state["batches_in_epoch"]) if state["batches_in_epoch"] else self.loader
            for batch in it:
                state["batches_in_epoch"] += 1
                yield batch
            state["epoch"] += 1
            state["batches_in_epoch"] = 0


class DomainStream:
    """DDK's domain-weighted draw (Liu et al. 2024): each example's domain is drawn from the current weights,
    then an example uniformly from that domain (with replacement). Seeded by (seed, step, index, rank), so the
    draw depends only on the weights, which the trainer state keeps."""

    def __init__(self, examples: list[Example], *, batch_size: int, weights: DomainWeights, seed: int, rank: int):
        self.by_domain = {d: [ex for ex in examples if ex.domain == d] for d in weights.domains}
        empty = [d for d, rows in self.by_domain.items() if not rows]
        if empty:
            raise DataError(f"data.domain_field: no training rows of domain(s) {', '.join(empty)} on this process")
        self.batch_size, self.weights, self.seed, self.rank = batch_size, weights, seed, rank

    def next_batch(self, step: int, index: int) -> list[Example]:
        g = torch.Generator().manual_seed(_seed(self.seed, step, index, self.rank, 17))
        probs = torch.tensor(self.weights.weights, dtype=torch.float64)
        picks = torch.multinomial(probs, self.batch_size, replacement=True, generator=g).tolist()
        out = []
        for k in picks:
            rows = self.by_domain[self.weights.domains[k]]
            out.append(rows[int(torch.randint(len(rows), (1,), generator=g))])
        return out


class StaticSource:
    """The dataset's rows, as they are."""

    def __init__(self, stream: ExampleStream, *, collate: Collator, grad_accum: int, device: torch.device):
        self.stream, self.collate, self.grad_accum, self.device = stream, collate, grad_accum, device

    def next_step(self, step: int) -> StepRows:
        micro = [self.stream.next_batch(step, i) for i in range(self.grad_accum)]
        return StepRows([_to_device(self.collate(mb), self.device) for mb in micro], "data")

    def observe_validation(self, figures: dict) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def rank_state(self) -> Optional[dict]:
        return None

    def load_rank_state(self, state: Optional[dict]) -> None:
        pass


@dataclass
class SamplerModels:
    """What the sampled source samples with: the student (a getter, since the loop's module may be wrapped),
    the live teacher model (or None), and the shared vocabulary."""

    student: Callable[[], torch.nn.Module]
    teacher: Optional[torch.nn.Module]
    vocab: int
    stop_ids: tuple[int, ...]
    pad_id: int
    autocast: Optional[Callable[[], Any]] = None
    vllm: Optional[Any] = None  # a VllmSampler for the student's samples (sampling.engine: vllm), else kdlm's loop


class SampledSource:
    """Completions sampled during training for the step's prompts (see the module docstring for the kinds).

    `record_logprobs`: the objective needs the sampler's per-token log-probs (a pg term, or teacher-mixed
    sampling's importance weights), so the sampled rows carry them into the loss."""

    def __init__(self, cfg, sampling, *, stream: ExampleStream, collate: Collator, grad_accum: int,
                 models: SamplerModels, record_logprobs: bool, seed: int, accelerator):
        self.cfg, self.stream, self.collate, self.grad_accum = cfg, stream, collate, grad_accum
        self.models, self.record_logprobs, self.seed, self.accelerator = models, record_logprobs, seed, accelerator
        self.settings = SampleSettings(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                       max_new_tokens=sampling.max_new_tokens, teacher_mix=sampling.teacher_mix,
                                       batch_size=sampling.batch_size, bucket=sampling.bucket)
        self.fresh = FreshSchedule(start=cfg.fresh_start, step=cfg.fresh_step, tolerance=cfg.fresh_tolerance) \
            if cfg.kind == "replay" else None
        self.buffer = ReplayBuffer(capacity=cfg.replay_capacity) if cfg.kind == "replay" else None

    # ------------------------------------------------------------------ the step

    def next_step(self, step: int) -> StepRows:
        kind = self.choose(step)
        examples = [self.stream.next_batch(step, i) for i in range(self.grad_accum)]  # prompts, always drawn
        metrics: dict[str, float] = {f"source/{kind}_steps": 1.0}
        if kind == "data":
            rows = examples
        elif kind == "replay":
            g = torch.Generator().manual_seed(_seed(self.seed, step, self.accelerator.process_index, 29))
            rows = [self.buffer.sample(len(mb), g) for mb in examples]
        else:
            rows = self._sample(examples, step, kind, metrics)
            if self.buffer is not None:
                self.buffer.add([ex for mb in rows for ex in mb])
        if self.cfg.data_rows and kind != "data":  # the dataset's own rows ride along for rows: data terms
            rows = [mb + data for mb, data in zip(rows, examples)]
        return StepRows([_to_device(self.collate(mb), self.accelerator.device) for mb in rows], kind, metrics)

    def choose(self, step: int) -> str:
        """This step's kind, drawn on the main process from a (seed, step)-seeded generator and broadcast."""
        kind = self.cfg.kind
        if kind in ("student", "teacher"):
            return kind
        code = torch.zeros(1, dtype=torch.long, device=self.accelerator.device)
        if self.accelerator.is_main_process:
            u = float(torch.rand((), generator=torch.Generator().manual_seed(_seed(self.seed, step, 0, 0, 7))))
            if kind == "mixed":
                chosen = "student" if u < self.cfg.lmbda else ("teacher" if self.cfg.off_policy == "teacher" else "data")
            else:  # replay
                enough = len(self.buffer) >= 1
                chosen = "student" if u < self.fresh.p else ("replay" if enough else "data")
            code[0] = STEP_KINDS.index(chosen)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            code = broadcast(code, from_process=0)
        return STEP_KINDS[int(code.item())]

    def _sample(self, examples: list[list[Example]], step: int, kind: str, metrics: dict) -> list[list[Example]]:
        """One sampling call for all the step's micro-batches, split back into them."""
        flat = [ex for mb in examples for ex in mb]
        m = self.models
        student = m.student() if kind == "student" else None
        teacher = m.teacher if (kind == "teacher" or self.record_logprobs or self.settings.teacher_mix > 0) else None
        settings = self.settings if kind == "student" else _without_mix(self.settings)
        prompts = [ex.input_ids[: ex.prompt_length] for ex in flat]
        seed = _seed(self.seed, step, self.accelerator.process_index, 3)
        if kind == "student" and m.vllm is not None:  # `step` optimizer steps done: the engine syncs if behind
            out = m.vllm.sample(student, step, prompts=prompts, settings=settings, stop_ids=m.stop_ids,
                                seed=seed % (1 << 31))
        else:
            # on the accelerator's device, where the sampler draws (no [B, V] copy to the host per token)
            g = torch.Generator(device=self.accelerator.device).manual_seed(seed)
            out = sample_completions(
                prompts=prompts, settings=settings, stop_ids=m.stop_ids, pad_id=m.pad_id, generator=g,
                vocab=m.vocab, student=student, teacher=teacher, sample_from=kind,
                record_logprobs=self.record_logprobs and student is not None, autocast=m.autocast)
        sampled = [_with_completion(ex, out, i, step) for i, ex in enumerate(flat)]
        n = len(flat)
        metrics.update({"gen/seconds": out.seconds, "gen/new_tokens": float(out.new_tokens),
                        "gen/completions": float(n), "gen/truncated": float(sum(out.truncated))})
        split, start = [], 0
        for mb in examples:
            split.append(sampled[start: start + len(mb)])
            start += len(mb)
        return split

    # ------------------------------------------------------------------ schedules and state

    def observe_validation(self, figures: dict) -> dict:
        """DistiLLM: raise the fresh-sample probability when validation CE worsened by more than the tolerance."""
        if self.fresh is None or "ce" not in figures:
            return {}
        return {"source/fresh_p": self.fresh.observe(float(figures["ce"]))}

    def state_dict(self) -> dict:
        return {"fresh": self.fresh.state_dict()} if self.fresh is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.fresh is not None and state.get("fresh") is not None:
            self.fresh.load_state_dict(state["fresh"])

    def rank_state(self) -> Optional[dict]:
        """Per process: its replay buffer (each rank replays its own samples)."""
        return {"buffer": self.buffer.state_dict()} if self.buffer is not None else None

    def load_rank_state(self, state: Optional[dict]) -> None:
        if self.buffer is not None and state is not None:
            self.buffer.load_state_dict(state["buffer"])


def check_prompts(examples: list[Example], *, max_new_tokens: int, max_length: int) -> None:
    """Every prompt plus max_new_tokens must fit in data.max_length: one error naming the first that does not."""
    for ex in examples:
        if ex.prompt_length == 0:
            raise DataError(f"{ex.sample_id}: no prompt before the counted tokens; sampled sources continue prompts")
        if ex.prompt_length + max_new_tokens > max_length:
            raise DataError(f"{ex.sample_id}: prompt of {ex.prompt_length} tokens + sampling.max_new_tokens "
                            f"{max_new_tokens} exceeds data.max_length {max_length}; shorten the prompt, lower "
                            f"max_new_tokens or raise max_length")


def stop_ids_of(tokenizer, *models: Optional[torch.nn.Module]) -> tuple[int, ...]:
    """End-of-turn tokens that end a sampled completion: the tokenizer's eos, the models' generation-config
    eos ids, and the chat end-of-turn markers the vocabulary has."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for model in models:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    vocab = tokenizer.get_vocab()
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "<|end|>"):
        if marker in vocab:
            ids.add(int(vocab[marker]))
    return tuple(sorted(ids))


def _with_completion(ex: Example, out, i: int, step: int) -> Example:
    """The example's prompt continued by sampled completion `i`; only the completion is counted."""
    p = ex.prompt_length
    completion = out.tokens[i]
    logprobs = None
    recorded = {"behavior": out.behavior_logprobs, "student": out.student_logprobs, "teacher": out.teacher_logprobs}
    if any(v is not None for v in recorded.values()):
        logprobs = {k: [0.0] * p + list(v[i]) for k, v in recorded.items() if v is not None}
    return Example(f"{ex.sample_id}#step{step}", ex.input_ids[:p] + completion, [IGNORE] * p + completion,
                   weight=ex.weight, domain=ex.domain, sampled=True, sample_logprobs=logprobs)


def _without_mix(settings: SampleSettings) -> SampleSettings:
    from dataclasses import replace

    return replace(settings, teacher_mix=0.0)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (deterministic across processes and runs, unlike hash())."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 6364136223846793005 + int(part) + 1442695040888963407) % (1 << 63)
    return value
