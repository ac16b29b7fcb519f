"""Fused, chunked LM-head losses: divergences and cross-entropy without the [N, V] logits.

The naive loss materialises, for N counted tokens and a vocabulary of V, the student and
teacher logits [N, V] fp32, their log-softmaxes, the divergence's intermediates and, in
backward, their gradients: ~9 live [N, V] fp32 buffers for forward_kl (37 bytes per
token x vocab entry measured; 8k tokens x 49k vocab: ~15 GB), more for jsd/skew KL.

Here the head and the loss run together, a chunk of rows at a time (Liger-Kernel style):

    for each chunk of rows c (rows_per_chunk from a byte budget):
        z_c       = h_c @ W[:vocab].T + b                # [n, V] fp32, compute dtype
        s_c       = softcap * tanh(scale * z_c / softcap) # student logits, in place
        t_c       = teacher head on the teacher rows      # [n, V], no grad
        loss_c    = sum_k weight_k * term_k(s_c, t_c; c_k)  # per-term SUMS over the chunk's rows, each
                                                       # token's value times its coefficient c_kn if any
        g_c       = d loss_c / d s_c  (torch.autograd.grad, NOW, in the forward pass)
        g_z       = g_c * scale * (1 - tanh^2)             # chain through the soft-capping
        grad_h[c] = g_z @ W ;  grad_W += g_z.T @ h_c ;  grad_b += sum_rows g_z
        (every [n, V] buffer is freed before the next chunk)

The autograd.Function's backward then only scales the stored grad_h / grad_W / grad_b by
the incoming grad_output. Peak extra memory is O(rows_per_chunk x V) + the fp32 grad
accumulators (V x H), whatever N is, and no FLOP is recomputed.

Rules:
- all maths inside a chunk is fp32 at least (fp64 stays fp64), even for bf16 hidden states
  and weights: the hidden chunk and the weight are upcast BEFORE the matmul. Logits computed
  in bf16 and upcast afterwards give gradient errors of several percent (Liger #1432,
  PEERS.md #4). Gradients are accumulated in the compute dtype and cast to the input dtypes
  once, in backward, after the grad_output scaling.
- logit scale, soft-capping and the vocab cut are applied inside the chunk, exactly as
  `LMHead.logits` does on full logits (the gradient goes through the tanh).
- the teacher gets no gradient; autocast is off inside.
- no host synchronisation per chunk: chunk boundaries are Python ints known up front (the
  mask selects rows once, before the loop) and the running sums stay on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlm.losses.divergences import get_divergence, per_position_divergence
from kdlm.losses.objective import STUDENT_TERMS, LMHead, Term, ce_sum, check_coefficients, coefficient_sum
from kdlm.losses.sparse import SparseTeacher, sparse_term_sums

# Key of the weighted total in `fused_sums`' result: the only entry that carries a gradient.
TOTAL_KEY = "__total__"

# Default byte budget for the [rows, V] buffers of one chunk. At V = 49k (forward_kl, fp32:
# 136 rows per chunk) the fused loss's extra peak is ~0.65 GiB whatever N: 9% of the naive
# loss at 4k tokens, 5% at 8k, and never slower (benchmarks/results/loss_memory.md).
DEFAULT_CHUNK_BYTES = 256 * 2**20

# How many [rows, V] buffers (compute dtype) are alive at the peak of one chunk, K. Measured
# as peak-RSS increase / (rows x V x itemsize) for one chunk of 256 rows x 131,072 vocab,
# forward + backward, and rounded UP:
# - always 2: the student logits and the gradient w.r.t. them;
#   +1 the teacher logits (any divergence term), +1 soft-capping (the tanh kept for the
#   chain rule), +1 several terms (their gradients are summed into one accumulator);
# - plus the largest term's own graph and backward temporaries (log-softmaxes, exp, the
#   where()-masked copies of _kl, the mixture of jsd/skew, ...). Terms are differentiated one
#   after another and each graph is freed before the next is built, so the max counts, not
#   the sum. Totals measured: ce 3.8, forward/reverse_kl 9.0, tvd 6.8, jsd 13.5,
#   skew_*_kl 12.3; forward_kl + softcap 10.0; [ce, forward_kl] 10.0; [ce, jsd] + softcap 15.5.
_BASE_BUFFERS = 2
_TERM_BUFFERS = {
    "ce": 2,
    "redi": 2,  # ce with per-token coefficients: the same [n, V] buffers, plus [n] vectors
    "forward_kl": 7,
    "reverse_kl": 7,
    "tvd": 4,
    "jsd": 11,
    "skew_forward_kl": 10,
    "skew_reverse_kl": 10,
    # taid: forward_kl's buffers plus its detached target log p_t, alive through the KL. Measured by
    # the method above: 10.25 in total (the same script gave forward_kl 9.31, jsd 13.75, ce 4.00,
    # tvd 7.00 on that machine, ~0.25 above the figures listed), so K = 11 = 2 + 1 + 8.
    "taid": 8,
    "pg": 2,  # MiniLLM's policy-gradient term: ce with per-token coefficients A_t * w_t, like redi
}
_UNKNOWN_TERM_BUFFERS = 11  # a divergence registered elsewhere: assume the largest built-in


def chunk_buffers(term_names: Sequence[str], *, softcap: bool = False) -> int:
    """K: how many [rows, V] buffers of the compute dtype are alive at a chunk's peak.

    _BASE_BUFFERS (+1 teacher logits if a term is a divergence, +1 with soft-capping, +1 with
    several terms) plus the largest term's own count. forward_kl alone: K = 2 + 1 + 7 = 10.
    """
    needs_teacher = any(name not in STUDENT_TERMS for name in term_names)
    buffers = _BASE_BUFFERS + int(needs_teacher) + int(softcap) + int(len(term_names) > 1)
    return buffers + max((_TERM_BUFFERS.get(name, _UNKNOWN_TERM_BUFFERS) for name in term_names), default=0)


def chunk_rows(
    vocab: int,
    term_names: Sequence[str],
    *,
    dtype: torch.dtype = torch.float32,
    softcap: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> int:
    """Rows per chunk: max(1, chunk_bytes // (vocab * itemsize * K)), K = chunk_buffers(...).

    itemsize is that of the compute dtype: 4 for fp32 (bf16 inputs too), 8 for fp64. Not in
    the budget: the grad accumulators and upcast weight copies ([V, H] each, whatever N is).
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, chunk_bytes // (vocab * itemsize * chunk_buffers(term_names, softcap=softcap)))


# ----------------------------------------------------------------------------- one chunk


def _head_logits(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], scale: float, softcap: Optional[float]
) -> tuple[Tensor, Optional[Tensor]]:
    """Logits of one chunk in the dtype of `weight` (already cut to the vocab and upcast).

    hidden [n, H] (any dtype), weight [V, H], bias [V] -> (logits [n, V], tanh [n, V] or None).
    Same operations, in the same order, as LMHead.logits: (h W^T + b) * scale, then
    softcap * tanh(x / softcap). In place, to keep one buffer; `tanh` is returned for the
    chain rule d logits / d z = scale * (1 - tanh^2).
    """
    logits = F.linear(hidden.to(weight.dtype), weight, bias)  # [n, V], upcast BEFORE the matmul
    if scale != 1.0:
        logits.mul_(scale)
    if softcap is None:
        return logits, None
    tanh = logits.div_(softcap).tanh_()  # [n, V]: tanh(x / softcap), same storage
    return tanh * softcap, tanh  # new [n, V] logits buffer, tanh kept


def _term_sum(student_logits: Tensor, teacher_logits: Union[Tensor, SparseTeacher, None], targets: Optional[Tensor],
              term: Term, coefficient: Optional[Tensor]) -> Tensor:
    """One term's SUM over the chunk's rows (0-dim), each row's value times its `coefficient` [n] when given,
    exactly as objective.term_sums (dense teacher logits) or sparse.sparse_term_sums (a cached top-k teacher)
    computes it."""
    if isinstance(teacher_logits, SparseTeacher):
        coefficients = coefficient.unsqueeze(0) if coefficient is not None else None  # [1, n]
        return sparse_term_sums(student_logits, teacher_logits, targets, [term], coefficients=coefficients)[term.label]
    if term.name in STUDENT_TERMS:
        return ce_sum(student_logits, targets, coefficient)
    per_position = per_position_divergence(
        student_logits, teacher_logits, term.name, temperature=term.temperature, beta=term.beta, skew=term.skew
    )  # [n]
    return coefficient_sum(per_position, coefficient) * term.temperature**2


@dataclass(frozen=True)
class _Plan:
    """Everything non-tensor about one fused call."""

    terms: tuple[Term, ...]
    vocab: int
    student_scale: float
    student_softcap: Optional[float]
    teacher_scale: float
    teacher_softcap: Optional[float]
    rows_per_chunk: int


class _FusedLMHeadLoss(torch.autograd.Function):
    """sum_k weight_k * term_k over all rows, its gradient computed chunk by chunk in forward.

    Returns (total 0-dim, values [num_terms]); `values` are the unweighted per-term sums and
    carry no gradient. backward = stored gradients x grad_output.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden: Tensor,  # [N, H_s]
        student_weight: Tensor,  # [V_s, H_s], V_s >= vocab
        student_bias: Optional[Tensor],  # [V_s] or None
        teacher_hidden: Optional[Tensor],  # [N, H_t] or None
        teacher_weight: Optional[Tensor],  # [V_t, H_t] or None
        teacher_bias: Optional[Tensor],  # [V_t] or None
        targets: Optional[Tensor],  # [N] long or None
        plan: _Plan,
        sparse: Optional[SparseTeacher] = None,  # a cached top-k teacher [N, k] instead of hidden states
        coefficients: Optional[Tensor] = None,  # [K, N] per-term token coefficients (compute dtype), or None
    ) -> tuple[Tensor, Tensor]:
        vocab, n_rows = plan.vocab, student_hidden.shape[0]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and student_bias is not None
        need_grad = need_hidden or need_weight or need_bias
        # compute dtype: fp32 at least (bf16 -> fp32), fp64 stays fp64
        dtype = torch.promote_types(torch.promote_types(student_hidden.dtype, student_weight.dtype), torch.float32)
        device = student_hidden.device

        with torch.autocast(device_type=device.type, enabled=False):
            # cut to the shared vocabulary and upcast ONCE (no copy when already fp32)
            weight_s = student_weight[:vocab].to(dtype)  # [V, H_s]
            bias_s = student_bias[:vocab].to(dtype) if student_bias is not None else None  # [V]
            weight_t = teacher_weight[:vocab].detach().to(dtype) if teacher_weight is not None else None  # [V, H_t]
            bias_t = teacher_bias[:vocab].detach().to(dtype) if teacher_bias is not None else None  # [V]

            values = torch.zeros(len(plan.terms), dtype=dtype, device=device)  # [num_terms] running sums
            # gradient accumulators in the compute dtype: summing bf16 partial grads would lose bits
            grad_hidden = torch.zeros(n_rows, student_hidden.shape[1], dtype=dtype, device=device) if need_hidden else None
            grad_weight = torch.zeros_like(weight_s) if need_weight else None  # [V, H_s]
            grad_bias = torch.zeros(vocab, dtype=dtype, device=device) if need_bias else None  # [V]

            for start in range(0, n_rows, plan.rows_per_chunk):
                rows = slice(start, min(start + plan.rows_per_chunk, n_rows))
                hidden_c = student_hidden[rows].to(dtype)  # [n, H_s]
                student_logits, tanh = _head_logits(hidden_c, weight_s, bias_s, plan.student_scale, plan.student_softcap)
                teacher_logits = None
                if sparse is not None:  # rows are independent: a slice of the top-k signal is this chunk's teacher
                    teacher_logits = sparse.slice_rows(rows.start, rows.stop)
                elif weight_t is not None:
                    teacher_logits, _ = _head_logits(
                        teacher_hidden[rows].detach(), weight_t, bias_t, plan.teacher_scale, plan.teacher_softcap
                    )  # [n, V], no grad
                targets_c = targets[rows] if targets is not None else None  # [n]
                coefficients_c = coefficients[:, rows] if coefficients is not None else None  # [K, n]

                # d total / d student_logits, one term at a time: each term's graph is freed
                # before the next one is built, so only one term's buffers are alive at once
                leaf = student_logits.detach().requires_grad_(need_grad)  # [n, V], shares storage
                grad_logits = None  # [n, V]
                for k, term in enumerate(plan.terms):
                    with torch.enable_grad():
                        term_sum = _term_sum(leaf, teacher_logits, targets_c, term,
                                             coefficients_c[k] if coefficients_c is not None else None)  # 0-dim
                    values[k] += term_sum.detach()
                    if not need_grad or term.weight == 0:
                        continue
                    (grad,) = torch.autograd.grad(term_sum, leaf)  # [n, V]; the term's graph is freed
                    grad = grad.contiguous()  # (a custom divergence may give an expanded grad; we write into it)
                    if grad_logits is None:
                        grad_logits = grad.mul_(term.weight) if term.weight != 1 else grad
                    else:
                        grad_logits.add_(grad, alpha=term.weight)
                    del grad, term_sum
                del leaf, student_logits, teacher_logits
                if grad_logits is None:  # no gradient wanted, or every weight is 0
                    continue

                # chain rule through logits = softcap * tanh(scale * z / softcap):
                # d logits / d z = scale * (1 - tanh^2), built in the tanh buffer (no new [n, V])
                if tanh is not None:
                    grad_z = tanh.square_().neg_().add_(1.0).mul_(grad_logits)  # [n, V]
                    del tanh, grad_logits
                else:
                    grad_z = grad_logits  # [n, V]
                if plan.student_scale != 1.0:
                    grad_z.mul_(plan.student_scale)
                if need_hidden:
                    grad_hidden[rows] = grad_z @ weight_s  # [n, H_s]
                if need_weight:
                    grad_weight.addmm_(grad_z.T, hidden_c)  # [V, H_s] += [V, n] @ [n, H_s]
                if need_bias:
                    grad_bias += grad_z.sum(0)  # [V]
                del grad_z

        # The grads stay in the compute dtype until backward: the grad_output scaling (1/count,
        # a loss scale, ...) must happen BEFORE the one rounding to bf16, or bf16 grads are
        # rounded twice (~2x the error). Padding rows beyond `vocab` get exactly 0.
        pad = student_weight.shape[0] - vocab
        if grad_weight is not None and pad > 0:
            grad_weight = F.pad(grad_weight, (0, 0, 0, pad))  # [V_s, H_s]
        if grad_bias is not None and pad > 0:
            grad_bias = F.pad(grad_bias, (0, pad))  # [V_s]
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.input_dtypes = (
            student_hidden.dtype, student_weight.dtype, student_bias.dtype if student_bias is not None else None
        )

        weights = torch.tensor([term.weight for term in plan.terms], dtype=dtype, device=device)
        total = (weights * values).sum()  # 0-dim: sum_k weight_k * sum_k
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(ctx, grad_total: Tensor, grad_values: Optional[Tensor]):
        # The stored grads are d total / d input (compute dtype): scale them by d loss / d total
        # IN PLACE (no second [V, H] buffer; Liger does the same), then cast to the input dtypes
        # (one rounding). In place means the graph cannot be backpropagated twice.
        if getattr(ctx, "backward_done", False):
            raise RuntimeError("the fused LM-head loss cannot be backpropagated twice (retain_graph=True)")
        ctx.backward_done = True
        scaled = [
            grad.mul_(grad_total).to(dtype) if grad is not None else None
            for grad, dtype in zip(ctx.saved_tensors, ctx.input_dtypes)
        ]
        return (*scaled, None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------- validation


def _check_softcap(softcap: Optional[float], side: str) -> Optional[float]:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"{side} softcap must be None or a finite number > 0, got {softcap!r}")
    return float(softcap)


def _check_scale(scale: float, side: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{side} logit scale must be a finite number, got {scale!r}")
    return float(scale)


def _check_terms(terms: Sequence[Term]) -> tuple[Term, ...]:
    if len(terms) == 0:
        raise ValueError("terms is empty: nothing to compute")
    labels = [term.label for term in terms]
    if len(set(labels)) != len(labels):
        raise ValueError(f"term labels must be unique, got {labels}")
    if TOTAL_KEY in labels:
        raise ValueError(f"{TOTAL_KEY!r} is reserved for the weighted total")
    for term in terms:
        if term.name not in STUDENT_TERMS:
            get_divergence(term.name)  # ValueError listing the valid kinds
            if not 0 <= term.beta <= 1:
                raise ValueError(f"term {term.label!r}: beta must be in [0, 1], got {term.beta}")
            if not 0 <= term.skew < 1:
                raise ValueError(f"term {term.label!r}: skew must be in [0, 1), got {term.skew}")
        if not (math.isfinite(term.temperature) and term.temperature > 0):
            raise ValueError(f"term {term.label!r}: temperature must be > 0, got {term.temperature}")
        if not math.isfinite(term.weight):
            raise ValueError(f"term {term.label!r}: weight must be finite, got {term.weight}")
    return tuple(terms)


def _check_head(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], vocab: int, side: str) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"{side} hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{side} hidden size {hidden.shape[1]} does not match its head weight {tuple(weight.shape)} ([V, H])"
        )
    if not 0 < vocab <= weight.shape[0]:
        raise ValueError(f"vocab {vocab} must be in [1, {weight.shape[0]}] (the {side} head has {weight.shape[0]} rows)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{side} bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


def _fused_total_and_values(
    student_hidden: Tensor,
    student_head: LMHead,
    teacher_hidden: Optional[Tensor],
    teacher_head: Optional[LMHead],
    targets: Optional[Tensor],
    terms: Sequence[Term],
    chunk_bytes: int,
    coefficients: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Validate, plan the chunks, run the fused Function. Rows are the counted rows already."""
    terms = _check_terms(terms)
    vocab = student_head.vocab
    _check_head(student_hidden, student_head.weight, student_head.bias, vocab, "student")
    n_rows = student_hidden.shape[0]
    check_coefficients(coefficients, terms, n_rows)
    sparse = teacher_hidden if isinstance(teacher_hidden, SparseTeacher) else None
    if sparse is not None:
        if sparse.ids.shape[0] != n_rows:
            raise ValueError(f"student has {n_rows} rows but the sparse teacher {sparse.ids.shape[0]}")
        teacher_hidden = teacher_head = None
    elif any(term.needs_teacher for term in terms):
        if teacher_hidden is None or teacher_head is None:
            raise ValueError("a divergence term needs teacher_hidden and the teacher head")
        if teacher_head.vocab != vocab:
            raise ValueError(f"student and teacher vocab differ: {vocab} vs {teacher_head.vocab}")
        _check_head(teacher_hidden, teacher_head.weight, teacher_head.bias, vocab, "teacher")
        if teacher_hidden.shape[0] != n_rows:
            raise ValueError(f"student has {n_rows} rows but teacher {teacher_hidden.shape[0]}")
    else:  # ce only: never run the teacher head
        teacher_hidden = teacher_head = None
    if any(term.name in STUDENT_TERMS for term in terms):
        if targets is None:
            raise ValueError(f"a {'/'.join(STUDENT_TERMS)} term needs targets")
        if tuple(targets.shape) != (n_rows,) or targets.dtype != torch.long:
            raise ValueError(f"targets must be [{n_rows}] long, got {tuple(targets.shape)} {targets.dtype}")
    else:
        targets = None

    # LMHead treats a falsy softcap (None or 0) as "no soft-capping"
    student_softcap = _check_softcap(student_head.softcap or None, "student")
    teacher_softcap = _check_softcap(teacher_head.softcap or None, "teacher") if teacher_head is not None else None
    dtype = torch.promote_types(torch.promote_types(student_hidden.dtype, student_head.weight.dtype), torch.float32)
    if coefficients is not None:
        coefficients = coefficients.detach().to(dtype)  # [K, N]: data, never differentiated
    plan = _Plan(
        terms=terms,
        vocab=vocab,
        student_scale=_check_scale(student_head.scale, "student"),
        student_softcap=student_softcap,
        teacher_scale=_check_scale(teacher_head.scale, "teacher") if teacher_head is not None else 1.0,
        teacher_softcap=teacher_softcap,
        rows_per_chunk=chunk_rows(
            vocab, [term.name for term in terms], dtype=dtype, softcap=student_softcap is not None,
            chunk_bytes=chunk_bytes,
        ),
    )
    return _FusedLMHeadLoss.apply(
        student_hidden,
        student_head.weight,
        student_head.bias,
        teacher_hidden,
        teacher_head.weight if teacher_head is not None else None,
        teacher_head.bias if teacher_head is not None else None,
        targets,
        plan,
        sparse,
        coefficients,
    )


# ----------------------------------------------------------------------------- public entry points


def fused_sums(
    student_hidden: Tensor,
    student_head: LMHead,
    teacher_hidden: Union[Tensor, SparseTeacher, None],
    teacher_head: Optional[LMHead],
    targets: Optional[Tensor],
    terms: Sequence[Term],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    coefficients: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """Fused `objective.term_sums`: per-term sums over counted rows, one chunk loop for all terms.

    student_hidden [N, H_s] and teacher_hidden [N, H_t] are the counted rows (any dtype);
    targets [N] long for a ce or redi term; coefficients [K, N] the per-term token coefficients
    (`objective.token_coefficients`; None: all 1). Each chunk's logits are computed once for all terms.
    teacher_hidden may instead be a `SparseTeacher` (an offline top-k cache; teacher_head None):
    each chunk then uses its rows of the cached signal, as `sparse.sparse_term_sums` does.

    Returns {label: sum_k (0-dim, DETACHED, for logging), TOTAL_KEY: sum_k weight_k * sum_k}.
    Only the TOTAL_KEY entry carries the graph: the chunk loop accumulates the gradient of the
    weighted total, not one gradient per term (that would need one [V, H] accumulator per term).
    So backprop `sums[TOTAL_KEY] / global_count`, not `weighted_total(sums, terms)`. Values and
    the gradient of the total equal term_sums(student_head.logits(student_hidden),
    teacher_head.logits(teacher_hidden), targets, terms, coefficients=coefficients) and weighted_total of it.
    A divergence sum is T^2 * sum_n D(p_T,n || p_S,n); ce is sum_n -log p_S,n(target_n) (T ignored).
    """
    total, values = _fused_total_and_values(
        student_hidden, student_head, teacher_hidden, teacher_head, targets, terms, chunk_bytes, coefficients
    )
    sums = {term.label: values[k] for k, term in enumerate(terms)}
    sums[TOTAL_KEY] = total
    return sums


def fused_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Optional[Tensor],
    teacher_weight: Optional[Tensor],
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    mask: Optional[Tensor] = None,
    targets: Optional[Tensor] = None,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    logit_scale: tuple[float, float] = (1.0, 1.0),
    softcap: tuple[Optional[float], Optional[float]] = (None, None),
    vocab: Optional[int] = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Tensor:
    """`divergence(head_s(student_hidden), head_t(teacher_hidden), kind, ...)` without the [N, V] logits.

    head(h) = softcap * tanh((h @ W.T + b) * scale / softcap), cut to the first `vocab` columns
    (`logit_scale` and `softcap` are (student, teacher) pairs; a softcap of None = no capping).

    Divergence kinds: T^2 * sum_{counted n} D(p_T,n || p_S,n) / max(count, 1), like `divergence`.
    kind="ce": cross-entropy of the student against `targets` (same leading shape as the hidden
    states), mean over counted positions whose target is not -100, like F.cross_entropy;
    temperature/beta/skew and the teacher arguments (may be None) are ignored.

    student_hidden [..., H_s], teacher_hidden [..., H_t] (same leading dims; hidden sizes may
    differ), weights [V_rows, H] with V_rows >= vocab (None: both heads' row counts, which must
    match), mask: bool over the leading dims, True = counted. Gradients reach student_hidden,
    student_weight and student_bias only. No counted position -> exactly 0, zero gradients.
    Returns a 0-dim tensor, fp32 (fp64 for fp64 inputs).
    """
    if not (isinstance(logit_scale, (tuple, list)) and len(logit_scale) == 2):
        raise ValueError(f"logit_scale must be a (student, teacher) pair, got {logit_scale!r}")
    if not (isinstance(softcap, (tuple, list)) and len(softcap) == 2):
        raise ValueError(f"softcap must be a (student, teacher) pair of None or numbers > 0, got {softcap!r}")
    student_softcap, teacher_softcap = _check_softcap(softcap[0], "student"), _check_softcap(softcap[1], "teacher")
    is_ce = kind == "ce"
    if not is_ce:
        get_divergence(kind)  # ValueError listing the valid kinds
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError(f"kind {kind!r} needs teacher_hidden and teacher_weight")
        if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
            raise ValueError(
                f"student and teacher hidden states must share their leading dims, got "
                f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}"
            )
    if student_hidden.dim() < 1 or student_weight.dim() != 2:
        raise ValueError(f"hidden must be [..., H] and weight [V, H], got {tuple(student_hidden.shape)} and "
                         f"{tuple(student_weight.shape)}")
    if is_ce and (targets is None or targets.shape != student_hidden.shape[:-1]):
        raise ValueError(
            f"kind 'ce' needs targets of shape {tuple(student_hidden.shape[:-1])}, got "
            f"{None if targets is None else tuple(targets.shape)}"
        )
    if vocab is None:
        if not is_ce and teacher_weight.shape[0] != student_weight.shape[0]:
            raise ValueError(
                f"student and teacher heads have {student_weight.shape[0]} and {teacher_weight.shape[0]} rows: "
                f"pass vocab= (the shared vocabulary size)"
            )
        vocab = student_weight.shape[0]

    # select the counted rows ONCE (the only host sync); everything after is per chunk
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != student_hidden.shape[:-1]:
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(student_hidden.shape[:-1])}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        student_rows = student_hidden[mask]  # [N, H_s]
        teacher_rows = teacher_hidden[mask] if not is_ce else None  # [N, H_t]
        targets = targets[mask] if is_ce else None  # [N]
    else:
        student_rows = student_hidden.reshape(-1, student_hidden.shape[-1])
        teacher_rows = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) if not is_ce else None
        targets = targets.reshape(-1) if is_ce else None

    term = Term(label=kind, name=kind, weight=1.0, temperature=1.0 if is_ce else temperature, beta=beta, skew=skew)
    student_head = LMHead(student_weight, student_bias, vocab, logit_scale[0], student_softcap)
    teacher_head = None if is_ce else LMHead(teacher_weight, teacher_bias, vocab, logit_scale[1], teacher_softcap)
    total, _ = _fused_total_and_values(
        student_rows, student_head, teacher_rows, teacher_head, targets, [term], chunk_bytes
    )  # 0-dim: T^2 * sum over rows
    if is_ce:
        # like F.cross_entropy(reduction="mean"): rows with target -100 are not counted; the
        # count stays a device tensor (no sync), clamped so that an empty selection gives 0
        count = (targets != -100).sum().clamp(min=1)
        return total / count
    return total / max(student_rows.shape[0], 1)
