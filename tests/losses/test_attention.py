"""Tests for kdlm.losses.attention: chunked MiniLM-v2 relation KL and TinyBERT score MSE vs float64 references."""

from __future__ import annotations

import pytest
import torch

from kdlm.losses.attention import (
    attention_score_mse_sum,
    attention_shapes,
    check_relation_heads,
    relation_heads_default,
    relation_kl_sum,
)

B, L = 2, 7


# ----------------------------------------------------------------------------- references (full [B, H, L, L])


def reference_visible(attention_mask, position_ids):
    """[B, L, L] bool built with explicit loops."""
    vis = torch.zeros(B, L, L, dtype=torch.bool)
    for b in range(B):
        doc, docs = 0, []
        for i in range(L):
            if position_ids is not None and position_ids[b, i] == 0:
                doc += 1
            docs.append(doc)
        for i in range(L):
            for j in range(i + 1):
                real = attention_mask is None or bool(attention_mask[b, j])
                vis[b, i, j] = real and docs[i] == docs[j]
    return vis


def reference_relation_kl(student, teacher, relations, R, query_rows, attention_mask, position_ids):
    vis = reference_visible(attention_mask, position_ids)
    total = torch.zeros((), dtype=torch.float64)
    for rel in relations:
        x = rel[0]
        per_side = []
        for qkv in (student, teacher):
            t = qkv[x]
            b, H, n, d = t.shape
            cat = t.permute(0, 2, 1, 3).reshape(b, n, H * d)
            dr = H * d // R
            heads = cat.reshape(b, n, R, dr).permute(0, 2, 1, 3)  # [B, R, L, dr]
            logits = heads @ heads.transpose(-1, -2) / dr ** 0.5
            logits = logits.masked_fill(~vis[:, None], float("-inf"))
            per_side.append(torch.softmax(logits, -1))
        ps, pt = per_side
        for b in range(B):
            for i in range(L):
                if not query_rows[b, i] or not vis[b, i].any():
                    continue
                js = vis[b, i].nonzero().flatten()
                kl = (pt[b, :, i, js] * (pt[b, :, i, js].log() - ps[b, :, i, js].log())).sum(-1)
                total = total + kl.mean()
    return total


def reference_score_mse(student, teacher, query_rows, attention_mask, position_ids):
    vis = reference_visible(attention_mask, position_ids)
    scores = []
    for qkv in (student, teacher):
        q, k = qkv["q"], qkv["k"]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores.append(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5)
    ss, st = scores
    total = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        for i in range(L):
            if not query_rows[b, i] or not vis[b, i].any():
                continue
            js = vis[b, i].nonzero().flatten()
            total = total + ((ss[b, :, i, js] - st[b, :, i, js]) ** 2).mean()
    return total


# ----------------------------------------------------------------------------- fixtures


def qkv(hq, hkv, d, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    out = {"q": torch.randn(B, hq, L, d, generator=g, dtype=torch.float64),
           "k": torch.randn(B, hkv, L, d, generator=g, dtype=torch.float64),
           "v": torch.randn(B, hkv, L, d, generator=g, dtype=torch.float64)}
    return {k: v.requires_grad_(grad) for k, v in out.items()}


MASKS = {
    "causal": (None, None),
    "right_padding": (torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]), None),
    "left_padding": (torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]), None),
    "packed": (None, torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3, 4]])),
    "packed_padded": (torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]]),
                      torch.tensor([[0, 1, 0, 1, 2, 0, 0], [0, 1, 2, 0, 1, 2, 3]])),
}


def rows_for(attention_mask):
    rows = torch.ones(B, L, dtype=torch.bool)
    rows[0, 0] = False  # a row that does not count
    if attention_mask is not None:
        rows &= attention_mask.bool()
    return rows


# ----------------------------------------------------------------------------- relation KL


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("chunk", [1, 3, L])
def test_relation_kl_matches_reference_values_and_grads(mask, chunk):
    attention_mask, position_ids = MASKS[mask]
    rows = rows_for(attention_mask)
    student = qkv(4, 2, 6, seed=1, grad=True)  # GQA student: q width 24, kv width 12
    teacher = qkv(3, 1, 8, seed=2)  # different head counts and dims: q width 24, kv width 8
    R = 4
    got = relation_kl_sum(student, teacher, relation_heads=R, query_rows=rows, attention_mask=attention_mask,
                          position_ids=position_ids, chunk_rows=chunk)
    want = reference_relation_kl(student, teacher, ("qq", "kk", "vv"), R, rows, attention_mask, position_ids)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert want.item() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    inputs = [student["q"], student["k"], student["v"]]
    g_got = torch.autograd.grad(got, inputs)
    g_want = torch.autograd.grad(want, inputs)
    for a, b in zip(g_got, g_want):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_relation_kl_chunked_equals_unchunked_fp32():
    torch.manual_seed(0)
    s = {k: v.float() for k, v in qkv(4, 2, 8, seed=3, grad=False).items()}
    t = {k: v.float() for k, v in qkv(6, 2, 8, seed=4).items()}
    rows = torch.ones(B, L, dtype=torch.bool)
    position_ids = MASKS["packed"][1]
    full = relation_kl_sum(s, t, relation_heads=8, query_rows=rows, position_ids=position_ids, chunk_rows=L)
    for chunk in (1, 2, 5):
        part = relation_kl_sum(s, t, relation_heads=8, query_rows=rows, position_ids=position_ids, chunk_rows=chunk)
        torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-6)


def test_relation_subset_and_tuple_inputs():
    s, t = qkv(4, 2, 6, seed=5), qkv(4, 2, 6, seed=6)
    rows = torch.ones(B, L, dtype=torch.bool)
    one = relation_kl_sum(s, t, relations=("vv",), relation_heads=2, query_rows=rows)
    want = reference_relation_kl(s, t, ("vv",), 2, rows, None, None)
    torch.testing.assert_close(one, want)
    as_tuple = relation_kl_sum((s["q"], s["k"], s["v"]), (t["q"], t["k"], t["v"]), relations=("vv",),
                               relation_heads=2, query_rows=rows)
    torch.testing.assert_close(as_tuple, one)


def test_relation_kl_zero_for_identical():
    s = qkv(4, 2, 6, seed=7)
    rows = torch.ones(B, L, dtype=torch.bool)
    got = relation_kl_sum(s, {k: v.clone() for k, v in s.items()}, relation_heads=3, query_rows=rows)
    assert abs(got.item()) < 1e-12


@pytest.mark.parametrize("mask", ["right_padding", "left_padding", "packed"])
def test_masked_out_keys_do_not_matter(mask):
    attention_mask, position_ids = MASKS[mask]
    rows = rows_for(attention_mask)
    s, t = qkv(4, 2, 6, seed=8), qkv(4, 2, 6, seed=9)
    base = relation_kl_sum(s, t, relation_heads=4, query_rows=rows, attention_mask=attention_mask,
                           position_ids=position_ids, chunk_rows=3)
    base_mse = attention_score_mse_sum(s, t, query_rows=rows, attention_mask=attention_mask,
                                       position_ids=position_ids, chunk_rows=3)
    if mask == "right_padding":
        # row 0 positions 5, 6 are padding: change their keys (and values) in the student and teacher
        changed = [(0, 5), (0, 6)]
    elif mask == "left_padding":
        changed = [(0, 0), (0, 1)]  # keys before every counted query of row 0
    else:
        # docs: row 0 [0..2] [3,4] [5,6]; row 1 [0,1] [2..6]: change the first documents, count only later rows
        rows = rows.clone()
        rows[:, :3] = False
        base = relation_kl_sum(s, t, relation_heads=4, query_rows=rows, position_ids=position_ids, chunk_rows=3)
        base_mse = attention_score_mse_sum(s, t, query_rows=rows, position_ids=position_ids, chunk_rows=3)
        changed = [(1, 0), (1, 1), (0, 0), (0, 1), (0, 2)]
    s2, t2 = {k: v.clone() for k, v in s.items()}, {k: v.clone() for k, v in t.items()}
    for b, j in changed:
        for d in (s2, t2):
            for x in "qkv":
                d[x][b, :, j] += 5.0
    after = relation_kl_sum(s2, t2, relation_heads=4, query_rows=rows, attention_mask=attention_mask,
                            position_ids=position_ids, chunk_rows=3)
    after_mse = attention_score_mse_sum(s2, t2, query_rows=rows, attention_mask=attention_mask,
                                        position_ids=position_ids, chunk_rows=3)
    torch.testing.assert_close(after, base)
    torch.testing.assert_close(after_mse, base_mse)
    # and the same change at a visible key does matter (the test can fail)
    s3 = {k: v.clone() for k, v in s.items()}
    s3["k"][1, :, 3] += 5.0
    moved = relation_kl_sum(s3, t, relation_heads=4, query_rows=rows, attention_mask=attention_mask,
                            position_ids=position_ids, chunk_rows=3)
    assert abs(moved.item() - base.item()) > 1e-6


def test_relation_heads_must_divide_widths():
    s, t = qkv(4, 2, 6, seed=1), qkv(3, 1, 8, seed=2)  # widths: 24, 12 / 24, 8
    rows = torch.ones(B, L, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"3 does not divide the width of teacher k, teacher v \(widths: student q 24"):
        relation_kl_sum(s, t, relation_heads=3, query_rows=rows)
    check_relation_heads(4, {"student q": 24, "teacher k": 8})
    with pytest.raises(ValueError, match="positive"):
        check_relation_heads(0, {"student q": 24})


def test_relation_heads_default():
    # Qwen2.5-1.5B teacher (12 heads, 2 kv, d 128) -> 0.5B student (14 heads, 2 kv, d 64)
    teacher = {"q": (12, 128), "k": (2, 128), "v": (2, 128)}
    student = {"q": (14, 64), "k": (2, 64), "v": (2, 64)}
    assert relation_heads_default(student, teacher) == 8
    # 12-head teacher, 9-head student, d 64: gcd(576, 768) = 192 -> 12; with kv widths 128/192 too -> gcd 64 -> 8
    teacher = {"q": (12, 64), "k": (3, 64), "v": (3, 64)}
    student = {"q": (9, 64), "k": (2, 64), "v": (2, 64)}
    assert relation_heads_default(student, teacher, relations=("qq",)) == 12
    assert relation_heads_default(student, teacher) == 8
    from transformers import LlamaConfig

    shapes = attention_shapes(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2))
    assert shapes == {"q": (4, 16), "k": (2, 16), "v": (2, 16)}


# ----------------------------------------------------------------------------- attention-score MSE


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("chunk", [1, 3, L])
def test_score_mse_matches_reference(mask, chunk):
    attention_mask, position_ids = MASKS[mask]
    rows = rows_for(attention_mask)
    student = qkv(4, 2, 6, seed=11, grad=True)  # GQA, head dim 6
    teacher = qkv(4, 4, 8, seed=12)  # same query heads, MHA, head dim 8
    got = attention_score_mse_sum(student, teacher, query_rows=rows, attention_mask=attention_mask,
                                  position_ids=position_ids, chunk_rows=chunk)
    want = reference_score_mse(student, teacher, rows, attention_mask, position_ids)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    inputs = [student["q"], student["k"]]
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_score_mse_needs_equal_heads():
    rows = torch.ones(B, L, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"attention_score needs equal head counts \(student 4, teacher 3\); "
                                         r"use attention_relation"):
        attention_score_mse_sum(qkv(4, 2, 6, seed=1), qkv(3, 1, 8, seed=2), query_rows=rows)


def test_fp32_inputs_compute_in_fp32_and_bf16_upcast():
    s = {k: v.to(torch.bfloat16) for k, v in qkv(4, 2, 8, seed=1).items()}
    t = {k: v.to(torch.bfloat16) for k, v in qkv(4, 2, 8, seed=2).items()}
    rows = torch.ones(B, L, dtype=torch.bool)
    out = relation_kl_sum(s, t, relation_heads=4, query_rows=rows)
    assert out.dtype == torch.float32
    ref = relation_kl_sum({k: v.double() for k, v in s.items()}, {k: v.double() for k, v in t.items()},
                          relation_heads=4, query_rows=rows)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_autograd_keeps_no_full_relation_matrix():
    """With a gradient, each chunk is checkpointed: the forward saves no [B, R, c, L] tensor for backward."""
    n, R = 64, 4
    g = torch.Generator().manual_seed(0)
    s = {x: torch.randn(1, 2, n, 4, generator=g, requires_grad=True) for x in "qkv"}  # width 8
    t = {x: torch.randn(1, 1, n, 8, generator=g) for x in "qkv"}
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = relation_kl_sum(s, t, relation_heads=R, query_rows=torch.ones(1, n, dtype=torch.bool), chunk_rows=8)
    # only chunk inputs (the re-split x, [1, n, 8], and masks) are kept; the last chunk's scores are [1, R, 8, n]
    assert saved and max(saved) <= n * 8 < R * 8 * n
    loss.backward()
    assert s["q"].grad.abs().sum() > 0


def test_row_weights_scale_each_counted_row():
    """The objective's per-token coefficients reach the attention terms row by row."""
    from kdlm.losses.attention import attention_score_mse_sum, relation_kl_sum

    g = torch.Generator().manual_seed(3)
    B, L = 2, 6
    s = {x: torch.randn(B, 2, L, 4, dtype=torch.float64, generator=g) for x in "qkv"}
    t = {x: torch.randn(B, 2, L, 4, dtype=torch.float64, generator=g) for x in "qkv"}
    rows = torch.ones(B, L, dtype=torch.bool)
    rows[:, -1] = False
    weights = torch.rand(B, L, dtype=torch.float64, generator=g)
    for fn, kwargs in ((relation_kl_sum, {"relation_heads": 2}), (attention_score_mse_sum, {})):
        per_row = []
        for b in range(B):
            for i in range(L - 1):
                only = torch.zeros(B, L, dtype=torch.bool)
                only[b, i] = True
                per_row.append(fn(s, t, query_rows=only, **kwargs) * weights[b, i])
        got = fn(s, t, query_rows=rows, row_weights=weights, chunk_rows=4, **kwargs)
        torch.testing.assert_close(got, torch.stack(per_row).sum())
        assert not torch.allclose(got, fn(s, t, query_rows=rows, chunk_rows=4, **kwargs))


def test_scores_stay_fp32_inside_a_bf16_autocast_step():
    """Under the training step's autocast the score matmuls would run in bf16 and a KL could come out negative."""
    from kdlm.losses.attention import relation_kl_sum

    g = torch.Generator().manual_seed(0)
    s = {x: torch.randn(2, 2, 12, 8, generator=g).bfloat16() for x in "qkv"}
    t = {x: torch.randn(2, 2, 12, 8, generator=g).bfloat16() for x in "qkv"}
    rows = torch.ones(2, 12, dtype=torch.bool)
    plain = relation_kl_sum(s, t, relation_heads=2, query_rows=rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = relation_kl_sum(s, t, relation_heads=2, query_rows=rows)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain)
