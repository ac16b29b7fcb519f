"""Sparse (top-k) distillation losses against the dense objective and hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdlm.losses.divergences import DIVERGENCE_KINDS, get_divergence, per_position_divergence
from kdlm.losses.objective import Term, term_sums
from kdlm.losses.sparse import (SparseTeacher, log1mexp, sparse_logprobs, sparse_term_sums,
                                sparse_validation_figures)

N, V = 12, 40


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _logits(seed: int, scale: float = 3.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(N, V, generator=g, dtype=torch.float64)).to(dtype)


def _term(name: str, temperature: float = 1.0, beta: float = 0.3, skew: float = 0.2) -> Term:
    return Term(label=name, name=name, weight=1.0, temperature=temperature, beta=beta, skew=skew)


def _value_and_grad(fn, logits: torch.Tensor):
    x = logits.clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_all_ids_equal_the_dense_objective(kind, temperature):
    student, teacher_logits = _logits(0), _logits(1)
    sparse = SparseTeacher.from_logits(teacher_logits, k=V, temperature=temperature)
    assert torch.isneginf(sparse.tail_logprob).all()
    term = _term(kind, temperature)
    targets = torch.arange(N) % V
    for mode in ("tail_bucket", "renormalized"):
        got, got_grad = _value_and_grad(lambda x: sparse_term_sums(x, sparse, targets, [term], mode=mode)[kind], student)
        want, want_grad = _value_and_grad(lambda x: term_sums(x, teacher_logits, targets, [term])[kind], student)
        assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-6), mode
        torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-6)
        # and position by position
        s_lp, t_lp = sparse_logprobs(student, sparse, temperature, mode)
        per_pos = get_divergence(kind)(s_lp, t_lp, beta=term.beta, skew=term.skew)
        dense = per_position_divergence(student, teacher_logits, kind, temperature=temperature, beta=term.beta, skew=term.skew)
        torch.testing.assert_close(per_pos, dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("k", [1, 5, 20])
def test_tail_bucket_is_a_lower_bound_of_the_dense_divergence(kind, k):
    # the data-processing inequality: merging the tail into one bucket cannot increase an f-divergence
    for seed in range(3):
        student, teacher_logits = _logits(10 + seed, dtype=torch.float64), _logits(20 + seed, dtype=torch.float64)
        sparse = SparseTeacher.from_logits(teacher_logits, k=k)
        s_lp, t_lp = sparse_logprobs(student, sparse, 1.0)
        bucketed = get_divergence(kind)(s_lp, t_lp, beta=0.3, skew=0.2)
        dense = per_position_divergence(student, teacher_logits, kind, beta=0.3, skew=0.2)
        assert (bucketed <= dense + 1e-12).all()
        assert (bucketed >= -1e-12).all()


def test_tail_bucket_forward_kl_equals_a_hand_computation():
    student, teacher_logits = _logits(3, dtype=torch.float64), _logits(4, dtype=torch.float64)
    k, T = 6, 1.5
    sparse = SparseTeacher.from_logits(teacher_logits, k=k, temperature=T)
    got = sparse_term_sums(student, sparse, torch.zeros(N, dtype=torch.long), [_term("forward_kl", T)])["forward_kl"]
    want = 0.0
    for n in range(N):
        p = torch.softmax(teacher_logits[n] / T, -1).tolist()
        q = torch.softmax(student[n] / T, -1).tolist()
        top = sorted(range(V), key=lambda v: -p[v])[:k]
        p_tail = 1 - sum(p[v] for v in top)
        q_tail = 1 - sum(q[v] for v in top)
        want += sum(p[v] * math.log(p[v] / q[v]) for v in top) + p_tail * math.log(p_tail / q_tail)
    assert got.item() == pytest.approx(want * T**2, rel=1e-9)


def test_renormalized_mode_equals_a_hand_computation():
    student, teacher_logits = _logits(5, dtype=torch.float64), _logits(6, dtype=torch.float64)
    k = 4
    sparse = SparseTeacher.from_logits(teacher_logits, k=k)
    targets = torch.zeros(N, dtype=torch.long)
    got_fkl = sparse_term_sums(student, sparse, targets, [_term("forward_kl")], mode="renormalized")["forward_kl"]
    got_rkl = sparse_term_sums(student, sparse, targets, [_term("reverse_kl")], mode="renormalized")["reverse_kl"]
    want_fkl = want_rkl = 0.0
    for n in range(N):
        p = torch.softmax(teacher_logits[n], -1).tolist()
        q = torch.softmax(student[n], -1).tolist()
        top = sorted(range(V), key=lambda v: -p[v])[:k]
        zp, zq = sum(p[v] for v in top), sum(q[v] for v in top)
        pr = {v: p[v] / zp for v in top}
        qr = {v: q[v] / zq for v in top}
        want_fkl += sum(pr[v] * math.log(pr[v] / qr[v]) for v in top)
        want_rkl += sum(qr[v] * math.log(qr[v] / pr[v]) for v in top)
    assert got_fkl.item() == pytest.approx(want_fkl, rel=1e-9)
    assert got_rkl.item() == pytest.approx(want_rkl, rel=1e-9)


def test_ce_term_is_the_full_vocabulary_cross_entropy():
    student, teacher_logits = _logits(7), _logits(8)
    targets = torch.randint(V, (N,), generator=torch.Generator().manual_seed(0))
    sums = sparse_term_sums(student, SparseTeacher.from_logits(teacher_logits, k=3), targets, [_term("ce")])
    assert sums["ce"].item() == pytest.approx(F.cross_entropy(student, targets, reduction="sum").item(), rel=1e-6)
    assert sparse_term_sums(student, None, targets, [_term("ce")])["ce"].item() == pytest.approx(sums["ce"].item())


@pytest.mark.parametrize("mode", ["tail_bucket", "renormalized"])
def test_gradients_reach_the_student_only(mode):
    student = _logits(9).requires_grad_(True)
    sparse = SparseTeacher.from_logits(_logits(10), k=5)
    teacher_lp = sparse.logprobs.clone().requires_grad_(True)
    teacher_tail = sparse.tail_logprob.clone().requires_grad_(True)
    signal = SparseTeacher(sparse.ids, teacher_lp, teacher_tail)
    terms = [_term(kind) for kind in DIVERGENCE_KINDS]
    total = sum(sparse_term_sums(student, signal, torch.zeros(N, dtype=torch.long), terms, mode=mode).values())
    total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher_lp.grad is None and teacher_tail.grad is None


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_zero_tail_gives_finite_values_and_gradients(kind):
    # a teacher whose top-k already holds all its mass (what a quantised cache can report), and a student
    # so peaked that its own tail underflows
    k = 5
    teacher_lp = torch.log_softmax(torch.randn(N, k, generator=torch.Generator().manual_seed(1)), -1)
    ids = torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(n))[:k] for n in range(N)])
    signal = SparseTeacher(ids, teacher_lp, torch.full((N,), -math.inf))
    head_only = _logits(11).scatter(1, ids, 1e4)  # the student's top-k ids hold all its mass too: its tail underflows
    outside = torch.tensor([next(v for v in range(V) if v not in row) for row in ids.tolist()])
    tail_only = _logits(11).scatter(1, outside[:, None], 1e4)  # all its mass outside the teacher's top-k
    for student in (head_only, tail_only, _logits(11)):
        for mode in ("tail_bucket", "renormalized"):
            value, grad = _value_and_grad(
                lambda x: sparse_term_sums(x, signal, torch.zeros(N, dtype=torch.long), [_term(kind)], mode=mode)[kind],
                student)
            assert torch.isfinite(value) and torch.isfinite(grad).all(), mode


def test_log1mexp_is_stable_at_both_ends():
    x = torch.tensor([0.0, -1e-30, -1e-7, -0.5, -1.0, -30.0, -200.0], dtype=torch.float64, requires_grad=True)
    y = log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert y[3].item() == pytest.approx(math.log(1 - math.exp(-0.5)))
    assert y[5].item() == pytest.approx(math.log1p(-math.exp(-30.0)))


def test_a_temperature_other_than_the_signals_is_refused():
    signal = SparseTeacher.from_logits(_logits(12), k=4, temperature=2.0)
    with pytest.raises(ValueError, match="temperature 1.0"):
        sparse_term_sums(_logits(13), signal, torch.zeros(N, dtype=torch.long), [_term("forward_kl", 1.0)])


def test_validation_figures():
    student, teacher_logits = _logits(14), _logits(15)
    targets = torch.randint(V, (N,), generator=torch.Generator().manual_seed(2))
    figures = sparse_validation_figures(student, SparseTeacher.from_logits(teacher_logits, k=8), targets)
    dense_kl = per_position_divergence(student, teacher_logits, "forward_kl").sum().item()
    assert 0 <= figures["kl"].item() <= dense_kl + 1e-5
    full = sparse_validation_figures(student, SparseTeacher.from_logits(teacher_logits, k=V), targets)
    assert full["kl"].item() == pytest.approx(dense_kl, rel=1e-5)
    agree = (student.argmax(-1) == teacher_logits.argmax(-1)).sum().item()
    assert figures["top1_agreement"].item() == agree
    assert figures["tokens"].item() == N
    assert figures["ce"].item() == pytest.approx(F.cross_entropy(student, targets, reduction="sum").item(), rel=1e-6)


def test_row_chunks_add_up_to_the_whole():
    student, teacher_logits = _logits(16), _logits(17)
    signal = SparseTeacher.from_logits(teacher_logits, k=6)
    targets = torch.zeros(N, dtype=torch.long)
    terms = [_term("jsd"), _term("ce")]
    whole = sparse_term_sums(student, signal, targets, terms)
    parts = [sparse_term_sums(student[a:a + 5], signal.slice_rows(a, a + 5), targets[a:a + 5], terms) for a in range(0, N, 5)]
    for label in whole:
        assert whole[label].item() == pytest.approx(sum(p[label].item() for p in parts), rel=1e-6)
