"""Cross-tokenizer distillation objectives as pure tensor functions: ALM and ULD.

When the student and the teacher tokenise the same text differently, their next-token distributions live
over different vocabularies and cannot be compared token by token. The data pipeline (kdlm.data.alignment)
cuts both tokenisations of a text into byte-equal CHUNKS: chunk c covers the same bytes on both sides, as
one or more student tokens and one or more teacher tokens. Each counted row (position) on either side
carries its chunk id. Two ways to compare the models over those chunks:

ALM, Approximate Likelihood Matching (Minixhofer et al. 2025, "Universal Cross-Tokenizer Distillation via
Approximate Likelihood Matching"; github.com/bminixhofer/tokenkit, `compute_alm_loss`). The likelihood
each model assigns to a chunk's text is the product of its tokens' probabilities, so log p(chunk) is the sum
of the chunk's token log-probs, on either side (`token_logprobs`, then `chunk_logprobs`). ALM matches the
student's chunk likelihoods to the teacher's. A chunk likelihood is one number in (0, 1], not a distribution,
so it is BINARISED: the Bernoulli (y, 1 - y), "the model produces this chunk" vs "anything else", and a
binarised f-divergence compares the teacher's Bernoulli with the student's. Raw chunk likelihoods of long
chunks are tiny (log p = -30 is common), where every Bernoulli is ~(0, 1) and the divergence vanishes;
so the likelihood is first tempered at tau, y = exp(log p / tau) = p^(1/tau) (tokenkit's default tau = 100
keeps y in a range where differences register). With a = log p / tau - eps (eps = 1e-6 as tokenkit, so
that a < 0 strictly and log(1 - y) stays finite) and b = log(1 - exp(a)) = log1mexp(a):

    kl          D(T || S) = y_T (a_T - a_S) + (1 - y_T) (b_T - b_S)              (binary KL, the default)
    reverse_kl  D(S || T) = y_S (a_S - a_T) + (1 - y_S) (b_S - b_T)              (tokenkit reverse_binary_kl)
    tvd         |y_T - y_S|  (half the L1 of the two Bernoullis)                 (tokenkit abs_exp)
    binary_ce   -(y_T a_S + (1 - y_T) b_S)                                       (tokenkit binary_ce)

tokenkit's own default is `binary_ce`, the binary cross-entropy; `kl` is it minus the teacher's binary
entropy, a constant w.r.t. the student, so both give the SAME gradient; `kl` is 0 at a perfect match, which
makes it readable as a loss. All four are computed in log space (a, b via log1mexp) and are finite for any
chunk log-prob, -500 or 0. Per chunk, optionally weighted, then SUMMED (the trainer normalises once).

With identical tokenizers every chunk is a single token, and ALM becomes a same-tokenizer SEQUENCE-
LIKELIHOOD MATCH at the token level: sum over positions n of D(p_T(x_n | x_<n)^(1/tau) || p_S(x_n | x_<n)^(1/tau)),
i.e. the binarised divergence between the two models' probabilities of the observed next token (not of
the full next-token distributions). Summing a text's chunk log-probs gives its sequence log-likelihood, so
matching every chunk likelihood matches the likelihood of every byte-aligned prefix of the text.

ULD, Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the
Universal Logit Distillation Loss"). At aligned positions (here: the positions predicting each chunk's first
token, where both models predict "what comes after the common boundary"), the two next-token distributions
are compared WITHOUT a vocabulary mapping: each sorted in descending order, the smaller vocabulary zero-
padded, then the L1 distance sum_i |p_S,(i) - p_T,(i)| (the closed-form Wasserstein-1 distance between
the sorted distributions under the paper's uniform-cost assumption). It ignores which token is which, so it
is invariant to any permutation of either vocabulary. Probabilities are softmax(logits / T); unlike the
same-vocabulary divergence terms no T^2 factor is applied (as in the paper and tokenkit's baseline).

Memory. A teacher vocabulary may be 262,144: [rows, V] fp32 is 1 MiB per row. So nothing here holds logits
for all rows at once: `token_logprobs` computes the head chunk by chunk (chunk_rows rows at a time) and
keeps only the [n] gathered log-probs; each chunk runs under torch.utils.checkpoint (non-reentrant), so
backward recomputes that chunk's logits instead of keeping every chunk's. ULD does the same per chunk of
rows; `uld_sum_from_hidden` recomputes both sides' logits of a chunk inside the checkpoint (the teacher's
under no_grad), so the only things kept between forward and backward are the hidden rows themselves.
Peak extra memory is O(chunk_rows x (V_s + V_t)) whatever the number of rows.

Dtypes: all maths is fp32 at least; bf16 inputs are upcast before the matmul (PEERS.md #4); fp64 inputs
stay fp64 (the float64 references of the tests). The teacher never gets a gradient.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kdlm.losses.objective import LMHead

ALM_DIVERGENCES = ("kl", "reverse_kl", "tvd", "binary_ce")
# tokenkit's epsilon: subtracted from log p / tau, so that the tempered log-likelihood a < 0 strictly and
# log(1 - exp(a)) (and its gradient) stays finite even for a chunk of probability 1.
ALM_EPSILON = 1e-6
_LOG_HALF = -math.log(2.0)


# ----------------------------------------------------------------------------- helpers


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32 at least (bf16 -> fp32); fp64 stays fp64."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def _head_logits(head: LMHead, hidden: Tensor, dtype: torch.dtype) -> Tensor:
    """[n, H] -> [n, vocab] logits in `dtype`: `head.logits` for fp32; the same operations, in the same order,
    in fp64 for fp64 (LMHead.logits always computes in fp32)."""
    if dtype == torch.float32:
        return head.logits(hidden)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        weight = head.weight[: head.vocab].to(dtype)
        bias = head.bias[: head.vocab].to(dtype) if head.bias is not None else None
        out = F.linear(hidden.to(dtype), weight, bias)
        if head.scale != 1.0:
            out = out * head.scale
        if head.softcap:
            out = head.softcap * torch.tanh(out / head.softcap)
    return out


def _row_spans(rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be an int >= 1, got {chunk_rows!r}")
    return [(start, min(start + chunk_rows, rows)) for start in range(0, rows, chunk_rows)]


def _maybe_checkpoint(fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """fn(*args), under a non-reentrant checkpoint when autograd is recording (the chunk's intermediates are
    recomputed in backward instead of kept); a plain call under no_grad (the teacher)."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _check_temperature(temperature: float, name: str = "temperature") -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _check_weights(weights: Optional[Tensor], rows: int, what: str) -> None:
    if weights is not None and tuple(weights.shape) != (rows,):
        raise ValueError(f"weights must be [{rows}] (one per {what}), got {tuple(weights.shape)}")


def _weighted_sum(values: Tensor, weights: Optional[Tensor]) -> Tensor:
    if weights is None:
        return values.sum()
    return (values * weights.detach().to(values.dtype)).sum()


# ----------------------------------------------------------------------------- likelihoods


def token_logprobs(
    hidden: Tensor, head: LMHead, targets: Tensor, *, chunk_rows: int = 1024, temperature: float = 1.0
) -> Tensor:
    """[N] log softmax(logits / T)[target] of each row, fp32 (fp64 for fp64 hidden/weights).

    hidden [N, H] (any dtype), targets [N] long (ids < head.vocab). The logits are computed chunk_rows rows at
    a time, so only [chunk_rows, V] logits exist at once; each chunk runs under a non-reentrant
    torch.utils.checkpoint, so backward recomputes them rather than keeping every chunk's. Differentiable
    w.r.t. hidden and the head's weight/bias; under no_grad (the teacher) the chunks are plain calls.
    """
    temperature = _check_temperature(temperature)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got {tuple(hidden.shape)}")
    rows = hidden.shape[0]
    if tuple(targets.shape) != (rows,) or targets.dtype != torch.long:
        raise ValueError(f"targets must be [{rows}] long, got {tuple(targets.shape)} {targets.dtype}")
    dtype = _compute_dtype(hidden.dtype, head.weight.dtype)
    spans = _row_spans(rows, chunk_rows)
    if not spans:
        # no rows: an empty result that is still connected to the graph (so backward through a sum works)
        return hidden.sum(-1).to(dtype) * 0.0

    def one_chunk(hidden_c: Tensor, targets_c: Tensor) -> Tensor:
        logits = _head_logits(head, hidden_c, dtype)  # [n, V]
        if temperature != 1.0:
            logits = logits / temperature
        picked = logits.gather(-1, targets_c[:, None]).squeeze(-1)  # [n]
        return picked - torch.logsumexp(logits, dim=-1)  # [n]

    parts = [_maybe_checkpoint(one_chunk, hidden[a:b], targets[a:b]) for a, b in spans]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def chunk_logprobs(token_logprobs: Tensor, chunk: Tensor, num_chunks: int) -> Tensor:
    """[C] log-likelihood of each chunk: the sum of its tokens' log-probs (index_add; differentiable).

    token_logprobs [N] (from `token_logprobs`), chunk [N] long in [0, num_chunks). A chunk with no row gets 0.
    """
    if token_logprobs.dim() != 1 or tuple(chunk.shape) != tuple(token_logprobs.shape):
        raise ValueError(f"token_logprobs and chunk must both be [N], got {tuple(token_logprobs.shape)} and "
                         f"{tuple(chunk.shape)}")
    if chunk.dtype != torch.long:
        raise ValueError(f"chunk must be long, got {chunk.dtype}")
    out = torch.zeros(num_chunks, dtype=token_logprobs.dtype, device=token_logprobs.device)
    return out.index_add(0, chunk, token_logprobs)


# ----------------------------------------------------------------------------- ALM


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0 (Maechler 2012): log(-expm1(x)) near 0, log1p(-exp(x)) below log(1/2).
    Both branches are finite for every x < 0 (ALM's x <= -ALM_EPSILON), so the unused one cannot inject a
    NaN gradient through torch.where."""
    return torch.where(x > _LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def binarised_divergence(teacher_log_y: Tensor, student_log_y: Tensor, divergence: str = "kl") -> Tensor:
    """Elementwise binarised f-divergence between the Bernoullis (y_T, 1 - y_T) and (y_S, 1 - y_S), given
    a = log y < 0 on each side (see the module docstring for the formulas). No tempering here."""
    a_t, a_s = teacher_log_y, student_log_y
    if divergence == "kl":
        return torch.exp(a_t) * (a_t - a_s) + (-torch.expm1(a_t)) * (_log1mexp(a_t) - _log1mexp(a_s))
    if divergence == "reverse_kl":
        return torch.exp(a_s) * (a_s - a_t) + (-torch.expm1(a_s)) * (_log1mexp(a_s) - _log1mexp(a_t))
    if divergence == "tvd":
        return (torch.exp(a_t) - torch.exp(a_s)).abs()
    if divergence == "binary_ce":
        return -(torch.exp(a_t) * a_s + (-torch.expm1(a_t)) * _log1mexp(a_s))
    raise ValueError(f"unknown ALM divergence {divergence!r}; valid: {', '.join(ALM_DIVERGENCES)}")


def tempered_log_likelihood(chunk_logp: Tensor, tau: float) -> Tensor:
    """a = min(log p, 0) / tau - ALM_EPSILON: the log of the tempered chunk likelihood p^(1/tau), kept < 0
    (tokenkit clips the chunk log-probs at 0 and subtracts its epsilon after dividing by the temperature)."""
    return chunk_logp.clamp(max=0.0) / tau - ALM_EPSILON


def alm_sum(
    student_chunk_logp: Tensor,
    teacher_chunk_logp: Tensor,
    *,
    tau: float = 100.0,
    divergence: str = "kl",
    weights: Optional[Tensor] = None,
) -> Tensor:
    """ALM: sum_c w_c * D(Bern(p_T(c)^(1/tau)) || Bern(p_S(c)^(1/tau))), a 0-d tensor.

    student_chunk_logp / teacher_chunk_logp [C]: each chunk's log-likelihood under either model
    (`chunk_logprobs`), weights [C] or None (all 1; detached). `divergence` in ALM_DIVERGENCES (see the module
    docstring; kl is tokenkit's default binary_ce minus a teacher-only constant, so the same gradient, and 0
    at a perfect match). The teacher side is detached: gradients reach the student's log-probs only.
    fp32 (fp64 if either input is fp64; bf16 is upcast). With chunk = arange(N) (identical tokenizers, one
    token per chunk) this is the token-level sequence-likelihood match described in the module docstring.
    """
    tau = _check_temperature(tau, "tau")
    if divergence not in ALM_DIVERGENCES:
        raise ValueError(f"unknown ALM divergence {divergence!r}; valid: {', '.join(ALM_DIVERGENCES)}")
    if student_chunk_logp.dim() != 1 or student_chunk_logp.shape != teacher_chunk_logp.shape:
        raise ValueError(f"student and teacher chunk log-probs must both be [C], got "
                         f"{tuple(student_chunk_logp.shape)} and {tuple(teacher_chunk_logp.shape)}")
    _check_weights(weights, student_chunk_logp.shape[0], "chunk")
    dtype = _compute_dtype(student_chunk_logp.dtype, teacher_chunk_logp.dtype)
    a_s = tempered_log_likelihood(student_chunk_logp.to(dtype), tau)  # [C]
    a_t = tempered_log_likelihood(teacher_chunk_logp.detach().to(dtype), tau)  # [C]
    return _weighted_sum(binarised_divergence(a_t, a_s, divergence), weights)


# ----------------------------------------------------------------------------- ULD


def _sorted_probs(logits: Tensor, temperature: float) -> Tensor:
    """[n, V] softmax(logits / T) sorted descending. softmax is monotonic, so sort(softmax(z)) equals
    softmax(sort(z)): sorting the logits first lets the unsorted buffer and the sort's int64 indices go before
    the softmax allocates its own."""
    return torch.softmax(logits.sort(dim=-1, descending=True).values / temperature, dim=-1)


def _padded_l1(student: Tensor, teacher: Tensor) -> Tensor:
    """[n] sum_i |student_i - teacher_i| of two sorted probability rows, the shorter one zero-padded: the
    common head |a_i - b_i| for i < V_min, plus the longer side's remaining mass (no padded buffer)."""
    common = min(student.shape[-1], teacher.shape[-1])
    out = (student[:, :common] - teacher[:, :common]).abs().sum(-1)  # [n]
    if student.shape[-1] > common:
        out = out + student[:, common:].sum(-1)
    elif teacher.shape[-1] > common:
        out = out + teacher[:, common:].sum(-1)
    return out


def _check_uld_rows(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(f"student and teacher {what} must be 2-d [R, *], got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"ULD compares aligned rows one to one: student has {student.shape[0]} rows, "
                         f"teacher {teacher.shape[0]}")


def uld_sum(
    student_logits_rows: Tensor,
    teacher_logits_rows: Tensor,
    *,
    temperature: float = 1.0,
    weights: Optional[Tensor] = None,
    chunk_rows: int = 256,
) -> Tensor:
    """ULD: sum_r w_r * || sort(p_S,r) - sort(p_T,r) ||_1 (descending sorts, smaller vocabulary zero-padded).

    student_logits_rows [R, V_s], teacher_logits_rows [R, V_t] (V_s and V_t may differ), row r of one aligned
    with row r of the other; p = softmax(logits / T) (no T^2 factor). weights [R] or None (detached).
    chunk_rows rows at a time, each chunk checkpointed, so the softmax/sort intermediates exist for one chunk
    only. The teacher is detached. 0-d, fp32 (fp64 if either input is fp64).
    """
    temperature = _check_temperature(temperature)
    _check_uld_rows(student_logits_rows, teacher_logits_rows, "logits")
    _check_weights(weights, student_logits_rows.shape[0], "row")
    dtype = _compute_dtype(student_logits_rows.dtype, teacher_logits_rows.dtype)
    teacher = teacher_logits_rows.detach()

    def one_chunk(student_c: Tensor, teacher_c: Tensor) -> Tensor:
        student_sorted = _sorted_probs(student_c.to(dtype), temperature)
        return _padded_l1(student_sorted, _sorted_probs(teacher_c.to(dtype), temperature))

    spans = _row_spans(student_logits_rows.shape[0], chunk_rows)
    if not spans:
        return student_logits_rows.sum().to(dtype) * 0.0
    per_row = torch.cat([_maybe_checkpoint(one_chunk, student_logits_rows[a:b], teacher[a:b]) for a, b in spans])
    return _weighted_sum(per_row, weights)


def uld_sum_from_hidden(
    student_hidden: Tensor,
    student_head: LMHead,
    teacher_hidden: Tensor,
    teacher_head: LMHead,
    *,
    temperature: float = 1.0,
    weights: Optional[Tensor] = None,
    chunk_rows: int = 256,
) -> Tensor:
    """`uld_sum(student_head.logits(student_hidden), teacher_head.logits(teacher_hidden), ...)` without the
    [R, V] logits of all rows: student_hidden [R, H_s], teacher_hidden [R, H_t], aligned row by row.

    Per chunk of chunk_rows rows, both heads run inside one non-reentrant checkpoint (the teacher's under
    no_grad), so between forward and backward only the hidden rows are kept, and backward recomputes one
    chunk's logits at a time. Gradients reach student_hidden and the student head's weight/bias.
    """
    temperature = _check_temperature(temperature)
    _check_uld_rows(student_hidden, teacher_hidden, "hidden states")
    _check_weights(weights, student_hidden.shape[0], "row")
    dtype = _compute_dtype(student_hidden.dtype, student_head.weight.dtype, teacher_hidden.dtype,
                           teacher_head.weight.dtype)
    teacher_hidden = teacher_hidden.detach()

    def one_chunk(student_c: Tensor, teacher_c: Tensor) -> Tensor:
        with torch.no_grad():  # [n, V_t] sorted probabilities, no graph; the teacher's logits are freed here
            teacher_sorted = _sorted_probs(_head_logits(teacher_head, teacher_c, dtype), temperature)
        return _padded_l1(_sorted_probs(_head_logits(student_head, student_c, dtype), temperature), teacher_sorted)

    spans = _row_spans(student_hidden.shape[0], chunk_rows)
    if not spans:
        return student_hidden.sum().to(dtype) * 0.0
    per_row = torch.cat([_maybe_checkpoint(one_chunk, student_hidden[a:b], teacher_hidden[a:b]) for a, b in spans])
    return _weighted_sum(per_row, weights)
