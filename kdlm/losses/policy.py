"""MiniLLM's policy-gradient pieces for on-policy distillation: rewards, returns, importance weights.

Pure tensor functions of per-token quantities; no trainer state, no model calls.

Setting (MiniLLM, Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models").
Completions y = (y_1 .. y_T) are sampled from the student q_theta, or from the teacher-mixed
proposal p~(.|y<t) = alpha * p(.|y<t) + (1 - alpha) * q(.|y<t) (alpha = 0.2 in MiniLLM). The
objective is the reverse KL of sequences, KL(q || p) = E_{y~q}[log q(y) - log p(y)]. With the
per-token reward and the sum of the later rewards

    r_t     = log p(y_t | y<t) - log q(y_t | y<t)                  # `rewards`
    R_{t+1} = sum_{t' > t} r_t'                                    # `returns` (0 at the last token)

its gradient splits exactly (causality drops the rewards before t; the t' = t part is the
per-step KL's gradient) into

    grad KL(q || p) = E_{y~q} [ sum_t grad KL(q(.|y<t) || p(.|y<t))     # single-step part
                                - sum_t R_{t+1} grad log q(y_t | y<t) ]  # long-term part

The single-step part is exact over the whole vocabulary at each sampled prefix: the existing
`reverse_kl` term. The long-term part is the term `pg`: value -log q(y_t) per token (like `ce`),
coefficient c_t = A_t * w_t (detached, `pg_coefficients`), so that
grad sum_t c_t * (-log q(y_t)) = -sum_t A_t w_t grad log q(y_t), A_t = R_{t+1}.

Under the mixture, w_t = q(y_t|y<t) / p~(y_t|y<t) (`importance_weights`). Exact importance
sampling needs the product of the ratios over the prefix; MiniLLM uses the per-token ratio (an
approximation; exact for one-step sequences). MiniLLM also normalises the return by the number
of later tokens (`length_normalise`) and clips the ratio PPO-style (`clip`, epsilon = 0.2).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from kdlm.losses.divergences import _log_mixture


def rewards(teacher_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
    """Per-token reward r_t = log p(y_t | y<t) - log q(y_t | y<t), detached.

    teacher_logprobs, student_logprobs: [N], the two models' log-probabilities of the sampled
    tokens (gathered at y_t, at temperature 1). Returns [N] in their promoted dtype.
    """
    if teacher_logprobs.shape != student_logprobs.shape:
        raise ValueError(f"teacher and student log-probs must have the same shape, got "
                         f"{tuple(teacher_logprobs.shape)} and {tuple(student_logprobs.shape)}")
    return (teacher_logprobs.detach() - student_logprobs.detach())  # [N]


def _segments(example: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """(segment of each token [N], position in its segment [N], segment lengths [G]) for contiguous runs."""
    if example.dim() != 1 or example.shape[0] != n:
        raise ValueError(f"example must be [{n}] (one id per token), got {tuple(example.shape)}")
    _, segment, lengths = torch.unique_consecutive(example, return_inverse=True, return_counts=True)
    if lengths.shape[0] != torch.unique(example).shape[0]:
        raise ValueError("each sequence's tokens must be contiguous in `example` (an id occurs in two separate runs)")
    starts = torch.cumsum(lengths, 0) - lengths  # [G]
    position = torch.arange(n, device=example.device) - starts[segment]  # [N]
    return segment, position, lengths


def returns(rewards: Tensor, example: Tensor, *, length_normalise: bool) -> Tensor:
    """R_{t+1} per token: the sum of the rewards of the LATER tokens of the same sequence.

    rewards: [N] tokens of several sequences laid out in order, each sequence contiguous and in
    time order; example: [N] long, which sequence each token belongs to (ids need not be dense or
    sorted, only contiguous). Returns [N]: R_{t+1} = sum_{t' > t} r_t', 0 at a sequence's last token.
    length_normalise: divide by the number of later tokens, T - t, i.e. the MEAN of the future
    rewards (0 where there is none) - MiniLLM's length normalisation.

    Vectorised: the rewards are laid into a [sequences, max length] table (zero padded) and each
    row gets an exclusive reverse cumulative sum, so no sum crosses a sequence boundary (no
    cancellation between sequences, exact zeros at the ends).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N], got {tuple(rewards.shape)}")
    n = rewards.shape[0]
    if n == 0:
        return rewards.clone()
    segment, position, lengths = _segments(example, n)
    table = rewards.new_zeros(lengths.shape[0], int(lengths.max()) + 1)  # [G, L + 1], last column stays 0
    table[segment, position] = rewards
    suffix = table.flip(-1).cumsum(-1).flip(-1)  # [G, L + 1]: sum_{t' >= t} r_t'
    future = suffix[segment, position + 1]  # [N]: sum_{t' > t} r_t' (the padding adds exact zeros)
    if not length_normalise:
        return future
    later = (lengths[segment] - position - 1).to(rewards.dtype)  # [N]: T - t later tokens
    return torch.where(later > 0, future / later.clamp(min=1), torch.zeros_like(future))


def importance_weights(student_logprobs: Tensor, behavior_logprobs: Tensor) -> Tensor:
    """w_t = q(y_t | y<t) / p~(y_t | y<t) = exp(log q - log p~), detached.

    student_logprobs: [N] log q of the sampled tokens; behavior_logprobs: [N] log-probability of
    the same tokens under the distribution they were drawn from (p~, e.g. `mixture_logprobs`;
    log q itself for pure on-policy sampling, where w = 1). Returns [N].
    """
    if student_logprobs.shape != behavior_logprobs.shape:
        raise ValueError(f"student and behaviour log-probs must have the same shape, got "
                         f"{tuple(student_logprobs.shape)} and {tuple(behavior_logprobs.shape)}")
    return torch.exp(student_logprobs.detach() - behavior_logprobs.detach())  # [N]


def mixture_logprobs(teacher_logprobs: Tensor, student_logprobs: Tensor, *, alpha: float) -> Tensor:
    """log p~ = log(alpha * p + (1 - alpha) * q), elementwise in log space, detached (MiniLLM: alpha = 0.2).

    Works on full distributions [..., V] (to sample from p~) or on gathered token log-probs [N]
    (the behaviour log-probs of `importance_weights`). Exact at alpha = 0 (q) and alpha = 1 (p).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return _log_mixture(teacher_logprobs.detach(), student_logprobs.detach(), alpha)


def pg_coefficients(
    *,
    rewards: Tensor,
    example: Tensor,
    weights: Optional[Tensor],
    length_normalise: bool,
    clip: Optional[float],
) -> Tensor:
    """Per-token coefficients c_t of the `pg` term (value -log q(y_t)): c_t = A_t * w_t, detached.

    rewards: [N] r_t (`rewards`); example: [N] long, sequence of each token (see `returns`);
    weights: [N] importance weights w_t (`importance_weights`; None: all 1, pure on-policy);
    length_normalise: A_t is the mean instead of the sum of the later rewards; clip: PPO's
    epsilon (MiniLLM: 0.2) or None for no clipping. Returns [N] in the rewards' dtype.

    A_t = R_{t+1} = `returns(rewards, example, length_normalise=...)`. Without clipping the term's
    gradient is grad sum_t c_t (-log q(y_t)) = -sum_t A_t w_t grad log q(y_t), MiniLLM's long-term part.

    Clipping. PPO's per-token objective (to be maximised) with ratio rho and advantage A is
    min(rho * A, clamp(rho, 1 - eps, 1 + eps) * A). Here every sample is fresh and used for one
    update, so the ratio current / behaviour policy is the importance weight itself: rho = w
    (the "old" policy is the current one up to the mixture). Its gradient, as a loss:
      - where the unclipped branch is the min: -A * grad rho = -A * w * grad log q(y_t)  -> c_t = A w;
      - where the clipped branch is the min (a constant): 0                               -> c_t = 0.
    The clipped branch is strictly the min exactly where (A > 0 and w > 1 + eps) or (A < 0 and
    w < 1 - eps) (for A > 0 and w < 1 - eps the min is rho * A and the gradient flows; likewise for
    A < 0 and w > 1 + eps). Those tokens get c_t = 0; every other token keeps A_t * w_t.
    """
    advantage = returns(rewards.detach(), example, length_normalise=length_normalise)  # [N]
    if weights is None:
        w = torch.ones_like(advantage)
    else:
        if weights.shape != advantage.shape:
            raise ValueError(f"weights must be [{advantage.shape[0]}], got {tuple(weights.shape)}")
        w = weights.detach().to(advantage.dtype)  # [N]
    coefficients = advantage * w  # [N]
    if clip is None:
        return coefficients
    if not (math.isfinite(clip) and 0 < clip < 1):
        raise ValueError(f"clip must be None or in (0, 1), got {clip}")
    clipped = ((advantage > 0) & (w > 1 + clip)) | ((advantage < 0) & (w < 1 - clip))  # [N]
    return torch.where(clipped, torch.zeros_like(coefficients), coefficients)
