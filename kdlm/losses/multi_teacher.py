"""Multi-teacher KD: several teachers' signals pooled into one objective.

A recipe with `teachers:` (each with a name and a weight w_k) turns every divergence term into one term per
teacher, logged as `<term>@<teacher>`; `loss.teacher_pooling` says how they combine:

- mixture: sum_k w_k D(p_k, q). With D = forward KL this is KL(p_mix || q) + const, p_mix = sum_k w_k p_k:
  sum_k w_k sum_v p_k log(p_k / q) = -sum_v p_mix log q + sum_k w_k sum_v p_k log p_k, and the last sum does
  not depend on the student. So the gradient is exactly that of the KL to the arithmetic mixture, and each
  teacher's part is still logged on its own.
- geometric: sum_k w_k KL(q || p_k) = KL(q || p_geo) - log Z, p_geo = prod_k p_k^w_k / Z (reverse KL terms):
  sum_k w_k sum_v q log(q / p_k) = sum_v q log q - sum_v q log prod_k p_k^w_k. The student is pulled to the
  tokens every teacher finds likely (a product of experts).
- min_ce: per example, only the teacher with the lowest cross-entropy on the example's reference tokens counts
  (FuseLLM's MinCE): the target is that teacher's distribution.
- domain: per example, the teacher whose `domains` list the example's domain (data.domain_field).

min_ce and domain are per-example one-hot coefficients on the per-teacher terms (`selection`); mixture and
geometric are the weights w_k in the terms' weights. `pooled_target` returns the distribution each pooling
pulls the student towards, for tests and for reading a run.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor

from kdlm.losses.objective import Term

POOLINGS = ("mixture", "geometric", "min_ce", "domain")


def normalised_weights(weights: Sequence[float]) -> list[float]:
    """w_k / sum_j w_j."""
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def expand_terms(terms: Sequence[Term], names: Sequence[str], weights: Sequence[float], pooling: str) -> list[Term]:
    """One copy of each teacher-dependent term per teacher, labelled `<label>@<name>` and bound to it
    (`Term.teacher`). mixture / geometric scale each copy's weight by the normalised w_k; min_ce / domain keep
    the term's weight (the per-example selection picks one teacher per example). Student-only terms stay once."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown teacher pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
    w = normalised_weights(weights)
    out: list[Term] = []
    for term in terms:
        if not term.needs_teacher:
            out.append(term)
            continue
        for name, wk in zip(names, w):
            weight = term.weight * wk if pooling in ("mixture", "geometric") else term.weight
            out.append(dataclasses.replace(term, label=f"{term.label}@{name}", weight=weight, teacher=name))
    return out


def example_mean_ce(token_logprobs: Tensor, example: Tensor, num_examples: int) -> Tensor:
    """[E]: each example's mean cross-entropy -mean log p(y_t) over its counted tokens (`example` [N] in 0..E-1);
    +inf for an example without counted tokens."""
    total = torch.zeros(num_examples, dtype=torch.float64, device=token_logprobs.device)
    count = torch.zeros_like(total)
    total.index_add_(0, example, -token_logprobs.double())
    count.index_add_(0, example, torch.ones_like(token_logprobs, dtype=torch.float64))
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("inf")))


def selection(pooling: str, *, example: Tensor, num_teachers: int, example_ce: Optional[Tensor] = None,
              route: Optional[Tensor] = None) -> Optional[Tensor]:
    """[K, N] one-hot per counted token: which teacher's terms count for the token's example (min_ce: the teacher
    with the lowest example CE, ties to the first; domain: `route` [N], the routed teacher per token).
    None for mixture / geometric (every teacher counts, by its weight)."""
    if pooling in ("mixture", "geometric"):
        return None
    if pooling == "min_ce":
        if example_ce is None:
            raise ValueError("min_ce pooling needs each teacher's per-example CE ([K, E])")
        chosen = example_ce.argmin(0)[example]  # [N]
    elif pooling == "domain":
        if route is None:
            raise ValueError("domain pooling needs the routed teacher of every token")
        chosen = route
    else:
        raise ValueError(f"unknown teacher pooling {pooling!r}")
    teachers = torch.arange(num_teachers, device=chosen.device).unsqueeze(1)  # [K, 1]
    return teachers == chosen.unsqueeze(0)  # [K, N] bool


def pooled_target(teacher_logprobs: Tensor, pooling: str, *, weights: Optional[Sequence[float]] = None,
                  example_ce: Optional[Tensor] = None, example: Optional[Tensor] = None,
                  route: Optional[Tensor] = None) -> Tensor:
    """The log-distribution [N, V] the pooled objective pulls the student towards.

    teacher_logprobs: [K, N, V] each teacher's log-probabilities at N positions. mixture: log sum_k w_k p_k;
    geometric: log softmax(sum_k w_k log p_k); min_ce: per position, the log p of its example's lowest-CE teacher
    (example_ce [K, E], example [N]); domain: of the routed teacher (route [N])."""
    k = teacher_logprobs.shape[0]
    w = torch.tensor(normalised_weights(weights if weights is not None else [1.0] * k),
                     dtype=teacher_logprobs.dtype, device=teacher_logprobs.device).view(k, 1, 1)
    if pooling == "mixture":
        return torch.logsumexp(teacher_logprobs + w.log(), dim=0)
    if pooling == "geometric":
        return torch.log_softmax((w * teacher_logprobs).sum(0), dim=-1)
    if example is None and pooling == "min_ce":
        raise ValueError("min_ce pooling needs `example` (which example each position belongs to)")
    chosen = selection(pooling, example=example if example is not None else route, num_teachers=k,
                       example_ce=example_ce, route=route)  # [K, N]
    return (chosen.unsqueeze(-1).to(teacher_logprobs.dtype) * teacher_logprobs.nan_to_num(neginf=-1e30)).sum(0)
