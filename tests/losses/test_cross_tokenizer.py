"""kdlm.losses.cross_tokenizer against naive float64 references (explicit loops, full logits)."""

from __future__ import annotations

import math

import pytest
import torch

from kdlm.losses.cross_tokenizer import (
    ALM_DIVERGENCES,
    ALM_EPSILON,
    alm_sum,
    chunk_logprobs,
    token_logprobs,
    uld_sum,
    uld_sum_from_hidden,
)
from kdlm.losses.objective import LMHead

F64 = torch.float64
EQUAL_ZERO = ("kl", "reverse_kl", "tvd")  # the divergences that are 0 at a perfect match (binary_ce is not)


def make_head(vocab: int, hidden: int, *, seed: int, dtype=F64, rows: int | None = None, bias: bool = True,
              scale: float = 1.0, softcap=None) -> LMHead:
    """A tiny random nn.Linear LM head wrapped in LMHead (as lm_head_of does for a real model)."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(hidden, rows or vocab, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight.mul_(3.0)  # spread the logits a little
    return LMHead(weight=linear.weight, bias=linear.bias, vocab=vocab, scale=scale, softcap=softcap)


# ----------------------------------------------------------------------------- naive references


def naive_logits_row(h: torch.Tensor, head: LMHead) -> torch.Tensor:
    """One row's logits, computed from scratch in float64."""
    w = head.weight[: head.vocab].to(F64)
    z = w @ h.to(F64)
    if head.bias is not None:
        z = z + head.bias[: head.vocab].to(F64)
    z = z * head.scale
    if head.softcap:
        z = head.softcap * torch.tanh(z / head.softcap)
    return z


def naive_token_logprobs(hidden, head, targets, temperature=1.0):
    out = []
    for n in range(hidden.shape[0]):
        z = naive_logits_row(hidden[n], head) / temperature
        out.append(z[targets[n]] - torch.log(torch.exp(z - z.max()).sum()) - z.max())
    return torch.stack(out)


def naive_chunk_logprobs(lp, chunk, num):
    out = [lp.new_zeros(()) for _ in range(num)]
    for n in range(lp.shape[0]):
        out[int(chunk[n])] = out[int(chunk[n])] + lp[n]
    return torch.stack(out)


def naive_binarised(lt, ls, tau, divergence):
    """One chunk's binarised divergence from plain probabilities (no log1mexp), float64 tensors."""
    yt = torch.exp(torch.clamp(lt, max=0.0) / tau - ALM_EPSILON)
    ys = torch.exp(torch.clamp(ls, max=0.0) / tau - ALM_EPSILON)
    if divergence == "kl":
        return yt * torch.log(yt / ys) + (1 - yt) * torch.log((1 - yt) / (1 - ys))
    if divergence == "reverse_kl":
        return ys * torch.log(ys / yt) + (1 - ys) * torch.log((1 - ys) / (1 - yt))
    if divergence == "tvd":
        return 0.5 * (torch.abs(yt - ys) + torch.abs((1 - yt) - (1 - ys)))
    if divergence == "binary_ce":
        return -(yt * torch.log(ys) + (1 - yt) * torch.log(1 - ys))
    raise AssertionError(divergence)


def naive_alm(ls, lt, tau, divergence, weights=None):
    total = ls.new_zeros(())
    for c in range(ls.shape[0]):
        w = 1.0 if weights is None else weights[c]
        total = total + w * naive_binarised(lt[c].detach(), ls[c], tau, divergence)
    return total


def naive_uld(student_logits, teacher_logits, temperature=1.0, weights=None):
    v = max(student_logits.shape[1], teacher_logits.shape[1])
    total = student_logits.new_zeros((), dtype=F64)
    for r in range(student_logits.shape[0]):
        ps = torch.softmax(student_logits[r].to(F64) / temperature, -1)
        pt = torch.softmax(teacher_logits[r].detach().to(F64) / temperature, -1)
        ps = torch.cat([torch.sort(ps, descending=True).values, ps.new_zeros(v - ps.shape[0])])
        pt = torch.cat([torch.sort(pt, descending=True).values, pt.new_zeros(v - pt.shape[0])])
        w = 1.0 if weights is None else weights[r]
        total = total + w * (ps - pt).abs().sum()
    return total


def head_params(head):
    return [p for p in (head.weight, head.bias) if p is not None]


def grads(value, tensors):
    return torch.autograd.grad(value, tensors, allow_unused=False)


# ----------------------------------------------------------------------------- token_logprobs


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 1024])
@pytest.mark.parametrize("head_kind", ["plain", "scaled_softcapped", "padded_rows"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_token_logprobs_value_and_grad_match_naive(chunk_rows, head_kind, temperature):
    n, h, v = 7, 5, 11
    kwargs = {"plain": {}, "scaled_softcapped": {"scale": 0.7, "softcap": 4.0},
              "padded_rows": {"rows": 16, "bias": False}}[head_kind]
    head = make_head(v, h, seed=0, **kwargs)
    torch.manual_seed(1)
    hidden = torch.randn(n, h, dtype=F64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    upstream = torch.randn(n, dtype=F64)

    got = token_logprobs(hidden, head, targets, chunk_rows=chunk_rows, temperature=temperature)
    want = naive_token_logprobs(hidden, head, targets, temperature)
    assert got.dtype == F64 and got.shape == (n,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    params = [hidden, *head_params(head)]
    for g, w in zip(grads((got * upstream).sum(), params), grads((want * upstream).sum(), params)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_token_logprobs_gradcheck():
    head = make_head(6, 4, seed=2, softcap=3.0)
    torch.manual_seed(3)
    hidden = torch.randn(5, 4, dtype=F64, requires_grad=True)
    targets = torch.randint(0, 6, (5,))
    assert torch.autograd.gradcheck(
        lambda hid, w, b: token_logprobs(hid, LMHead(w, b, 6, 1.0, 3.0), targets, chunk_rows=2, temperature=1.5),
        (hidden, head.weight, head.bias),
    )


def test_token_logprobs_fp32_bf16_and_no_grad():
    head32 = make_head(13, 6, seed=4, dtype=torch.float32)
    torch.manual_seed(5)
    hidden = torch.randn(9, 6)
    targets = torch.randint(0, 13, (9,))
    got = token_logprobs(hidden, head32, targets, chunk_rows=4)
    assert got.dtype == torch.float32
    want = torch.log_softmax(head32.logits(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(got, want)
    assert token_logprobs(hidden.bfloat16(), head32, targets).dtype == torch.float32  # bf16 upcast
    with torch.no_grad():  # the teacher's path
        teacher = token_logprobs(hidden, head32, targets, chunk_rows=4)
    assert teacher.grad_fn is None and not teacher.requires_grad
    torch.testing.assert_close(teacher, got.detach())


def test_token_logprobs_backward_does_not_keep_all_logits():
    """Each chunk is checkpointed: what is kept for backward, all tensors together, is less than ONE chunk's
    [chunk_rows, V] logits (the hidden rows and targets only); without checkpointing it would be >= N x V."""
    n, h, v, rows = 64, 8, 512, 8
    head = make_head(v, h, seed=6, dtype=torch.float32)
    hidden = torch.randn(n, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_logprobs(hidden, head, targets, chunk_rows=rows)
    assert sum(saved) < rows * v, saved
    out.sum().backward()  # and it still backpropagates
    assert hidden.grad is not None and head.weight.grad is not None


# ----------------------------------------------------------------------------- chunk_logprobs


def test_chunk_logprobs_matches_loop_and_is_differentiable():
    torch.manual_seed(7)
    lp = -torch.rand(10, dtype=F64).requires_grad_()
    chunk = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5])
    got = chunk_logprobs(lp, chunk, 6)
    want = naive_chunk_logprobs(lp, chunk, 6)
    torch.testing.assert_close(got, want)
    up = torch.randn(6, dtype=F64)
    torch.testing.assert_close(grads((got * up).sum(), [lp])[0], up[chunk])
    # one token per chunk: the chunk log-probs are the token log-probs
    torch.testing.assert_close(chunk_logprobs(lp, torch.arange(10), 10), lp)


# ----------------------------------------------------------------------------- alm_sum


@pytest.mark.parametrize("divergence", ALM_DIVERGENCES)
@pytest.mark.parametrize("tau", [1.0, 100.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_alm_value_and_grad_match_naive(divergence, tau, weighted):
    torch.manual_seed(8)
    c = 9
    ls = (-torch.rand(c, dtype=F64) * 6 - 0.01).requires_grad_()
    lt = (-torch.rand(c, dtype=F64) * 6 - 0.01).requires_grad_()
    weights = torch.rand(c, dtype=F64) if weighted else None
    got = alm_sum(ls, lt, tau=tau, divergence=divergence, weights=weights)
    want = naive_alm(ls, lt, tau, divergence, weights)
    assert got.dim() == 0 and got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    g_s, g_t = torch.autograd.grad(got, [ls, lt], allow_unused=True)
    (w_s,) = torch.autograd.grad(want, [ls])
    torch.testing.assert_close(g_s, w_s, rtol=1e-8, atol=1e-12)
    assert g_t is None  # the teacher is detached


def test_alm_binary_ce_has_the_kl_gradient():
    """tokenkit's default (binary_ce) and kl differ by the teacher's binary entropy only."""
    torch.manual_seed(9)
    ls = (-torch.rand(6, dtype=F64) * 40).requires_grad_()
    lt = -torch.rand(6, dtype=F64) * 40
    g_kl = grads(alm_sum(ls, lt, divergence="kl"), [ls])[0]
    g_ce = grads(alm_sum(ls, lt, divergence="binary_ce"), [ls])[0]
    torch.testing.assert_close(g_kl, g_ce)


@pytest.mark.parametrize("divergence", ALM_DIVERGENCES)
def test_alm_with_identical_tokenizers_is_the_token_level_likelihood_match(divergence):
    """chunk = arange(N): ALM == sum over tokens of the binarised divergence of the per-token log-probs."""
    n, h, v, tau = 8, 5, 12, 3.0
    student, teacher = make_head(v, h, seed=10), make_head(v, h, seed=11)
    torch.manual_seed(12)
    hidden_s = torch.randn(n, h, dtype=F64, requires_grad=True)
    hidden_t = torch.randn(n, h, dtype=F64)
    targets = torch.randint(0, v, (n,))
    with torch.no_grad():
        lt = token_logprobs(hidden_t, teacher, targets)
    ls = token_logprobs(hidden_s, student, targets, chunk_rows=3)
    arange = torch.arange(n)
    got = alm_sum(chunk_logprobs(ls, arange, n), chunk_logprobs(lt, arange, n), tau=tau, divergence=divergence)
    ref_s = naive_token_logprobs(hidden_s, student, targets)
    ref_t = naive_token_logprobs(hidden_t, teacher, targets)
    want = sum(naive_binarised(ref_t[k], ref_s[k], tau, divergence) for k in range(n))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads(got, [hidden_s])[0], grads(want, [hidden_s])[0], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("divergence", EQUAL_ZERO)
@pytest.mark.parametrize("tau", [1.0, 100.0])
def test_alm_is_zero_with_zero_gradient_when_student_equals_teacher(divergence, tau):
    n, h, v = 10, 4, 9
    head = make_head(v, h, seed=13)
    torch.manual_seed(14)
    hidden = torch.randn(n, h, dtype=F64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    chunk = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 4])
    ls = chunk_logprobs(token_logprobs(hidden, head, targets, chunk_rows=3), chunk, 5)
    with torch.no_grad():
        lt = chunk_logprobs(token_logprobs(hidden, head, targets), chunk, 5)
    value = alm_sum(ls, lt, tau=tau, divergence=divergence)
    assert abs(value.item()) < 1e-12
    for g in grads(value, [hidden, *head_params(head)]):
        assert g.abs().max().item() < 1e-10


@pytest.mark.parametrize("divergence", ALM_DIVERGENCES)
@pytest.mark.parametrize("tau", [1.0, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_alm_is_finite_for_extreme_chunk_logprobs(divergence, tau, dtype):
    ls = torch.tensor([-500.0, -500.0, -1e-9, 0.0, -3.0, 1e-7], dtype=dtype, requires_grad=True)
    lt = torch.tensor([-500.0, -0.5, -500.0, -500.0, 0.0, 0.0], dtype=dtype)
    value = alm_sum(ls, lt, tau=tau, divergence=divergence)
    (g,) = grads(value, [ls])
    assert value.dtype == dtype and torch.isfinite(value) and torch.isfinite(g).all(), (value, g)
    if dtype == F64 and tau == 100.0:  # where plain probabilities are still representable
        torch.testing.assert_close(value, naive_alm(ls, lt, tau, divergence), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_alm_fp32_is_accurate_for_likely_chunks(divergence):
    """Chunks of probability ~1 at tau=100: y = p^(1/tau) is within 1e-6 of 1, where log(1 - y) computed as
    log(1 - exp(a)) in fp32 loses most of its digits; log1mexp keeps fp32 within 1e-4 of the fp64 value."""
    ls = torch.tensor([-1e-4, -3e-4, -2e-3, -5e-5])
    lt = torch.tensor([-3e-4, -1e-4, -1e-3, -2e-4])
    got = alm_sum(ls, lt, tau=100.0, divergence=divergence)
    want = naive_alm(ls.double(), lt.double(), 100.0, divergence)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)


def test_alm_dtypes_and_errors():
    ls, lt = -torch.rand(4), -torch.rand(4)
    assert alm_sum(ls, lt).dtype == torch.float32
    assert alm_sum(ls.bfloat16(), lt.bfloat16()).dtype == torch.float32
    assert alm_sum(ls.double(), lt).dtype == F64
    with pytest.raises(ValueError, match="divergence"):
        alm_sum(ls, lt, divergence="jsd")
    with pytest.raises(ValueError, match="tau"):
        alm_sum(ls, lt, tau=0.0)
    with pytest.raises(ValueError):
        alm_sum(ls, lt[:3])
    with pytest.raises(ValueError, match="weights"):
        alm_sum(ls, lt, weights=torch.ones(3))


# ----------------------------------------------------------------------------- uld


@pytest.mark.parametrize("vocabs", [(13, 7), (7, 13), (10, 10)])
@pytest.mark.parametrize("chunk_rows", [1, 2, 256])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_value_and_grad_match_naive(vocabs, chunk_rows, temperature):
    v_s, v_t = vocabs
    torch.manual_seed(15)
    r = 5
    s = (torch.randn(r, v_s, dtype=F64) * 2).requires_grad_()
    t = (torch.randn(r, v_t, dtype=F64) * 2).requires_grad_()
    weights = torch.rand(r, dtype=F64)
    got = uld_sum(s, t, temperature=temperature, weights=weights, chunk_rows=chunk_rows)
    want = naive_uld(s, t, temperature, weights)
    assert got.dim() == 0 and got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_s, g_t = torch.autograd.grad(got, [s, t], allow_unused=True)
    torch.testing.assert_close(g_s, grads(want, [s])[0], rtol=1e-10, atol=1e-12)
    assert g_t is None


def test_uld_is_zero_for_identical_and_permuted_distributions():
    torch.manual_seed(16)
    s = torch.randn(6, 11, dtype=F64, requires_grad=True)
    assert uld_sum(s, s.detach().clone()).abs().item() < 1e-12
    perm = torch.randperm(11)
    assert uld_sum(s, s.detach()[:, perm]).abs().item() < 1e-12
    # permuting either side's vocabulary leaves the value unchanged
    t = torch.randn(6, 17, dtype=F64)
    base = uld_sum(s, t)
    torch.testing.assert_close(uld_sum(s[:, perm], t), base)
    torch.testing.assert_close(uld_sum(s, t[:, torch.randperm(17)]), base)
    # identical up to padding: a teacher with extra tokens of probability ~0 changes nothing
    padded = torch.cat([s.detach(), torch.full((6, 5), -1e4, dtype=F64)], -1)
    assert uld_sum(s, padded).abs().item() < 1e-12


@pytest.mark.parametrize("vocabs", [(23, 9), (9, 23)])
@pytest.mark.parametrize("chunk_rows", [1, 3, 256])
def test_uld_from_hidden_matches_uld_on_full_logits(vocabs, chunk_rows):
    v_s, v_t = vocabs
    student = make_head(v_s, 6, seed=17, scale=0.8)
    teacher = make_head(v_t, 4, seed=18, softcap=5.0, rows=v_t + 3)
    torch.manual_seed(19)
    hs = torch.randn(7, 6, dtype=F64, requires_grad=True)
    ht = torch.randn(7, 4, dtype=F64, requires_grad=True)
    weights = torch.rand(7, dtype=F64)
    got = uld_sum_from_hidden(hs, student, ht, teacher, temperature=1.3, weights=weights, chunk_rows=chunk_rows)
    s_logits = torch.stack([naive_logits_row(hs[r], student) for r in range(7)])
    t_logits = torch.stack([naive_logits_row(ht[r], teacher) for r in range(7)])
    want = naive_uld(s_logits, t_logits, 1.3, weights)
    assert got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    params = [hs, *head_params(student)]
    for g, w in zip(grads(got, params), grads(want, params)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    g_t = torch.autograd.grad(got, [ht, teacher.weight], allow_unused=True)
    assert all(g is None for g in g_t)  # nothing reaches the teacher


def test_uld_dtypes_and_errors():
    s, t = torch.randn(3, 5), torch.randn(3, 8)
    assert uld_sum(s, t).dtype == torch.float32
    assert uld_sum(s.bfloat16(), t.bfloat16()).dtype == torch.float32
    assert uld_sum(s.double(), t.double()).dtype == F64
    student, teacher = make_head(5, 4, seed=20, dtype=torch.float32), make_head(8, 3, seed=21, dtype=torch.float32)
    value = uld_sum_from_hidden(torch.randn(3, 4).bfloat16(), student, torch.randn(3, 3), teacher)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    with pytest.raises(ValueError, match="rows"):
        uld_sum(s, t[:2])
    with pytest.raises(ValueError, match="weights"):
        uld_sum(s, t, weights=torch.ones(2))
    with pytest.raises(ValueError, match="chunk_rows"):
        uld_sum(s, t, chunk_rows=0)


def test_uld_bounds():
    """0 <= ULD <= 2 per row (an L1 distance between two probability vectors)."""
    torch.manual_seed(22)
    s, t = torch.randn(20, 6, dtype=F64) * 5, torch.randn(20, 30, dtype=F64) * 5
    per_row = torch.stack([uld_sum(s[r:r + 1], t[r:r + 1]) for r in range(20)])
    assert (per_row >= 0).all() and (per_row <= 2 + 1e-12).all()
    assert math.isclose(per_row.sum().item(), uld_sum(s, t, chunk_rows=7).item(), rel_tol=1e-12)


def test_uld_from_hidden_backward_keeps_only_the_hidden_rows():
    """Both heads run inside the per-chunk checkpoint: less than one chunk's [chunk_rows, V_t] is kept."""
    student = make_head(300, 8, seed=23, dtype=torch.float32)
    teacher = make_head(700, 6, seed=24, dtype=torch.float32)
    hs, ht = torch.randn(48, 8, requires_grad=True), torch.randn(48, 6)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = uld_sum_from_hidden(hs, student, ht, teacher, chunk_rows=8)
    assert sum(saved) < 8 * 300, saved
    value.backward()
    assert hs.grad is not None and student.weight.grad is not None and torch.isfinite(hs.grad).all()
