"""Batched completion sampling with a KV cache, for on-policy distillation (GKD, MiniLLM, sequence-level KD).

The training loop calls :func:`sample_completions` once per optimizer step for all of the step's prompts.
Prompts are split into decode batches, each batch is LEFT-padded, prefilled once, then decoded one token
per step with the models' KV cache. Everything random goes through the caller's ``torch.Generator``.

Distributions (per step, per row; logits cut to ``[..., :vocab]``, all in float32):

* untempered:   ``q = softmax(z_student)``, ``p = softmax(z_teacher)`` -> ``student_logprobs``/``teacher_logprobs``
* filtered:     ``f(z) = softmax(top_p(top_k(z / T)))`` -- temperature, then top-k, then top-p (HF order), the
  removed tokens get probability 0 and the rest is renormalised.
* sampled from: ``sample_from="teacher"``: ``p~ = f(z_teacher)`` (sequence-level KD);
  ``sample_from="student"``: ``p~ = alpha * f(z_teacher) + (1 - alpha) * f(z_student)`` with
  ``alpha = settings.teacher_mix`` (MiniLLM's mixed sampling; ``alpha = 0`` is plain on-policy ``f(z_student)``).
  The filters are applied to EACH model's distribution before mixing in probability space, so a token is
  reachable when either model's filtered distribution keeps it, and ``log p~`` stays exact for importance
  weights (filtering the mixture instead would couple the two supports through one nucleus).
* ``behavior_logprobs`` = ``log p~(y_t)``, computed as ``logaddexp(log alpha + log f_t(y), log(1-alpha) + log f_s(y))``.

Greedy decoding is not a special mode: ``temperature`` must be > 0; use ``top_k=1`` for argmax decoding.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass
from typing import Callable, Collection, ContextManager, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SampleSettings", "Completions", "sample_completions"]


@dataclass(frozen=True)
class SampleSettings:
    temperature: float = 1.0  # sampling temperature (NOT the loss temperature); must be > 0
    top_p: float = 1.0  # nucleus; 1.0 = off
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 128
    teacher_mix: float = 0.0  # MiniLLM's alpha: draw from alpha*p_teacher + (1-alpha)*q_student
    batch_size: Optional[int] = None  # prompts per decode batch; None = all at once
    bucket: bool = True  # sort prompts by length before splitting into decode batches; output keeps input order


@dataclass
class Completions:
    tokens: list[list[int]]  # per prompt, sampled tokens, cut right AFTER the first stop token (kept)
    truncated: list[bool]  # True when max_new_tokens was reached without a stop token
    behavior_logprobs: Optional[list[list[float]]]  # log p~(y_t) under the distribution actually sampled from
    student_logprobs: Optional[list[list[float]]]  # log q(y_t), untempered student
    teacher_logprobs: Optional[list[list[float]]]  # log p(y_t), untempered teacher
    seconds: float  # wall time of the call
    new_tokens: int  # sum of len(tokens[i])


def _validate(settings: SampleSettings, prompts, vocab, pad_id, student, teacher, sample_from) -> None:
    s = settings
    if not (isinstance(s.temperature, (int, float)) and s.temperature > 0 and math.isfinite(s.temperature)):
        raise ValueError(f"temperature must be a finite number > 0 (use top_k=1 for greedy), got {s.temperature!r}")
    if not 0.0 < s.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {s.top_p!r}")
    if not isinstance(s.top_k, int) or s.top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {s.top_k!r}")
    if not isinstance(s.max_new_tokens, int) or s.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {s.max_new_tokens!r}")
    if not 0.0 <= s.teacher_mix <= 1.0:
        raise ValueError(f"teacher_mix must be in [0, 1], got {s.teacher_mix!r}")
    if s.batch_size is not None and (not isinstance(s.batch_size, int) or s.batch_size < 1):
        raise ValueError(f"batch_size must be None or an int >= 1, got {s.batch_size!r}")
    if not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"vocab must be an int >= 1, got {vocab!r}")
    if not isinstance(pad_id, int) or pad_id < 0:
        raise ValueError(f"pad_id must be an int >= 0, got {pad_id!r}")
    if sample_from == "student":
        if student is None:
            raise ValueError("sample_from='student' needs a student model")
        if s.teacher_mix > 0 and teacher is None:
            raise ValueError(f"teacher_mix={s.teacher_mix} needs a teacher model")
    elif sample_from == "teacher":
        if teacher is None:
            raise ValueError("sample_from='teacher' needs a teacher model")
        if s.teacher_mix != 0:
            raise ValueError(f"teacher_mix must be 0 when sample_from='teacher', got {s.teacher_mix}")
    else:
        raise ValueError(f"sample_from must be 'student' or 'teacher', got {sample_from!r}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")


def _filtered_logprobs(logits: torch.Tensor, settings: SampleSettings) -> torch.Tensor:
    """log f(z) = log_softmax(top_p(top_k(z / T))); removed tokens are -inf. logits: [B, V] fp32 -> [B, V] fp32."""
    z = logits / settings.temperature if settings.temperature != 1.0 else logits
    if 0 < settings.top_k < z.shape[-1]:
        kth = torch.topk(z, settings.top_k, dim=-1).values[:, -1:]  # [B, 1]; ties with the k-th are kept (as HF)
        z = z.masked_fill(z < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)  # [B, V]
        probs = sorted_z.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p: keeps the smallest prefix with
        # mass >= top_p, and always the most likely token.
        drop_sorted = (probs.cumsum(-1) - probs) >= settings.top_p
        drop_sorted[:, 0] = False
        z = z.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return z.log_softmax(-1)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _forward_params(model: nn.Module) -> Collection[str]:
    """Named forward parameters, looking through wrappers with an opaque **kwargs forward (PEFT, DDP, compile)."""
    for _ in range(4):
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        if "cache" in params or "past_key_values" in params:
            return params
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None and callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
        if not isinstance(inner, nn.Module) or inner is model:
            return params
        model = inner
    return params


class _Runner:
    """One model's decode state: its KV cache and the fp32 logits [B, vocab] of the next position."""

    def __init__(self, model: nn.Module, vocab: int, autocast: Callable[[], ContextManager]):
        self.model, self.vocab, self.autocast = model, vocab, autocast
        self.device = _device_of(model)
        params = _forward_params(model)
        # transformers >= 5 renamed the forward kwarg `past_key_values` to `cache` (the old name is deprecated).
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_last = "logits_to_keep" if "logits_to_keep" in params else None
        self.cache = None

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, prefill: bool) -> torch.Tensor:
        kwargs = dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                      position_ids=pos.to(self.device), use_cache=True)
        if not prefill:
            kwargs[self.cache_kw] = self.cache
        elif self.keep_last:
            kwargs[self.keep_last] = 1  # only the last prompt position's logits are needed
        with self.autocast():
            out = self.model(**kwargs)
        self.cache = out.get("cache", out.get("past_key_values"))
        if self.cache is None:
            raise ValueError(f"{type(self.model).__name__} returned no KV cache although use_cache=True was passed")
        logits = out["logits"][:, -1, : self.vocab].float()  # [B, vocab] fp32
        if logits.shape[-1] != self.vocab:
            raise ValueError(f"vocab={self.vocab} exceeds the model's logits width {logits.shape[-1]}")
        return logits


def _decode_batch(prompts: list[list[int]], settings: SampleSettings, stop: torch.Tensor, pad_id: int,
                  generator: torch.Generator, runners: dict[str, _Runner], sample_from: str, record: bool):
    """Decode one batch. Returns (tokens [B, S], lengths [B], ended [B], logprobs {name: [B, S]}) on CPU."""
    dev = generator.device  # sampling happens where the generator lives
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding
        ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, L - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
    logits = {name: r.forward(ids, mask, pos, prefill=True).to(dev) for name, r in runners.items()}
    stop = stop.to(dev)
    alpha = settings.teacher_mix
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    lengths = torch.full((B,), settings.max_new_tokens, dtype=torch.long, device=dev)
    out_tokens, out_lp = [], {k: [] for k in ("behavior", "student", "teacher")}
    for t in range(settings.max_new_tokens):
        # Filtered log-probs of the sampling distribution(s), [B, V] fp32.
        if sample_from == "teacher":
            behavior_lp = _filtered_logprobs(logits["teacher"], settings)
        elif alpha > 0:
            lf_t = _filtered_logprobs(logits["teacher"], settings)
            lf_s = _filtered_logprobs(logits["student"], settings)
            # log(alpha * f_t + (1 - alpha) * f_s), exact where one of the two is 0 (-inf)
            behavior_lp = torch.logaddexp(lf_t + math.log(alpha), lf_s + math.log1p(-alpha)) if alpha < 1 else lf_t
        else:
            behavior_lp = _filtered_logprobs(logits["student"], settings)
        y = torch.multinomial(behavior_lp.exp(), 1, generator=generator).squeeze(-1)  # [B]
        y = torch.where(done, torch.full_like(y, pad_id), y)  # finished rows keep feeding pad
        out_tokens.append(y)
        if record:
            out_lp["behavior"].append(behavior_lp.gather(-1, y[:, None]).squeeze(-1))
            for name in ("student", "teacher"):
                if name in logits:  # untempered: log_softmax(z)[y]
                    out_lp[name].append(logits[name].log_softmax(-1).gather(-1, y[:, None]).squeeze(-1))
        hit = torch.isin(y, stop) & ~done
        lengths = torch.where(hit, torch.full_like(lengths, t + 1), lengths)
        done = done | hit
        if t + 1 == settings.max_new_tokens or bool(done.all()):
            break
        # One decode step: new token [B, 1], mask grows by a column of ones, positions +1.
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=-1)
        pos = pos[:, -1:] + 1
        logits = {name: r.forward(y[:, None], mask, pos, prefill=False).to(dev) for name, r in runners.items()}
    tokens = torch.stack(out_tokens, -1).cpu()  # [B, S]
    lps = {k: torch.stack(v, -1).cpu() for k, v in out_lp.items() if v}
    return tokens, lengths.cpu(), done.cpu(), lps


def sample_completions(*, prompts: list[list[int]], settings: SampleSettings, stop_ids: Collection[int], pad_id: int,
                       generator: torch.Generator, vocab: int, student: Optional[nn.Module] = None,
                       teacher: Optional[nn.Module] = None, sample_from: Literal["student", "teacher"] = "student",
                       record_logprobs: bool = False,
                       autocast: Optional[Callable[[], ContextManager]] = None) -> Completions:
    """Sample one completion per prompt (see the module docstring for the distributions).

    Models run in eval mode under ``torch.no_grad()`` with ``use_cache=True`` (so gradient checkpointing, which HF
    only applies in training mode, cannot turn the KV cache off); each module's train/eval flag is restored after.
    ``autocast`` (a context-manager factory, e.g. ``lambda: torch.autocast("cpu", torch.bfloat16)``) wraps the
    forwards; softmax and sampling are float32. Sampling runs on ``generator.device`` -- give a generator on the
    sampling model's device to avoid copying [B, V] logits each step. With ``record_logprobs`` every given model
    runs in the decode loop; otherwise only the model(s) needed to sample.
    """
    start = time.perf_counter()
    prompts = [list(p) for p in prompts]
    _validate(settings, prompts, vocab, pad_id, student, teacher, sample_from)
    if not prompts:
        return Completions([], [], [] if record_logprobs else None,
                           [] if record_logprobs and student is not None else None,
                           [] if record_logprobs and teacher is not None else None, time.perf_counter() - start, 0)
    models: dict[str, nn.Module] = {}
    if student is not None and (sample_from == "student" or record_logprobs):
        models["student"] = student
    if teacher is not None and (sample_from == "teacher" or settings.teacher_mix > 0 or record_logprobs):
        models["teacher"] = teacher
    autocast = autocast or contextlib.nullcontext
    stop = torch.tensor(sorted({int(s) for s in stop_ids}), dtype=torch.long)

    n = len(prompts)
    order = sorted(range(n), key=lambda i: -len(prompts[i])) if settings.bucket else list(range(n))  # stable
    size = settings.batch_size or n
    tokens: list[list[int]] = [[] for _ in range(n)]
    truncated = [False] * n
    lps: dict[str, list[list[float]]] = {k: [[] for _ in range(n)] for k in ("behavior", "student", "teacher")}

    saved_modes = [(m, m.training) for model in models.values() for m in model.modules()]
    try:
        for model in models.values():
            model.eval()
        with torch.no_grad():
            for lo in range(0, n, size):
                idx = order[lo:lo + size]
                runners = {name: _Runner(m, vocab, autocast) for name, m in models.items()}
                tok, lengths, ended, batch_lps = _decode_batch([prompts[i] for i in idx], settings, stop, pad_id,
                                                               generator, runners, sample_from, record_logprobs)
                tok_l, len_l, end_l = tok.tolist(), lengths.tolist(), ended.tolist()
                lp_l = {k: v.tolist() for k, v in batch_lps.items()}
                for b, i in enumerate(idx):
                    tokens[i], truncated[i] = tok_l[b][: len_l[b]], not end_l[b]
                    for k, v in lp_l.items():
                        lps[k][i] = v[b][: len_l[b]]
                del runners  # free the KV caches before the next batch
    finally:
        for m, mode in saved_modes:
            m.training = mode

    rec = record_logprobs
    return Completions(
        tokens=tokens,
        truncated=truncated,
        behavior_logprobs=lps["behavior"] if rec else None,
        student_logprobs=lps["student"] if rec and student is not None else None,
        teacher_logprobs=lps["teacher"] if rec and teacher is not None else None,
        seconds=time.perf_counter() - start,
        new_tokens=sum(len(t) for t in tokens),
    )
