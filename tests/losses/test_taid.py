"""The `taid` divergence (Shing et al. 2025): KL(p_t || p_S), p_t = softmax((1-t) stopgrad(z_S) + t z_T).

References here are written from the formula on LOGITS (not log-probs), with p_t a constant, so they
also check that interpolating the log-softmaxes gives the same target as interpolating the logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdlm.losses.divergences import divergence, per_position_divergence
from kdlm.losses.fused import TOTAL_KEY, chunk_buffers, fused_divergence, fused_sums
from kdlm.losses.objective import LMHead, Term, term_sums, weighted_total


def _randn(*shape, seed, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def _pair(*shape, seed=0, scale=2.0):
    return _randn(*shape, seed=seed, scale=scale), _randn(*shape, seed=seed + 1000, scale=scale)


def _hand_taid(student_logits, teacher_logits, t, temperature=1.0):
    """T^2 * mean_n KL(p_t,n || q_n) with p_t = softmax(((1-t) z_S + t z_T) / T) computed from the logits and
    DETACHED: autograd of this gives the gradient TAID prescribes."""
    z_s, z_t = student_logits / temperature, teacher_logits.detach() / temperature
    p_t = torch.softmax((1 - t) * z_s.detach() + t * z_t, dim=-1)  # a constant
    log_q = torch.log_softmax(z_s, dim=-1)
    return temperature**2 * (p_t * (torch.log(p_t) - log_q)).sum(-1).mean()


def test_t_one_is_forward_kl_exactly():
    s, t = _pair(3, 5, 17, seed=1)
    for temperature in (1.0, 2.0):
        a = per_position_divergence(s, t, "taid", beta=1.0, temperature=temperature)
        b = per_position_divergence(s, t, "forward_kl", temperature=temperature)
        assert torch.equal(a, b)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    divergence(s1, t, "taid", beta=1.0, temperature=2.0).backward()
    divergence(s2, t, "forward_kl", temperature=2.0).backward()
    assert torch.equal(s1.grad, s2.grad)


def test_t_zero_is_zero():
    s, t = _pair(3, 5, 17, seed=2)
    s.requires_grad_()
    values = per_position_divergence(s, t, "taid", beta=0.0, temperature=1.5)
    assert torch.equal(values, torch.zeros_like(values))  # exactly 0: the target IS the student
    values.sum().backward()
    assert s.grad.abs().max() < 1e-15  # gradient p_S - p_t = 0 up to rounding


@pytest.mark.parametrize("t", [0.1, 0.4, 0.75, 0.999])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradient_is_that_of_kl_to_a_constant_target(t, temperature):
    s, z_t = _pair(4, 6, 23, seed=3)
    mask = _randn(4, 6, seed=4) > -0.7
    got_s = s.clone().requires_grad_()
    got = divergence(got_s, z_t, "taid", beta=t, temperature=temperature, mask=mask)
    got.backward()
    want_s = s.clone().requires_grad_()
    want = _hand_taid(want_s[mask], z_t[mask], t, temperature)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_s.grad, want_s.grad, rtol=1e-10, atol=1e-14)
    # closed form: d/dz_S = T * (p_S - p_t) / count on counted rows, 0 elsewhere
    p_s = torch.softmax(s / temperature, -1)
    p_t = torch.softmax(((1 - t) * s + t * z_t) / temperature, -1)
    closed = torch.where(mask[..., None], temperature * (p_s - p_t) / mask.sum(), torch.zeros_like(s))
    torch.testing.assert_close(got_s.grad, closed, rtol=1e-10, atol=1e-14)
    # and it is NOT the derivative of the value (p_t moves with the student): the stop-gradient matters
    # (the more so the further t is from 1, where the target stops depending on the student)
    if t > 0.9:
        return
    full = s.clone().requires_grad_()
    z = full / temperature
    p_moving = torch.softmax((1 - t) * z + t * z_t / temperature, -1)
    (temperature**2 * (p_moving * (torch.log(p_moving) - torch.log_softmax(z, -1))).sum(-1)[mask].mean()).backward()
    assert (full.grad - got_s.grad).abs().max() > 1e-4


def test_value_between_endpoints_and_teacher_detached():
    s, z_t = _pair(5, 11, seed=5)
    z_t.requires_grad_()
    values = [divergence(s, z_t, "taid", beta=b).item() for b in (0.0, 0.3, 0.6, 1.0)]
    assert values[0] == 0.0 and all(v > 0 for v in values[1:])
    assert values == sorted(values)  # for these inputs the target moves away from the student monotonically
    s.requires_grad_()
    divergence(s, z_t, "taid", beta=0.5).backward()
    assert z_t.grad is None and s.grad.abs().sum() > 0


def test_teacher_neg_inf_entries():
    s, t = _pair(3, 9, seed=6)
    t[:, [1, 4]] = -math.inf
    s.requires_grad_()
    for beta in (0.0, 0.4, 1.0):
        out = divergence(s, t, "taid", beta=beta)
        (grad,) = torch.autograd.grad(out, s)
        assert torch.isfinite(out) and torch.isfinite(grad).all(), beta
    # p_t has no mass where the teacher has none (t > 0): the gradient there is p_S / count (pushed off them)
    (grad,) = torch.autograd.grad(divergence(s, t, "taid", beta=0.4), s)
    p_s = torch.softmax(s.detach(), -1)
    torch.testing.assert_close(grad[:, [1, 4]], p_s[:, [1, 4]] / 3, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- fused chunked path


VOCAB, ROWS = 37, 40


def _ref_logits(hidden, weight, bias, scale=1.0, softcap=None):
    logits = (hidden @ weight.T + bias) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits[..., :VOCAB]


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_matches_unfused_float64(softcap):
    sh = _randn(3, 7, 8, seed=10).requires_grad_()
    sw = _randn(ROWS, 8, seed=11, scale=0.7).requires_grad_()
    sb = _randn(ROWS, seed=12, scale=0.3).requires_grad_()
    th, tw, tb = _randn(3, 7, 12, seed=13), _randn(43, 12, seed=14, scale=0.7), _randn(43, seed=15, scale=0.3)
    mask = _randn(3, 7, seed=16) > -0.5
    kw = dict(temperature=2.0, beta=0.35)
    want = divergence(_ref_logits(sh, sw, sb, 1.3, softcap), _ref_logits(th, tw, tb), "taid", mask=mask, **kw)
    want_grads = torch.autograd.grad(want, (sh, sw, sb))
    rows = 4  # several chunks, uneven last one
    budget = rows * VOCAB * 8 * chunk_buffers(["taid"], softcap=softcap is not None)
    got = fused_divergence(sh, sw, th, tw, "taid", mask=mask, student_bias=sb, teacher_bias=tb, vocab=VOCAB,
                           logit_scale=(1.3, 1.0), softcap=(softcap, None), chunk_bytes=budget, **kw)
    assert int(mask.sum()) > rows
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    for g, w in zip(torch.autograd.grad(got, (sh, sw, sb)), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-15)


def test_fused_sums_with_coefficients_match_term_sums():
    n = 13
    hidden = _randn(n, 6, seed=20).requires_grad_()
    weight = _randn(VOCAB, 6, seed=21).requires_grad_()
    teacher_hidden, teacher_weight = _randn(n, 6, seed=22), _randn(VOCAB, 6, seed=23)
    targets = torch.randint(VOCAB, (n,), generator=torch.Generator().manual_seed(24))
    terms = [Term("taid", "taid", 0.8, 2.0, 0.55, 0.1), Term("ce", "ce", 0.2, 1.0, 0.5, 0.1)]
    coefficients = torch.stack([_randn(n, seed=25).abs(), torch.ones(n, dtype=torch.float64)])
    want = term_sums(hidden @ weight.T, teacher_hidden @ teacher_weight.T, targets, terms, coefficients=coefficients)
    want_grads = torch.autograd.grad(weighted_total(want, terms), (hidden, weight))
    got = fused_sums(hidden, LMHead(weight, None, VOCAB), teacher_hidden, LMHead(teacher_weight, None, VOCAB), targets,
                     terms, chunk_bytes=3 * VOCAB * 8 * chunk_buffers(["taid", "ce"]), coefficients=coefficients)
    for term in terms:
        torch.testing.assert_close(got[term.label], want[term.label].detach(), rtol=1e-9, atol=0)
    for g, w in zip(torch.autograd.grad(got[TOTAL_KEY], (hidden, weight)), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-15)


def test_chunk_budget_counts_taid():
    # 2 (student logits + grad) + 1 (teacher logits) + 8 (forward_kl's 7 + the detached target)
    assert chunk_buffers(["taid"]) == 11
    assert chunk_buffers(["pg"]) == 4  # like ce: no teacher
