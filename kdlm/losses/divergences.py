"""Token-level divergences between a student and a teacher next-token distribution.

Every divergence here is a *true* divergence: it is 0 when the two distributions
are equal and >= 0 otherwise (forward KL includes the teacher-entropy term; it is
not the cross-entropy). All of them are computed in log space from logits:

    teacher_logprobs = log_softmax(teacher_logits / T)      # log p_T
    student_logprobs = log_softmax(student_logits / T)      # log p_S

Conventions (see docs/concepts/divergences.md):
- gradients reach the student logits only: the teacher logits are detached inside;
- `beta` is the TEACHER's weight in the JSD mixture m = beta*p_T + (1-beta)*p_S;
- `skew` is the weight of the distribution that the skewed KL measures from:
  skew_forward_kl = KL(p_T || skew*p_T + (1-skew)*p_S) (DistiLLM, Ko et al. 2024);
- `beta` is also TAID's interpolation coefficient t, the TEACHER's weight in the target
  p_t = softmax((1-t)*stopgrad(log p_S) + t*log p_T) (Shing et al. 2025);
- `divergence` returns T**2 * (mean over counted positions) (Hinton et al. 2015),
  `per_position_divergence` the raw per-position values (no T**2, no mask, no mean).
"""

from __future__ import annotations

import difflib
import math
from typing import Callable

import torch
from torch import Tensor

# fn(student_logprobs, teacher_logprobs, *, beta, skew) -> [...] divergence per position
DivergenceFn = Callable[..., Tensor]

_REGISTRY: dict[str, DivergenceFn] = {}


def register_divergence(name: str) -> Callable[[DivergenceFn], DivergenceFn]:
    """Decorator: register `fn(student_logprobs, teacher_logprobs, *, beta, skew) -> [...]` as `name`.

    The function gets log-probabilities `[..., V]` (temperature already applied) and
    returns the divergence per position, summed over the vocabulary. Names are unique.
    """

    def decorator(fn: DivergenceFn) -> DivergenceFn:
        if name in _REGISTRY:
            raise ValueError(f"divergence {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def get_divergence(name: str) -> DivergenceFn:
    """The registered per-position divergence called `name` (ValueError with the valid names if unknown)."""
    if name not in _REGISTRY:
        valid = sorted(_REGISTRY)
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown divergence kind {name!r}; valid kinds: {', '.join(valid)}.{hint}")
    return _REGISTRY[name]


# ----------------------------------------------------------------------------- building blocks


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) = sum_v p_v * (log p_v - log q_v) over the last dim; entries with p_v = 0 count 0."""
    p = logp.exp()  # [..., V]
    support = p > 0  # 0*log0 = 0; also drops mass that underflowed to exactly 0
    # Mask the INPUTS, not just the output: p * ((-inf) - (-inf)) is NaN, and so is its
    # gradient even when a where() later throws the value away.
    logp = torch.where(support, logp, 0.0)
    logq = torch.where(support, logq, 0.0)
    return (p * (logp - logq)).sum(-1)  # [...]


def _log_mixture(logp: Tensor, logq: Tensor, w: float) -> Tensor:
    """log(w*p + (1-w)*q) as a two-term logsumexp, exact at w = 0 and w = 1."""
    a = logp + (math.log(w) if w > 0 else -math.inf)  # [..., V]
    b = logq + (math.log1p(-w) if w < 1 else -math.inf)  # [..., V]
    # Where both terms are -inf the mixture has no mass; logaddexp(-inf, -inf) has a NaN
    # gradient, so feed it zeros there and put the -inf back afterwards.
    empty = (a == -math.inf) & (b == -math.inf)
    log_m = torch.logaddexp(a.masked_fill(empty, 0.0), b.masked_fill(empty, 0.0))
    return log_m.masked_fill(empty, -math.inf)  # [..., V]


# ----------------------------------------------------------------------------- the divergences


@register_divergence("forward_kl")
def forward_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, *, beta: float, skew: float) -> Tensor:
    """Forward KL: KL(p_T || p_S) = sum_v p_T (log p_T - log p_S).

    Reference distribution: the teacher (expectation under p_T). Mode-covering: the
    student is punished wherever the teacher has mass it misses. Classic soft-label KD
    (Hinton et al. 2015). Includes the teacher-entropy term, so it is 0 at p_S = p_T.
    """
    return _kl(teacher_logprobs, student_logprobs)


@register_divergence("reverse_kl")
def reverse_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, *, beta: float, skew: float) -> Tensor:
    """Reverse KL: KL(p_S || p_T) = sum_v p_S (log p_S - log p_T).

    Reference distribution: the student. Mode-seeking: the student may drop teacher
    modes but is punished for mass where the teacher has little (+inf where p_T = 0 and
    p_S > 0). MiniLLM (Gu et al. 2024).
    """
    return _kl(student_logprobs, teacher_logprobs)


@register_divergence("jsd")
def jsd(student_logprobs: Tensor, teacher_logprobs: Tensor, *, beta: float, skew: float) -> Tensor:
    """Generalized JSD: beta*KL(p_T || m) + (1-beta)*KL(p_S || m), m = beta*p_T + (1-beta)*p_S.

    beta is the teacher's weight in the mixture m; beta = 0.5 is the symmetric
    Jensen-Shannon divergence (bounded by log 2). Both directions at once: between
    mode-covering and mode-seeking. Tends to 0 as beta -> 0 or 1 (m -> p_S or p_T),
    continuously. Generalized JSD from GKD (Agarwal et al. 2024).
    """
    log_m = _log_mixture(teacher_logprobs, student_logprobs, beta)  # [..., V]
    # A term with weight exactly 0 is left out: beta*KL(p_T||m) <= beta*log(1/beta) -> 0,
    # so this is the continuous limit, and it avoids 0*inf when a support is disjoint.
    teacher_term = beta * _kl(teacher_logprobs, log_m) if beta > 0 else 0.0  # [...]
    student_term = (1 - beta) * _kl(student_logprobs, log_m) if beta < 1 else 0.0  # [...]
    return teacher_term + student_term


@register_divergence("tvd")
def tvd(student_logprobs: Tensor, teacher_logprobs: Tensor, *, beta: float, skew: float) -> Tensor:
    """Total variation distance: 1/2 * sum_v |p_T - p_S|, in [0, 1].

    Symmetric (no reference side), bounded, robust to outlier tokens; neither mode-covering
    nor mode-seeking. f-divergence KD (Wen et al. 2023).
    """
    return 0.5 * (teacher_logprobs.exp() - student_logprobs.exp()).abs().sum(-1)


@register_divergence("skew_forward_kl")
def skew_forward_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, *, beta: float, skew: float) -> Tensor:
    """Skew forward KL: KL(p_T || skew*p_T + (1-skew)*p_S).

    Reference: the teacher; mode-covering like forward KL, but the mixture keeps the
    log-ratio bounded by log(1/skew) where the student has ~0 mass, which stabilises the
    gradients. skew = 0 is forward KL. DistiLLM (Ko et al. 2024).
    """
    log_m = _log_mixture(teacher_logprobs, student_logprobs, skew)  # [..., V]
    return _kl(teacher_logprobs, log_m)


@register_divergence("skew_reverse_kl")
def skew_reverse_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, *, beta: float, skew: float) -> Tensor:
    """Skew reverse KL: KL(p_S || skew*p_S + (1-skew)*p_T).

    Reference: the student; mode-seeking like reverse KL, but finite (<= log(1/skew))
    even where the teacher has ~0 mass. skew = 0 is reverse KL. DistiLLM (Ko et al. 2024).
    """
    log_m = _log_mixture(student_logprobs, teacher_logprobs, skew)  # [..., V]
    return _kl(student_logprobs, log_m)


@register_divergence("taid")
def taid(student_logprobs: Tensor, teacher_logprobs: Tensor, *, beta: float, skew: float) -> Tensor:
    """TAID: KL(p_t || p_S) to a time-dependent target interpolated between student and teacher.

    TAID (Shing et al. 2025, "TAID: Temporally Adaptive Interpolated Distillation for Efficient
    Knowledge Transfer in Language Models", ICLR 2025), with t = beta, the TEACHER's weight in the
    interpolation (as in jsd's mixture):

        p_t  = softmax((1 - t) * stopgrad(z_S) + t * z_T)                    # [..., V]
             = softmax((1 - t) * stopgrad(log p_S) + t * log p_T)            (log_softmax = z - const per row)
        loss = KL(p_t || p_S) = sum_v p_t,v (log p_t,v - log p_S,v)          # [...]

    The target p_t is fully detached (the student part by the stop-gradient, the teacher as
    everywhere), so the gradient w.r.t. the student logits is p_S - p_t: forward-KL distillation
    towards p_t. This is NOT the derivative of the value as a function of the student logits
    (p_t moves with them), so finite-difference gradient checks do not apply. t = 1 is forward_kl
    exactly (same code path); t = 0 is exactly 0 (p_t = p_S). t is raised during training from
    t_start (0.4) towards 1 by `kdlm.training.schedules.TaidSchedule`. `skew` is unused.
    Teacher entries of -inf get p_t = 0 for t > 0.
    """
    if beta >= 1:
        log_target = teacher_logprobs  # [..., V]: bit-identical to forward_kl
    elif beta <= 0:
        log_target = student_logprobs.detach()  # [..., V]: p_t = p_S, the value is exactly 0
    else:
        with torch.no_grad():  # the target carries no graph: nothing of it is kept for backward
            mixed = student_logprobs.detach().mul(1 - beta).add_(teacher_logprobs, alpha=beta)  # [..., V], one buffer
            log_target = torch.log_softmax(mixed, dim=-1)  # [..., V]
            del mixed
    return _kl(log_target, student_logprobs)


DIVERGENCE_KINDS: tuple[str, ...] = tuple(_REGISTRY)


# ----------------------------------------------------------------------------- public entry points


def _check_same_shape(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got student "
            f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
        )


def per_position_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> Tensor:
    """Divergence per position `[...]` between softmax(logits / T), summed over the vocabulary.

    Not scaled by T**2, not masked, not averaged: callers that normalise by their own token
    count (e.g. a global count across micro-batches) sum this. Gradients reach the student
    logits only; the teacher logits are detached. Math is done in fp32 at least (fp64 stays
    fp64); teacher entries of -inf (masked vocabulary) are allowed.
    """
    fn = get_divergence(kind)
    _check_same_shape(student_logits, teacher_logits)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0 <= skew < 1:
        raise ValueError(f"skew must be in [0, 1), got {skew}")

    # bf16/fp16 -> fp32; fp64 stays fp64 (log_softmax over a large vocab needs the precision)
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    student_logprobs = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # [..., V]
    teacher_logprobs = torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)  # [..., V]
    return fn(student_logprobs, teacher_logprobs, beta=beta, skew=skew)  # [...]


def divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    mask: Tensor | None = None,
) -> Tensor:
    """T**2 * mean over counted positions of `per_position_divergence` (a 0-dim tensor).

    `kind` is one of DIVERGENCE_KINDS (or a registered name). Gradients reach the student
    logits only; the teacher logits are detached inside. fp32 result (fp64 for fp64 inputs).
    `mask` is a bool tensor of shape `logits.shape[:-1]`, True = counted; None counts all.
    With no counted position the result is exactly 0 and still backpropagates (zero grads).
    The T**2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).
    """
    _check_same_shape(student_logits, teacher_logits)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} must equal the logits' leading dims "
                f"{tuple(student_logits.shape[:-1])}"
            )
        # compute only the counted rows: [N, V]; masked-out rows may hold anything (even NaN)
        student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]
    per_position = per_position_divergence(
        student_logits, teacher_logits, kind, temperature=temperature, beta=beta, skew=skew
    )  # [...] or [N]
    # sum / max(count, 1): an empty selection gives 0 (connected to the graph), not NaN
    count = max(per_position.numel(), 1)
    return temperature**2 * per_position.sum() / count
