"""Distillation losses against a SPARSE teacher: its top-k log-probabilities per position, plus the tail.

An offline teacher cache (`kdlm.cache`) keeps, per counted position, the teacher's k most
likely token ids and their log-probabilities at the cache temperature T; the rest of the
vocabulary is one "tail" bucket whose mass is 1 - sum(top-k probabilities). Two ways to
compare a student with that signal, both feeding the SAME registered divergence functions
(`kdlm.losses.divergences`) that the dense objective uses, on a smaller last dimension:

- `tail_bucket` (default): (k+1)-bucket distributions. Teacher: its k log-probs and the log
  tail mass. Student: log_softmax(student_logits / T) gathered at the teacher's ids, plus its
  own tail bucket log(1 - sum exp(gathered)) = log1mexp(logsumexp(gathered)). Merging the
  tail tokens into one bucket can only lose information, so by the data-processing
  inequality every divergence here (all are f-divergences, TVD included) is a LOWER bound of
  the dense value. The head is exact; only the tail's internal shape is lost.
- `renormalized`: both distributions restricted to the teacher's top-k ids and renormalised
  over them (k buckets). Ignores the tail entirely and over-weights the head; neither a
  bound nor exact, but the usual choice of top-k caches elsewhere.

With k = V (every id kept, tail 0) `tail_bucket` drops the empty bucket and equals the dense
divergence. Values are multiplied by T^2 as in `objective.term_sums`; each term is a SUM over
positions, normalised once by the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlm.losses.divergences import get_divergence
from kdlm.losses.objective import STUDENT_TERMS, Term, ce_sum, check_coefficients, coefficient_sum

SparseMode = Literal["tail_bucket", "renormalized"]
MODES = ("tail_bucket", "renormalized")

# Smallest tail mass a bucket is given (about fp32's resolution of 1 - sum(head)). A teacher whose decoded
# top-k mass reaches 1 (quantisation, k < V) reports a tail of exactly 0; a true softmax never does, and a
# zero tail would make reverse-direction divergences infinite (and their gradients NaN). The floor changes
# a bucket only where the tail is below ~6e-8.
TAIL_FLOOR = 2.0**-24
_LOG_TAIL_FLOOR = math.log(TAIL_FLOOR)


@dataclass(frozen=True)
class SparseTeacher:
    """The teacher's top-k signal at N counted positions (row-major order of `counted_positions`).

    ids: [N, k] long, sorted by decreasing probability (ids[:, 0] is the teacher's argmax);
    logprobs: [N, k] fp32 log-probabilities at `temperature`; tail_logprob: [N] fp32, log of the
    mass outside the top-k (-inf when 0). `temperature` (optional) is the temperature the
    log-probs are at; when set, the loss checks that every divergence term uses it.
    """

    ids: Tensor
    logprobs: Tensor
    tail_logprob: Tensor
    temperature: Optional[float] = None

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def slice_rows(self, start: int, stop: int) -> "SparseTeacher":
        """Positions start..stop-1 (for a loss computed a chunk of rows at a time, as the fused head does)."""
        return SparseTeacher(self.ids[start:stop], self.logprobs[start:stop], self.tail_logprob[start:stop], self.temperature)

    def to(self, device) -> "SparseTeacher":
        return SparseTeacher(self.ids.to(device), self.logprobs.to(device), self.tail_logprob.to(device), self.temperature)

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, temperature: float = 1.0) -> "SparseTeacher":
        """The exact (unquantised) top-k signal of dense teacher logits [N, V]: what a cache stores, before rounding."""
        with torch.no_grad():
            dtype = torch.promote_types(logits.dtype, torch.float32)  # fp64 stays fp64 (tests, references)
            logprobs = torch.log_softmax(logits.detach().to(dtype) / temperature, dim=-1)  # [N, V]
            top, ids = logprobs.topk(k, dim=-1)  # [N, k], sorted descending
            rest = logprobs.scatter(-1, ids, -math.inf)  # the tail's own entries: no 1 - sum cancellation
            tail = torch.logsumexp(rest, dim=-1) if k < logits.shape[-1] else torch.full_like(top[:, 0], -math.inf)
        return cls(ids, top, tail, temperature)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012); inputs are clamped to <= -2^-24 so the
    value and its gradient stay finite (a mass below ~6e-8 is below fp32's resolution of 1 - sum anyway)."""
    x = x.clamp(max=-(2.0**-24))
    near_zero = x > -math.log(2)
    # both branches are finite for every x < 0, so the unused one cannot inject NaN gradients
    return torch.where(near_zero, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sparse_logprobs(
    student_logits: Tensor, teacher: SparseTeacher, temperature: float, mode: SparseMode = "tail_bucket"
) -> tuple[Tensor, Tensor]:
    """(student, teacher) log-probabilities over the buckets that `mode` compares: [N, k+1] (tail_bucket, k < V)
    or [N, k]. The teacher side is detached; the student side carries gradients to `student_logits`."""
    if mode not in MODES:
        raise ValueError(f"unknown sparse mode {mode!r}; valid: {', '.join(MODES)}")
    if teacher.ids.shape != teacher.logprobs.shape or teacher.ids.shape[0] != student_logits.shape[0]:
        raise ValueError(f"sparse teacher ids {tuple(teacher.ids.shape)} / logprobs {tuple(teacher.logprobs.shape)} "
                         f"do not match student logits {tuple(student_logits.shape)}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student_lp = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # [N, V]
    gathered = student_lp.gather(-1, teacher.ids.long())  # [N, k]
    teacher_lp = teacher.logprobs.detach().to(dtype)  # [N, k]
    if mode == "renormalized":
        return (gathered - torch.logsumexp(gathered, dim=-1, keepdim=True),
                teacher_lp - torch.logsumexp(teacher_lp, dim=-1, keepdim=True))
    if teacher.k >= student_logits.shape[-1]:  # every id kept: no tail bucket at all
        return gathered, teacher_lp
    student_tail = log1mexp(torch.logsumexp(gathered, dim=-1))  # [N]
    teacher_tail = teacher.tail_logprob.detach().to(dtype).clamp(min=_LOG_TAIL_FLOOR)  # [N]
    return (torch.cat([gathered, student_tail.unsqueeze(-1)], dim=-1),
            torch.cat([teacher_lp, teacher_tail.unsqueeze(-1)], dim=-1))


def sparse_term_sums(
    student_logits: Tensor,
    teacher: Optional[SparseTeacher],
    targets: Tensor,
    terms: list[Term],
    *,
    mode: SparseMode = "tail_bucket",
    coefficients: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """Per-term sums over counted tokens, as `objective.term_sums` but against a sparse teacher.

    student_logits: [N, V] fp32 (full vocabulary; the ce term and the student's tail need it);
    teacher: the SparseTeacher of the same N positions (None when no term needs it); targets: [N];
    coefficients: [K, N] per-term token coefficients (`objective.token_coefficients`; None: all 1).
    A divergence term is T^2 * sum_n c_n * D(teacher buckets, student buckets) with D the registered
    divergence of that name. The teacher's log-probs are already at the cache temperature, so every
    divergence term must use that temperature (checked when `teacher.temperature` is set).
    """
    check_coefficients(coefficients, terms, student_logits.shape[0])
    sums: dict[str, Tensor] = {}
    for k, term in enumerate(terms):
        coefficient = coefficients[k] if coefficients is not None else None  # [N] or None
        if term.name in STUDENT_TERMS:
            sums[term.label] = ce_sum(student_logits, targets, coefficient)
            continue
        if teacher is None:
            raise ValueError(f"term {term.label} needs the teacher's signal, got None")
        if teacher.temperature is not None and not math.isclose(term.temperature, teacher.temperature, rel_tol=1e-9):
            raise ValueError(f"term {term.label} uses temperature {term.temperature}, but the sparse teacher's "
                             f"log-probabilities are at temperature {teacher.temperature}")
        student_lp, teacher_lp = sparse_logprobs(student_logits, teacher, term.temperature, mode)
        per_pos = get_divergence(term.name)(student_lp, teacher_lp, beta=term.beta, skew=term.skew)  # [N]
        sums[term.label] = coefficient_sum(per_pos, coefficient) * term.temperature**2
    return sums


@torch.no_grad()
def sparse_validation_figures(student_logits: Tensor, teacher: SparseTeacher, targets: Tensor) -> dict[str, Tensor]:
    """Validation SUMS over N positions against a sparse teacher (divide by `tokens` after reducing):

    - ce: the student's cross-entropy on `targets` (nats, summed);
    - kl: tail-bucket forward KL(p_teacher || p_student) at the signal's temperature (1.0 when unset) - a
      LOWER bound of the dense KL (data-processing inequality), summed, no T^2 factor;
    - top1_agreement: positions where the student's argmax is the teacher's top id;
    - tokens: N.
    Values are 0-dim fp64 tensors on the logits' device.
    """
    temperature = teacher.temperature if teacher.temperature is not None else 1.0
    student_lp, teacher_lp = sparse_logprobs(student_logits.float(), teacher, temperature, "tail_bucket")
    kl = get_divergence("forward_kl")(student_lp, teacher_lp, beta=0.5, skew=0.1)
    dev = student_logits.device
    return {
        "ce": F.cross_entropy(student_logits.float(), targets, reduction="sum").double(),
        "kl": kl.sum().double(),
        "top1_agreement": (student_logits.argmax(-1) == teacher.ids[:, 0].to(dev)).sum().double(),
        "tokens": torch.tensor(float(targets.numel()), dtype=torch.float64, device=dev),
    }
