"""MiniLLM's policy-gradient pieces (kdlm.losses.policy) on a tiny autoregressive model.

The student q_theta and the teacher p are tables of logits indexed by (step t, previous token), over
V = 3 tokens and sequences of T = 3 tokens (BOS before the first): small enough to enumerate all 27
sequences, so the exact reverse KL of sequences, KL(q || p) = sum_y q(y) (log q(y) - log p(y)), and
its gradient (autograd, float64) are available, as is the EXACT expectation and variance of any
per-sequence estimator. The estimator under test is the one the trainer builds from kdlm's terms:

    loss(y) = sum_t reverse_kl(q(.|y<t) || p(.|y<t))        (term `reverse_kl`, full vocabulary)
            + sum_t c_t * (-log q(y_t | y<t))              (term `pg`, c = pg_coefficients(...))

computed with `objective.term_sums` and averaged over sampled sequences.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kdlm.losses.objective import Term, term_sums, weighted_total
from kdlm.losses.policy import importance_weights, mixture_logprobs, pg_coefficients, returns, rewards

V, T, BOS = 3, 3, 3
ALL = torch.tensor(list(itertools.product(range(V), repeat=T)))  # [27, T]: every sequence
TERMS = [Term("reverse_kl", "reverse_kl", 1.0, 1.0, 0.5, 0.1), Term("pg", "pg", 1.0, 1.0, 0.5, 0.1)]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _tables(seed: int = 0, steps: int = T):
    """Student table theta [steps, V+1, V] (learnable) and teacher table phi (fixed), float64."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(steps, V + 1, V, generator=g, dtype=torch.float64).requires_grad_()
    phi = 1.5 * torch.randn(steps, V + 1, V, generator=g, dtype=torch.float64)
    return theta, phi


def _step_logits(table: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logits of every step of sequences y [M, T'] -> [M, T', V]: row (t, previous token; BOS at t = 0)."""
    prev = torch.cat([torch.full_like(y[:, :1], BOS), y[:, :-1]], dim=1)  # [M, T']
    return table[torch.arange(y.shape[1]), prev]  # [M, T', V]


def _sequence_logprob(table: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log prob of each sequence [M] under a table."""
    logp = torch.log_softmax(_step_logits(table, y), -1)  # [M, T', V]
    return logp.gather(-1, y[..., None]).squeeze(-1).sum(-1)


def _exact_gradient(theta, phi, steps: int = T) -> torch.Tensor:
    y = torch.tensor(list(itertools.product(range(V), repeat=steps)))
    log_q, log_p = _sequence_logprob(theta, y), _sequence_logprob(phi, y)
    kl = (log_q.exp() * (log_q - log_p)).sum()
    (grad,) = torch.autograd.grad(kl, theta)
    return grad


def _surrogate(theta, phi, y, sample_weight, *, pg: bool = True, kl_weight=None, pg_weight=None):
    """sum_m sample_weight_m * loss(y_m) built from kdlm's terms (see the module docstring).

    y [M, T'] sequences; sample_weight [M] (1/M for a Monte-Carlo mean, q(y) or p~(y) for an exact
    expectation); kl_weight / pg_weight [M, T'] optional per-token importance weights of the two terms.
    """
    m, steps = y.shape
    student_logits = _step_logits(theta, y).reshape(m * steps, V)  # [N, V]
    teacher_logits = _step_logits(phi, y).reshape(m * steps, V)
    targets = y.reshape(-1)  # [N]
    example = torch.arange(m).repeat_interleave(steps)  # [N]
    gather = lambda logits: torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)  # noqa: E731
    r = rewards(gather(teacher_logits), gather(student_logits))  # [N], detached
    weights = pg_weight.reshape(-1) if pg_weight is not None else None
    c = pg_coefficients(rewards=r, example=example, weights=weights, length_normalise=False, clip=None)
    per_token = sample_weight.detach().repeat_interleave(steps)  # [N]
    kl_c = per_token * (kl_weight.reshape(-1) if kl_weight is not None else 1.0)
    coefficients = torch.stack([kl_c, per_token * c if pg else torch.zeros_like(c)])  # [2, N]
    sums = term_sums(student_logits, teacher_logits, targets, TERMS, coefficients=coefficients)
    return weighted_total(sums, TERMS)


def _per_sequence_gradients(theta, phi, y, **kw) -> torch.Tensor:
    """g(y) [S, *theta.shape]: the gradient of loss(y) for each sequence separately."""
    out = []
    for i in range(y.shape[0]):
        one = {k: v[i : i + 1] if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        loss = _surrogate(theta, phi, y[i : i + 1], torch.ones(1, dtype=torch.float64), **one)
        (g,) = torch.autograd.grad(loss, theta)
        out.append(g)
    return torch.stack(out)


def _sample(theta, m: int, seed: int, phi=None, alpha: float = 0.0, steps: int = T) -> torch.Tensor:
    """m sequences [m, steps] from q_theta, or per step from p~ = alpha p + (1 - alpha) q (vectorised)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.empty(m, 0, dtype=torch.long)
    with torch.no_grad():
        for t in range(steps):
            prev = y[:, -1] if t else torch.full((m,), BOS)
            probs = torch.softmax(theta[t, prev], -1)  # [m, V]
            if alpha > 0:
                probs = alpha * torch.softmax(phi[t, prev], -1) + (1 - alpha) * probs
            y = torch.cat([y, torch.multinomial(probs, 1, generator=g)], dim=1)
    return y


# ----------------------------------------------------------------------------- (a) unbiasedness on-policy


def test_policy_gradient_estimator_is_unbiased_for_the_sequence_reverse_kl():
    """E_{y~q}[grad loss(y)] = grad KL(q || p) of sequences; the single-step part alone is biased.

    1. Exactly, by enumeration: sum_y q(y) g(y) equals the autograd gradient of the exact KL to 1e-10.
    2. Monte Carlo, M = 200,000 sequences from q (seed 0): each coordinate of the sampled mean is within
       4 standard errors of the exact gradient, SE = sqrt(Var_q[g] / M) with Var_q computed exactly by
       enumeration (plus 1e-12 for coordinates that are exactly 0 on both sides: unused table rows).
       Per coordinate a Gaussian |z| > 4 has probability 6e-5; the seed is fixed anyway.
    3. Without the pg term (single-step KL only) the expectation misses the long-term part: some
       coordinate of its exact expectation, and of its sampled mean, is more than 10 tolerances away.
    """
    theta, phi = _tables(seed=0)
    exact = _exact_gradient(theta, phi)
    q_all = _sequence_logprob(theta, ALL).exp().detach()  # [27]
    assert q_all.sum().item() == pytest.approx(1.0, abs=1e-12)

    g_all = _per_sequence_gradients(theta, phi, ALL)  # [27, ...]
    mean = torch.einsum("s,s...->...", q_all, g_all)
    torch.testing.assert_close(mean, exact, rtol=1e-10, atol=1e-12)
    (weighted,) = torch.autograd.grad(_surrogate(theta, phi, ALL, q_all), theta)  # the same through sample weights
    torch.testing.assert_close(weighted, exact, rtol=1e-10, atol=1e-12)

    m = 200_000
    se = ((torch.einsum("s,s...->...", q_all, g_all**2) - mean**2).clamp(min=0) / m).sqrt()
    y = _sample(theta, m, seed=0)
    (estimate,) = torch.autograd.grad(_surrogate(theta, phi, y, torch.full((m,), 1.0 / m, dtype=torch.float64)), theta)
    z = (estimate - exact).abs() / (4 * se + 1e-12)
    assert z.max() <= 1.0, f"max |error| / 4 SE = {z.max():.3f}"
    assert (exact.abs() > 10 * se).sum() >= 10  # the gradient is resolved, not lost in the noise

    # the single-step part alone is biased: its expectation (exact) and its sampled mean are both many
    # tolerances (4 SE of the full estimator) away from the exact gradient
    tolerance = 4 * se + 1e-12
    g_single = _per_sequence_gradients(theta, phi, ALL, pg=False)
    mean_single = torch.einsum("s,s...->...", q_all, g_single)
    assert ((mean_single - exact).abs() / tolerance).max() > 10
    (estimate_single,) = torch.autograd.grad(
        _surrogate(theta, phi, y, torch.full((m,), 1.0 / m, dtype=torch.float64), pg=False), theta)
    assert ((estimate_single - exact).abs() / tolerance).max() > 10


# ----------------------------------------------------------------------------- (b) teacher-mixed sampling


def test_importance_weights_are_q_over_the_mixture():
    g = torch.Generator().manual_seed(1)
    log_q = torch.log_softmax(torch.randn(50, 7, generator=g, dtype=torch.float64), -1).reshape(-1)
    log_p = torch.log_softmax(3 * torch.randn(50, 7, generator=g, dtype=torch.float64), -1).reshape(-1)
    alpha = 0.2
    q, p = log_q.exp(), log_p.exp()
    behaviour = mixture_logprobs(log_p, log_q, alpha=alpha)
    torch.testing.assert_close(behaviour, torch.log(alpha * p + (1 - alpha) * q), rtol=1e-12, atol=1e-12)
    w = importance_weights(log_q, behaviour)
    torch.testing.assert_close(w, q / (alpha * p + (1 - alpha) * q), rtol=1e-12, atol=1e-12)
    assert not w.requires_grad
    assert (w <= 1 / (1 - alpha) + 1e-12).all()  # q / p~ <= 1 / (1 - alpha)
    # pure on-policy sampling: the behaviour IS the student, w = 1
    assert torch.equal(importance_weights(log_q, mixture_logprobs(log_p, log_q, alpha=0.0)), torch.ones_like(log_q))


def test_importance_weighted_one_step_estimator_is_unbiased():
    """T = 1, y ~ p~ = 0.2 p + 0.8 q: E_{p~}[w * grad KL(q||p)] = grad KL(q||p), w = importance_weights(q, p~).

    For one step the per-token weight is the exact sequence ratio. M = 200,000 samples (seed 2); every
    coordinate within 4 SE, SE from the exact variance under p~ (3 outcomes, enumerated). The inverse
    ratio p~/q (a weight the wrong way round) is many SE off, so the test can fail.
    """
    theta, phi = _tables(seed=2, steps=1)
    exact = _exact_gradient(theta, phi, steps=1)
    alpha, m = 0.2, 200_000
    y_all = torch.arange(V)[:, None]  # [3, 1]

    def weights(y):
        lq = torch.log_softmax(theta[0, BOS].detach(), -1)[y]  # [M, 1]
        lp = torch.log_softmax(phi[0, BOS], -1)[y]
        return importance_weights(lq, mixture_logprobs(lp, lq, alpha=alpha))  # [M, 1]

    w_all = weights(y_all)
    p_mix = (alpha * torch.softmax(phi[0, BOS], -1) + (1 - alpha) * torch.softmax(theta[0, BOS].detach(), -1))  # [3]
    g_all = _per_sequence_gradients(theta, phi, y_all, kl_weight=w_all, pg_weight=w_all)
    mean = torch.einsum("s,s...->...", p_mix, g_all)
    torch.testing.assert_close(mean, exact, rtol=1e-10, atol=1e-12)
    se = ((torch.einsum("s,s...->...", p_mix, g_all**2) - mean**2).clamp(min=0) / m).sqrt()

    y = _sample(theta, m, seed=2, phi=phi, alpha=alpha, steps=1)
    w = weights(y)
    uniform = torch.full((m,), 1.0 / m, dtype=torch.float64)
    (estimate,) = torch.autograd.grad(_surrogate(theta, phi, y, uniform, kl_weight=w, pg_weight=w), theta)
    assert ((estimate - exact).abs() / (4 * se + 1e-12)).max() <= 1.0
    (wrong,) = torch.autograd.grad(_surrogate(theta, phi, y, uniform, kl_weight=1 / w, pg_weight=1 / w), theta)
    assert ((wrong - exact).abs() / (se + 1e-12)).max() > 20


def test_mixture_sampling_over_three_steps_exact_and_per_token_weights():
    """T = 3 under p~, by enumeration. With the exact prefix ratios (the KL term of step t weighted by
    prod_{t'<t} w_t', the pg term by the whole sequence's prod_t w_t, passed as pg_coefficients' weights)
    the estimator's expectation is the exact gradient. MiniLLM's per-token weights w_t are an
    approximation: their expectation differs (documented, not a defect of the pieces)."""
    theta, phi = _tables(seed=3)
    exact = _exact_gradient(theta, phi)
    alpha = 0.2
    lq = torch.log_softmax(_step_logits(theta, ALL).detach(), -1).gather(-1, ALL[..., None]).squeeze(-1)  # [27, T]
    lp = torch.log_softmax(_step_logits(phi, ALL), -1).gather(-1, ALL[..., None]).squeeze(-1)
    behaviour = mixture_logprobs(lp, lq, alpha=alpha)  # [27, T]
    p_mix = behaviour.sum(-1).exp()  # [27]: p~(y), a distribution over the 27 sequences
    assert p_mix.sum().item() == pytest.approx(1.0, abs=1e-12)
    w = importance_weights(lq, behaviour)  # [27, T]
    prefix = torch.cat([torch.ones(27, 1, dtype=torch.float64), w.cumprod(-1)[:, :-1]], dim=1)  # prod_{t'<t} w
    whole = w.prod(-1, keepdim=True).expand(-1, T)  # prod_t w_t
    (exact_is,) = torch.autograd.grad(_surrogate(theta, phi, ALL, p_mix, kl_weight=prefix, pg_weight=whole), theta)
    torch.testing.assert_close(exact_is, exact, rtol=1e-10, atol=1e-12)
    (per_token,) = torch.autograd.grad(_surrogate(theta, phi, ALL, p_mix, kl_weight=w, pg_weight=w), theta)
    assert (per_token - exact).abs().max() > 1e-3


# ----------------------------------------------------------------------------- (c) returns


def test_returns_by_hand():
    r = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    example = torch.tensor([5, 5, 5, 2])  # a sequence of 3 tokens (id 5), then one of 1 (id 2)
    assert returns(r, example, length_normalise=False).tolist() == [2.0 + 4.0, 4.0, 0.0, 0.0]
    assert returns(r, example, length_normalise=True).tolist() == [(2.0 + 4.0) / 2, 4.0 / 1, 0.0, 0.0]
    # the order of the sequences does not matter, only that each is contiguous and in time order
    assert returns(torch.tensor([8.0, 1.0, 2.0, 4.0]), torch.tensor([2, 5, 5, 5]), length_normalise=False).tolist() == \
        [0.0, 6.0, 4.0, 0.0]


def test_returns_many_sequences_match_a_loop():
    g = torch.Generator().manual_seed(4)
    lengths = [1, 5, 2, 7, 1, 3]
    r = torch.randn(sum(lengths), generator=g, dtype=torch.float64)
    example = torch.repeat_interleave(torch.tensor([9, 3, 4, 0, 7, 1]), torch.tensor(lengths))
    for normalise in (False, True):
        want, i = [], 0
        for n in lengths:
            for t in range(n):
                future = r[i + t + 1 : i + n]
                total = future.sum().item() if len(future) else 0.0
                want.append(total / len(future) if normalise and len(future) else total)
            i += n
        got = returns(r, example, length_normalise=normalise)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert returns(r[:0], example[:0], length_normalise=True).shape == (0,)


def test_returns_refuse_non_contiguous_sequences():
    with pytest.raises(ValueError, match="contiguous"):
        returns(torch.zeros(3), torch.tensor([0, 1, 0]), length_normalise=False)
    with pytest.raises(ValueError, match="example"):
        returns(torch.zeros(3), torch.tensor([0, 0]), length_normalise=False)


def test_rewards_are_the_detached_log_ratio():
    lp = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    lq = torch.tensor([-0.5, -3.0], dtype=torch.float64, requires_grad=True)
    r = rewards(lp, lq)
    assert r.tolist() == [-0.5, 1.0] and not r.requires_grad


# ----------------------------------------------------------------------------- (d) clipping


def test_clipping_zeroes_exactly_the_ppo_clipped_tokens():
    # one sequence per token pair: (reward of the later token -> A of the first, weight of the first)
    eps = 0.2
    advantage = [1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 0.0, 2.0, -2.0]
    weight = [1.3, 1.1, 0.7, 0.7, 0.9, 1.3, 5.0, 1.2, 0.8]  # 1.2 and 0.8 sit exactly on the boundary (kept)
    n = len(advantage)
    r = torch.tensor([x for a in advantage for x in (0.0, a)], dtype=torch.float64)  # [2n]: A_first = later reward
    example = torch.arange(n).repeat_interleave(2)
    w = torch.tensor([x for wt in weight for x in (wt, 1.0)], dtype=torch.float64)
    plain = pg_coefficients(rewards=r, example=example, weights=w, length_normalise=False, clip=None)
    clipped = pg_coefficients(rewards=r, example=example, weights=w, length_normalise=False, clip=eps)
    first = plain[0::2]
    assert first.tolist() == pytest.approx([a * wt for a, wt in zip(advantage, weight)], rel=1e-15)
    zeroed = [(a > 0 and wt > 1 + eps) or (a < 0 and wt < 1 - eps) for a, wt in zip(advantage, weight)]
    assert zeroed == [True, False, False, True, False, False, False, False, False]
    for k in range(n):
        assert clipped[2 * k].item() == (0.0 if zeroed[k] else plain[2 * k].item())
    assert torch.equal(clipped[1::2], plain[1::2])  # last tokens: A = 0 either way
    assert torch.equal(plain[1::2], torch.zeros(n, dtype=torch.float64))


def test_clipping_matches_the_ppo_objective_gradient():
    """c_t (as the coefficient of -log q) equals d/d log q of -min(rho A, clamp(rho, 1-eps, 1+eps) A) at rho = w."""
    eps = 0.2
    g = torch.Generator().manual_seed(5)
    a = torch.randn(400, generator=g, dtype=torch.float64)
    w = torch.exp(0.5 * torch.randn(400, generator=g, dtype=torch.float64))
    log_q = torch.zeros(400, dtype=torch.float64, requires_grad=True)  # rho = w * exp(log_q - log_q.detach())
    rho = w * torch.exp(log_q - log_q.detach())
    ppo = -torch.minimum(rho * a, rho.clamp(1 - eps, 1 + eps) * a).sum()
    (grad,) = torch.autograd.grad(ppo, log_q)  # d ppo / d log q = -c  (c multiplies -log q)
    r = torch.stack([torch.zeros(400, dtype=torch.float64), a], dim=1).reshape(-1)
    example = torch.arange(400).repeat_interleave(2)
    weights = torch.stack([w, torch.ones(400, dtype=torch.float64)], dim=1).reshape(-1)
    c = pg_coefficients(rewards=r, example=example, weights=weights, length_normalise=False, clip=eps)[0::2]
    torch.testing.assert_close(-grad, c, rtol=1e-12, atol=0)
    assert (c == 0).sum() > 20 and (c != 0).sum() > 200  # both cases occur


def test_coefficients_validation_and_detach():
    r = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    c = pg_coefficients(rewards=r, example=torch.tensor([0, 0, 0]), weights=None, length_normalise=True, clip=None)
    assert not c.requires_grad and c.tolist() == [0.5, 2.0, 0.0]
    with pytest.raises(ValueError, match="clip"):
        pg_coefficients(rewards=r, example=torch.tensor([0, 0, 0]), weights=None, length_normalise=False, clip=1.5)
    with pytest.raises(ValueError, match="weights"):
        pg_coefficients(rewards=r, example=torch.tensor([0, 0, 0]), weights=torch.ones(2), length_normalise=False,
                        clip=None)
    assert math.isfinite(float(c.sum()))
