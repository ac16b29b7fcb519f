"""Per-token coefficients: example weights, negative rows and REDI, one mechanism on all three loss paths.

`token_coefficients` turns (weights, negative, example) into c [K, N]; every path (term_sums on full
logits, the fused chunk loop, the sparse top-k objective) must give sum_n c_kn * l_kn, checked here
against sums written out by hand in float64, value AND gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdlm.losses.divergences import per_position_divergence
from kdlm.losses.fused import TOTAL_KEY, fused_sums
from kdlm.losses.objective import LMHead, Term, term_sums, token_coefficients, weighted_total
from kdlm.losses.sparse import SparseTeacher, sparse_term_sums

N, H, V = 13, 6, 31
# 4 examples of unequal length: which example each counted token belongs to (ids need not be dense)
EXAMPLE = torch.tensor([0, 0, 0, 4, 4, 7, 7, 7, 7, 7, 9, 9, 9])
WEIGHT = torch.tensor([0.5] * 3 + [0.3] * 2 + [0.7] * 5 + [2.0] * 3, dtype=torch.float64)
NEGATIVE = torch.tensor([False] * 3 + [True] * 2 + [False] * 5 + [True] * 3)
LENGTH = torch.tensor([3.0] * 3 + [2.0] * 2 + [5.0] * 5 + [3.0] * 3, dtype=torch.float64)


def _term(name: str, weight: float = 1.0, alpha: float = 0.8, temperature: float = 1.0) -> Term:
    return Term(label=name, name=name, weight=weight, temperature=temperature, beta=0.5, skew=0.1, alpha=alpha)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    targets = torch.randint(V, (N,), generator=g)
    return hidden, weight, teacher_hidden, teacher_weight, targets


def test_coefficients_of_each_kind_of_term():
    terms = [_term("ce"), _term("forward_kl"), _term("redi", alpha=0.8)]
    c = token_coefficients(terms, weights=WEIGHT, negative=NEGATIVE, example=EXAMPLE, dtype=torch.float64)
    plain = WEIGHT * ~NEGATIVE  # negatives count in redi only
    assert torch.equal(c[0], plain) and torch.equal(c[1], plain)
    assert torch.equal(c[2], torch.where(NEGATIVE, -0.8 * WEIGHT / LENGTH, WEIGHT / LENGTH))
    assert token_coefficients(terms, weights=WEIGHT.float(), negative=NEGATIVE, example=EXAMPLE).dtype == torch.float32


def test_no_weights_no_negatives_no_redi_means_the_plain_sums():
    assert token_coefficients([_term("ce"), _term("jsd")]) is None
    # redi alone, positives only: length normalisation and nothing else
    c = token_coefficients([_term("redi")], example=EXAMPLE)
    torch.testing.assert_close(c[0].double(), 1 / LENGTH, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="example"):
        token_coefficients([_term("redi")], weights=WEIGHT)


def _hand_total(hidden, weight, teacher_hidden, teacher_weight, targets, temperature):
    """0.4 * sum_n c1_n ce_n + 0.6 * T^2 sum_n c1_n KL_n + 0.5 * sum_n c2_n ce_n, every sum written out."""
    student_logits, teacher_logits = hidden @ weight.T, teacher_hidden @ teacher_weight.T  # [N, V] fp64
    ce = -torch.log_softmax(student_logits, -1).gather(1, targets[:, None]).squeeze(1)  # [N]
    t_logp = torch.log_softmax(teacher_logits / temperature, -1)
    s_logp = torch.log_softmax(student_logits / temperature, -1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # [N]: KL(teacher || student)
    plain = WEIGHT * ~NEGATIVE
    redi = torch.where(NEGATIVE, -0.8 * WEIGHT / LENGTH, WEIGHT / LENGTH)
    sums = {"ce": (plain * ce).sum(), "forward_kl": temperature**2 * (plain * kl).sum(), "redi": (redi * ce).sum()}
    return sums, 0.4 * sums["ce"] + 0.6 * sums["forward_kl"] + 0.5 * sums["redi"]


TERMS = [_term("ce", 0.4), _term("forward_kl", 0.6, temperature=2.0), _term("redi", 0.5, alpha=0.8)]


@pytest.mark.parametrize("path", ["unfused", "fused"])
def test_weighted_objective_equals_the_hand_computation_in_float64(path):
    hidden, weight, teacher_hidden, teacher_weight, targets = _inputs()
    want, want_total = _hand_total(hidden, weight, teacher_hidden, teacher_weight, targets, 2.0)
    want_grads = torch.autograd.grad(want_total, (hidden, weight))
    coefficients = token_coefficients(TERMS, weights=WEIGHT, negative=NEGATIVE, example=EXAMPLE, dtype=torch.float64)
    if path == "unfused":
        got = term_sums(hidden @ weight.T, teacher_hidden @ teacher_weight.T, targets, TERMS, coefficients=coefficients)
        got_total = weighted_total(got, TERMS)
    else:  # 3 rows per chunk: several chunks, an uneven last one
        got = fused_sums(hidden, LMHead(weight, None, V), teacher_hidden, LMHead(teacher_weight, None, V), targets,
                         TERMS, chunk_bytes=3 * V * 8 * 20, coefficients=coefficients)
        got_total = got[TOTAL_KEY]
    for label in want:
        torch.testing.assert_close(got[label].detach(), want[label].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_total.detach(), want_total.detach(), rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got_total, (hidden, weight)), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_sparse_objective_with_coefficients_equals_its_weighted_per_token_values():
    hidden, weight, _, teacher_weight, targets = _inputs(1)
    teacher = SparseTeacher.from_logits(hidden.detach() @ teacher_weight.T, k=6, temperature=1.0)
    terms = [_term("ce", 0.3), _term("forward_kl", 0.7), _term("redi", 0.2)]
    coefficients = token_coefficients(terms, weights=WEIGHT, negative=NEGATIVE, example=EXAMPLE, dtype=torch.float64)
    logits = hidden @ weight.T
    got = sparse_term_sums(logits, teacher, targets, terms, coefficients=coefficients)
    # the same sparse per-token values, one token at a time, times c_kn
    ones = torch.ones(len(terms), 1, dtype=torch.float64)
    per_token = [sparse_term_sums(logits[n:n + 1], teacher.slice_rows(n, n + 1), targets[n:n + 1], terms,
                                  coefficients=ones) for n in range(N)]
    for k, term in enumerate(terms):
        want = sum(coefficients[k, n] * per_token[n][term.label] for n in range(N))
        torch.testing.assert_close(got[term.label], want, rtol=1e-12, atol=1e-12)
    fused = fused_sums(hidden, LMHead(weight, None, V), teacher, None, targets, terms, chunk_bytes=4 * V * 8 * 12,
                       coefficients=coefficients)
    reference = weighted_total(got, terms)
    torch.testing.assert_close(fused[TOTAL_KEY], reference, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(fused[TOTAL_KEY], (hidden, weight)),
                    torch.autograd.grad(reference, (hidden, weight))):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_redi_is_the_papers_pair_loss():
    """One positive/negative pair: L = -(1/|y+|) log p(y+) + alpha (1/|y-|) log p(y-)."""
    hidden, weight, _, _, targets = _inputs(2)
    example, negative = torch.tensor([0] * 4 + [1] * 9), torch.tensor([False] * 4 + [True] * 9)
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)  # [N]
    want = -logp[:4].sum() / 4 + 0.8 * logp[4:].sum() / 9
    terms = [_term("redi", alpha=0.8)]
    c = token_coefficients(terms, negative=negative, example=example, dtype=torch.float64)
    got = term_sums(hidden @ weight.T, None, targets, terms, coefficients=c)["redi"]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, (hidden, weight)), torch.autograd.grad(want, (hidden, weight))):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_redi_without_coefficients_and_badly_shaped_ones_are_refused():
    hidden, weight, _, _, targets = _inputs()
    with pytest.raises(ValueError, match="redi term needs token coefficients"):
        term_sums(hidden @ weight.T, None, targets, [_term("redi")])
    with pytest.raises(ValueError, match="redi term needs token coefficients"):
        fused_sums(hidden, LMHead(weight, None, V), None, None, targets, [_term("redi")])
    with pytest.raises(ValueError, match=r"coefficients must be \[1 terms, 13 tokens\]"):
        term_sums(hidden @ weight.T, None, targets, [_term("ce")], coefficients=torch.ones(2, N))


def test_ce_with_unit_coefficients_equals_plain_ce():
    hidden, weight, _, _, targets = _inputs()
    logits = (hidden @ weight.T).detach()
    plain = term_sums(logits, None, targets, [_term("ce")])["ce"]
    ones = term_sums(logits, None, targets, [_term("ce")], coefficients=torch.ones(1, N, dtype=torch.float64))["ce"]
    torch.testing.assert_close(ones, plain, rtol=1e-14, atol=0)
    assert torch.equal(plain, F.cross_entropy(logits, targets, reduction="sum"))
    assert per_position_divergence(logits, logits, "forward_kl").abs().max() == 0
