"""Tests for kdlm.losses.fused: the chunked LM-head losses against full-logits references.

The references build the full [N, V] logits explicitly (h @ W.T + b, scale, soft-capping,
vocab cut) and call the unfused `divergence` / F.cross_entropy / `term_sums`. Every
comparison forces several chunks (uneven last one) with a small byte budget.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdlm.losses import fused
from kdlm.losses.divergences import DIVERGENCE_KINDS, divergence
from kdlm.losses.fused import TOTAL_KEY, chunk_buffers, chunk_rows, fused_divergence, fused_sums
from kdlm.losses.objective import LMHead, Term, term_sums, weighted_total

KINDS = DIVERGENCE_KINDS + ("ce",)
B, L = 3, 7  # leading dims of the hidden states
H_S, H_T = 8, 12  # the two models' hidden sizes differ
VOCAB = 37  # shared vocabulary; the heads have padding rows beyond it
ROWS_S, ROWS_T = 40, 43


def _randn(*shape, seed, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _inputs(seed=0, dtype=torch.float64):
    """Student/teacher hidden states [B, L, H], heads with padding rows, biases, mask, targets."""
    student_hidden = _randn(B, L, H_S, seed=seed, dtype=dtype).requires_grad_()
    student_weight = _randn(ROWS_S, H_S, seed=seed + 1, scale=0.7, dtype=dtype).requires_grad_()
    student_bias = _randn(ROWS_S, seed=seed + 2, scale=0.3, dtype=dtype).requires_grad_()
    teacher_hidden = _randn(B, L, H_T, seed=seed + 3, dtype=dtype)
    teacher_weight = _randn(ROWS_T, H_T, seed=seed + 4, scale=0.7, dtype=dtype)
    teacher_bias = _randn(ROWS_T, seed=seed + 5, scale=0.3, dtype=dtype)
    mask = _randn(B, L, seed=seed + 6) > -0.5  # ~70% counted
    targets = torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(seed + 7))
    return student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask, targets


def _ref_logits(hidden, weight, bias, scale=1.0, softcap=None):
    """Full logits [..., VOCAB], written out directly: softcap * tanh((h W^T + b) * scale / softcap)."""
    logits = (hidden @ weight.T + (bias if bias is not None else 0.0)) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits[..., :VOCAB]


def _budget(rows: int, kinds, dtype=torch.float64, softcap=False) -> int:
    """The chunk_bytes that gives exactly `rows` rows per chunk."""
    return rows * VOCAB * torch.empty((), dtype=dtype).element_size() * chunk_buffers(kinds, softcap=softcap)


@pytest.fixture
def chunk_spy(monkeypatch):
    """Records (rows, hidden size) of every head chunk computed, student and teacher alike (student first)."""
    seen = []
    original = fused._head_logits

    def spy(hidden, weight, bias, scale, softcap):
        seen.append((hidden.shape[0], weight.shape[1]))
        return original(hidden, weight, bias, scale, softcap)

    monkeypatch.setattr(fused, "_head_logits", spy)
    return seen


def _rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


# ----------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_float64(kind, chunk_spy):
    sh, sw, sb, th, tw, tb, mask, targets = _inputs(seed=1)
    kw = dict(temperature=2.0, beta=0.3, skew=0.2)
    student_logits = _ref_logits(sh, sw, sb)
    if kind == "ce":
        want = F.cross_entropy(student_logits[mask], targets[mask])
    else:
        want = divergence(student_logits, _ref_logits(th, tw, tb), kind, mask=mask, **kw)
    want_grads = torch.autograd.grad(want, (sh, sw, sb))

    n_counted = int(mask.sum())
    assert n_counted == 15  # 4 chunks of 4 rows: 4 + 4 + 4 + 3
    got = fused_divergence(
        sh, sw, th, tw, kind, mask=mask, targets=targets, student_bias=sb, teacher_bias=tb, vocab=VOCAB,
        chunk_bytes=_budget(4, [kind]), **kw,
    )
    student_chunks = [rows for rows, hidden_size in chunk_spy if hidden_size == H_S]
    assert student_chunks == [4, 4, 4, 3]
    assert got.dim() == 0 and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    got_grads = torch.autograd.grad(got, (sh, sw, sb))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-15)
    # padding rows of the head (beyond the vocab) are never compared: exactly zero grad
    assert torch.equal(got_grads[1][VOCAB:], torch.zeros_like(got_grads[1][VOCAB:]))
    assert got_grads[1][:VOCAB].abs().min() > 0


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "skew_reverse_kl", "ce"])
def test_softcap_and_logit_scale(kind):
    sh, sw, sb, th, tw, tb, mask, targets = _inputs(seed=2)
    sh = (4.0 * sh.detach()).requires_grad_()  # large logits: the soft-capping really bites
    scale, softcap = (1.7, 0.5), (3.0, 5.0)
    student_logits = _ref_logits(sh, sw, sb, scale[0], softcap[0])
    assert (student_logits.abs() > 2.0).any()
    if kind == "ce":
        want = F.cross_entropy(student_logits[mask], targets[mask])
    else:
        want = divergence(student_logits, _ref_logits(th, tw, tb, scale[1], softcap[1]), kind, mask=mask, temperature=2.0)
    want_grads = torch.autograd.grad(want, (sh, sw, sb))
    common = dict(mask=mask, targets=targets, student_bias=sb, teacher_bias=tb, vocab=VOCAB, temperature=2.0)
    got = fused_divergence(
        sh, sw, th, tw, kind, logit_scale=scale, softcap=softcap, chunk_bytes=_budget(4, [kind], softcap=True), **common
    )
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    for g, w in zip(torch.autograd.grad(got, (sh, sw, sb)), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-15)
    # capping and scaling are not no-ops here
    uncapped = fused_divergence(sh, sw, th, tw, kind, **common)
    assert abs(uncapped.item() - got.item()) > 1e-3 * abs(got.item())


def test_fused_sums_match_term_sums():
    sh, sw, sb, th, tw, tb, mask, targets = _inputs(seed=3)
    student_rows, teacher_rows, targets = sh[mask], th[mask], targets[mask]  # [N, H], as the trainer passes them
    student_head = LMHead(sw, sb, VOCAB, scale=1.3, softcap=4.0)
    teacher_head = LMHead(tw, tb, VOCAB, scale=0.8)
    terms = [Term("ce", "ce", 0.3, 2.0, 0.5, 0.1), Term("forward_kl", "forward_kl", 0.7, 2.0, 0.5, 0.1)]

    # LMHead.logits works in fp32 always; the same head in fp64 for a 1e-9 comparison
    student_logits = _ref_logits(student_rows, sw, sb, scale=1.3, softcap=4.0)
    want = term_sums(student_logits, _ref_logits(teacher_rows, tw, tb, scale=0.8), targets, terms)
    want_total = weighted_total(want, terms)
    want_grads = torch.autograd.grad(want_total, (sh, sw, sb))

    got = fused_sums(
        sh[mask], student_head, teacher_rows, teacher_head, targets, terms,
        chunk_bytes=_budget(4, ["ce", "forward_kl"], softcap=True),
    )
    assert set(got) == {"ce", "forward_kl", TOTAL_KEY}
    for label in ("ce", "forward_kl"):
        torch.testing.assert_close(got[label], want[label].detach(), rtol=1e-9, atol=0)
        assert not got[label].requires_grad  # values for logging; the total carries the graph
    torch.testing.assert_close(got[TOTAL_KEY], want_total, rtol=1e-9, atol=0)
    for g, w in zip(torch.autograd.grad(got[TOTAL_KEY], (sh, sw, sb)), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-15)

    # and literally term_sums over LMHead.logits, in fp32 (what the trainer computes today)
    rows32 = [t.detach().float() for t in (student_rows, teacher_rows)]
    heads32 = [LMHead(w.detach().float(), b.detach().float(), VOCAB, h.scale, h.softcap)
               for w, b, h in ((sw, sb, student_head), (tw, tb, teacher_head))]
    want32 = term_sums(heads32[0].logits(rows32[0]), heads32[1].logits(rows32[1]), targets, terms)
    got32 = fused_sums(rows32[0], heads32[0], rows32[1], heads32[1], targets, terms, chunk_bytes=2**12)
    for label in ("ce", "forward_kl"):
        assert got32[label].dtype == torch.float32
        torch.testing.assert_close(got32[label], want32[label], rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- dtypes and numerics


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_bf16_inputs_fp32_inside(kind):
    # a realistic distillation pair: the teacher head is close to the student's
    N, H, V = 48, 64, 1024
    student_hidden = _randn(N, H, seed=4, dtype=torch.bfloat16)
    student_weight = _randn(V, H, seed=5, scale=0.5, dtype=torch.bfloat16)
    teacher_weight = (student_weight.double() + _randn(V, H, seed=6, scale=0.05)).bfloat16()
    teacher_hidden = student_hidden.clone()

    # float64 reference from the SAME bf16-rounded inputs
    h64, w64 = student_hidden.double().requires_grad_(), student_weight.double().requires_grad_()
    want = divergence(h64 @ w64.T, teacher_hidden.double() @ teacher_weight.double().T, kind, temperature=2.0)
    want_grads = torch.autograd.grad(want, (h64, w64))

    h, w = student_hidden.clone().requires_grad_(), student_weight.clone().requires_grad_()
    got = fused_divergence(h, w, teacher_hidden, teacher_weight, kind, temperature=2.0, chunk_bytes=V * 4 * 10 * 16)
    got_grads = torch.autograd.grad(got, (h, w))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    for g, ref in zip(got_grads, want_grads):
        assert g.dtype == torch.bfloat16
        # the only error left is the final rounding to bf16 (~1.7e-3 here), done once
        assert _rel(g, ref) < 2.5e-3
        assert _rel(g, ref.bfloat16()) < 5e-4  # rounds like the exact grad bar a few ties (double rounding: ~3e-3)

    # the naive order (bf16 logits, upcast afterwards) is an order of magnitude worse
    h, w = student_hidden.clone().requires_grad_(), student_weight.clone().requires_grad_()
    naive = divergence((h @ w.T).float(), (teacher_hidden @ teacher_weight.T).float(), kind, temperature=2.0)
    for g, ref in zip(torch.autograd.grad(naive, (h, w)), want_grads):
        assert _rel(g, ref) > 2e-2


def test_autocast_is_off_inside():
    sh, sw, sb, th, tw, tb, mask, _ = _inputs(seed=7, dtype=torch.float32)
    want = fused_divergence(sh, sw, th, tw, "forward_kl", mask=mask, vocab=VOCAB)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_divergence(sh, sw, th, tw, "forward_kl", mask=mask, vocab=VOCAB)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- gradients


def test_grad_output_scaling_and_teacher_gets_no_gradient():
    sh, sw, sb, th, tw, tb, mask, _ = _inputs(seed=8)
    th, tw = th.clone().requires_grad_(), tw.clone().requires_grad_()
    kw = dict(mask=mask, student_bias=sb, teacher_bias=tb, vocab=VOCAB, temperature=2.0, chunk_bytes=_budget(4, ["jsd"]))
    loss = 2.5 * fused_divergence(sh, sw, th, tw, "jsd", **kw)
    loss.backward(retain_graph=True)
    assert th.grad is None and tw.grad is None
    with pytest.raises(RuntimeError, match="twice"):  # the stored grads were scaled in place
        loss.backward()
    reference = divergence(_ref_logits(sh, sw, sb), _ref_logits(th, tw, tb), "jsd", mask=mask, temperature=2.0)
    want = torch.autograd.grad(2.5 * reference, (sh, sw, sb))
    for g, w in zip((sh.grad, sw.grad, sb.grad), want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("kind", ["forward_kl", "ce"])
def test_empty_mask_is_zero_with_zero_grads(kind):
    sh, sw, sb, th, tw, tb, _, targets = _inputs(seed=9, dtype=torch.float32)
    out = fused_divergence(
        sh, sw, th, tw, kind, mask=torch.zeros(B, L, dtype=torch.bool), targets=targets, student_bias=sb, vocab=VOCAB,
        temperature=2.0,
    )
    assert out.dim() == 0 and out.item() == 0.0
    out.backward()
    for tensor in (sh, sw, sb):
        assert torch.equal(tensor.grad, torch.zeros_like(tensor))


def test_no_grad_path_gives_the_same_value():
    sh, sw, sb, th, tw, tb, mask, _ = _inputs(seed=10)
    want = fused_divergence(sh, sw, th, tw, "tvd", mask=mask, vocab=VOCAB)
    with torch.no_grad():
        got = fused_divergence(sh, sw, th, tw, "tvd", mask=mask, vocab=VOCAB)
    assert not got.requires_grad
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- the byte budget


def test_chunk_rows_from_byte_budget():
    # forward_kl alone: K = 2 (student logits, their grad) + 1 (teacher logits) + 7 (the term) = 10
    assert chunk_buffers(["forward_kl"]) == 10
    assert chunk_rows(49152, ["forward_kl"], chunk_bytes=256 * 2**20) == 256 * 2**20 // (49152 * 4 * 10)
    assert chunk_rows(49152, ["forward_kl"], dtype=torch.float64, chunk_bytes=256 * 2**20) == 256 * 2**20 // (49152 * 8 * 10)
    # soft-capping and a second term each keep one more [rows, V] buffer; ce alone needs no teacher
    assert chunk_rows(1000, ["ce", "forward_kl"], softcap=True, chunk_bytes=10**6) == 10**6 // (1000 * 4 * 12)
    assert chunk_rows(1000, ["ce"], chunk_bytes=10**6) == 10**6 // (1000 * 4 * 4)
    assert chunk_rows(10**6, ["jsd"], chunk_bytes=1) == 1  # never 0 rows


def test_chunks_never_hold_all_rows(chunk_spy):
    N, H, V = 50, 16, 300
    hidden = _randn(N, H, seed=11, dtype=torch.float32).requires_grad_()
    weight = _randn(V, H, seed=12, dtype=torch.float32).requires_grad_()
    budget = 7 * V * 4 * 10  # 7 rows of forward_kl in fp32
    fused_divergence(hidden, weight, hidden.detach(), weight.detach() + 0.1, "forward_kl", chunk_bytes=budget).backward()
    rows = [r for r, _ in chunk_spy[::2]]  # student, teacher, student, teacher, ...
    assert rows == [7] * 7 + [1]
    assert max(r for r, _ in chunk_spy) == 7 < N


# ----------------------------------------------------------------------------- errors


def test_clear_errors():
    sh, sw, sb, th, tw, tb, mask, targets = _inputs(seed=13)
    with pytest.raises(ValueError, match="unknown divergence kind"):
        fused_divergence(sh, sw, th, tw, "kl_forward", vocab=VOCAB)
    with pytest.raises(ValueError, match="does not match its head weight"):
        fused_divergence(sh, tw, th, tw, "forward_kl", vocab=VOCAB)
    with pytest.raises(ValueError, match="leading dims"):
        fused_divergence(sh, sw, th[:, :-1], tw, "forward_kl", vocab=VOCAB)
    with pytest.raises(ValueError, match="pass vocab="):
        fused_divergence(sh, sw, th, tw, "forward_kl")
    with pytest.raises(ValueError, match="vocab 50 must be in"):
        fused_divergence(sh, sw, th, tw, "forward_kl", vocab=50)
    for bad in [(-1.0, None), ("30", None), (None, math.inf), 30.0, (30.0,)]:
        with pytest.raises(ValueError, match="softcap"):
            fused_divergence(sh, sw, th, tw, "forward_kl", vocab=VOCAB, softcap=bad)
    with pytest.raises(ValueError, match="mask"):
        fused_divergence(sh, sw, th, tw, "forward_kl", vocab=VOCAB, mask=mask[:, :3])
    with pytest.raises(ValueError, match="targets"):
        fused_divergence(sh, sw, None, None, "ce")
    with pytest.raises(ValueError, match="bias"):
        fused_divergence(sh, sw, th, tw, "forward_kl", vocab=VOCAB, student_bias=sb[:VOCAB])
    with pytest.raises(ValueError, match="needs teacher"):
        fused_sums(sh[0], LMHead(sw, None, VOCAB), None, None, None, [Term("kl", "forward_kl", 1.0, 1.0, 0.5, 0.1)])
    with pytest.raises(ValueError, match="unique"):
        fused_sums(sh[0], LMHead(sw, None, VOCAB), None, None, targets[0], [Term("ce", "ce", 1.0, 1.0, 0.5, 0.1)] * 2)


def test_fused_sums_with_a_sparse_teacher_equal_the_sparse_objective():
    """A cached top-k teacher through the fused chunk loop equals sparse_term_sums on full logits."""
    from kdlm.losses.objective import LMHead, Term, weighted_total
    from kdlm.losses.sparse import SparseTeacher, sparse_term_sums

    g = torch.Generator().manual_seed(7)
    n, h, v, k = 11, 6, 40, 5
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = SparseTeacher.from_logits(torch.randn(n, v, generator=g, dtype=torch.float64) * 3, k, 1.0)
    targets = torch.randint(v, (n,), generator=g)
    terms = [Term("ce", "ce", 0.25, 1.0, 0.5, 0.1), Term("forward_kl", "forward_kl", 0.75, 1.0, 0.5, 0.1)]
    head = LMHead(weight, None, v)

    fused = fused_sums(hidden, head, teacher, None, targets, terms, chunk_bytes=4 * v * 8 * 12)  # several chunks
    (g_hidden, g_weight) = torch.autograd.grad(fused[TOTAL_KEY], (hidden, weight))
    reference = sparse_term_sums(hidden @ weight.T, teacher, targets, terms)
    (r_hidden, r_weight) = torch.autograd.grad(weighted_total(reference, terms), (hidden, weight))
    for term in terms:
        torch.testing.assert_close(fused[term.label], reference[term.label].detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_hidden, r_hidden, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_weight, r_weight, rtol=1e-9, atol=1e-12)
