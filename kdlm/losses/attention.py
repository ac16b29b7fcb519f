"""Attention transfer losses on captured q/k/v (kdlm.models.capture), chunked over query rows.

- `relation_kl_sum`: MiniLM-v2 (Wang et al., 2021) self-attention relations. For x in q, k, v the heads are
  concatenated ([B, L, H*d]) and re-split into R relation heads of width d_r = H*d / R, so the student and
  teacher may have different head counts, head dims and GQA layouts; only R must divide every width used.
  rel_x = softmax_j(x_i . x_j / sqrt(d_r)) over the keys j visible from query i; per query row the loss is
  KL(teacher rel || student rel) averaged over the R heads, summed over the relation types.
- `attention_score_mse_sum`: TinyBERT (Jiao et al., 2020): per query head, the raw scores q k^T / sqrt(d)
  over visible keys; per query row the mean over heads and visible keys of (s_student - s_teacher)^2.
  Needs equal query-head counts (kv heads are repeated as the model's attention does).

Both return the SUM over the counted query rows (`query_rows`), so the caller divides by its token count.

Visibility: key j is visible from query i iff j <= i, key j is not padding (`attention_mask`), and j is in
the same document as i (document id = cumsum(position_ids == 0) along the row, for packed rows). A row
with no visible key contributes 0.

Memory: the loss never builds a [B, heads, L, L] tensor. Query rows are processed `chunk_rows` at a time
(all batch items and heads), and causality means a chunk ending at row r1 only needs keys [0, r1). Scores
are computed in float32 (float64 inputs stay float64). Peak extra memory per chunk, with E bytes per
element (4 for fp32):
  relation_kl_sum: about 7 live [B, R, c, r1] tensors (student and teacher logits, masked logits,
    log-probs, teacher probs, the KL product) ~ 7 * B * R * c * L * E at the last chunk, plus the
    re-split copies of x, 2 * B * L * H * d * E per relation type;
  attention_score_mse_sum: about 5 live [B, Hq, c, r1] tensors plus the repeated k chunk.
When a gradient is needed each chunk runs under non-reentrant `torch.utils.checkpoint`: autograd keeps only
the chunk's inputs (the re-split copies of the captured tensors, [B, L] masks) and recomputes the
chunk in backward, so backward too holds one chunk's [B, R, c, r1] tensors at a time, instead of all
chunks' saved softmaxes (~ 3 * B * R * L^2 / 2 * E, the whole matrix the chunking is meant to avoid).
The price is one extra
forward of each chunk. The visibility mask is rebuilt inside each chunk from [B, L] tensors, so nothing
O(L^2) is saved either.

Measured (CPU, fp32, B=1, L=2048, R=12, qq+kk+vv, forward+backward, peak RSS above baseline with
MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave RSS): chunk_rows=128 with checkpointing 82 MiB
(one [1, 12, 128, 2048] fp32 tensor is 12 MiB); chunk_rows=128 without checkpointing 680 MiB;
chunk_rows=2048 (unchunked) 1174 MiB (one [1, 12, 2048, 2048] tensor is 192 MiB).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence, Union

import torch
from torch.utils.checkpoint import checkpoint

RELATIONS = ("qq", "kk", "vv")
QKV = Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]


# ----------------------------------------------------------------------------- shapes and relation heads


def _as_qkv(x: QKV) -> dict[str, torch.Tensor]:
    if isinstance(x, Mapping):
        return dict(x)
    return dict(zip("qkv", x))


def attention_shapes(config) -> dict[str, tuple[int, int]]:
    """{"q": (heads, head_dim), "k": (kv_heads, head_dim), "v": (kv_heads, head_dim)} from a HF config."""
    config = getattr(config, "text_config", None) or config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"q": (heads, head_dim), "k": (kv_heads, head_dim), "v": (kv_heads, head_dim)}


def _used(relations: Sequence[str]) -> list[str]:
    bad = [r for r in relations if r not in RELATIONS]
    if bad or not relations:
        raise ValueError(f"relations {list(relations)}: each must be one of {', '.join(RELATIONS)}")
    return [r[0] for r in relations]


def check_relation_heads(relation_heads: int, widths: Mapping[str, int]) -> None:
    """Raise ValueError unless `relation_heads` divides every width (e.g. {"student q": 576, "teacher k": 256})."""
    if isinstance(relation_heads, bool) or not isinstance(relation_heads, int) or relation_heads < 1:
        raise ValueError(f"{relation_heads!r}: must be a positive integer")
    bad = {name: w for name, w in widths.items() if w % relation_heads}
    if bad:
        listed = ", ".join(f"{name} {w}" for name, w in widths.items())
        failing = ", ".join(bad)
        raise ValueError(f"{relation_heads} does not divide the width of {failing} (widths: {listed})")


def relation_widths(student_shapes: Mapping[str, tuple[int, int]], teacher_shapes: Mapping[str, tuple[int, int]],
                    relations: Sequence[str] = RELATIONS) -> dict[str, int]:
    """The concatenated-head widths the relations use, named "student q", "teacher v", ..."""
    out = {}
    for side, shapes in (("student", student_shapes), ("teacher", teacher_shapes)):
        for x in _used(relations):
            heads, dim = shapes[x]
            out[f"{side} {x}"] = heads * dim
    return out


def relation_heads_default(student_shapes: Mapping[str, tuple[int, int]],
                           teacher_shapes: Mapping[str, tuple[int, int]],
                           relations: Sequence[str] = RELATIONS) -> int:
    """The largest R that divides every width used and is at most the teacher's query-head count."""
    widths = relation_widths(student_shapes, teacher_shapes, relations)
    common = 0
    for w in widths.values():
        common = math.gcd(common, w)
    cap = teacher_shapes["q"][0]
    return max(r for r in range(1, min(cap, common) + 1) if common % r == 0)


# ----------------------------------------------------------------------------- visibility


def _context(query_rows: torch.Tensor, attention_mask, position_ids, B: int, L: int, device, row_weights=None):
    """(row weights [B, L] float: 0 off the counted rows, else row_weights or 1; key validity; document ids)."""
    if query_rows.shape != (B, L):
        raise ValueError(f"query_rows has shape {tuple(query_rows.shape)}, expected {(B, L)}")
    if row_weights is not None and row_weights.shape != (B, L):
        raise ValueError(f"row_weights has shape {tuple(row_weights.shape)}, expected {(B, L)}")
    key_valid = (torch.ones(B, L, dtype=torch.bool, device=device) if attention_mask is None
                 else attention_mask.to(device=device).bool())
    if position_ids is None:
        doc = torch.zeros(B, L, dtype=torch.long, device=device)
    else:
        doc = torch.cumsum((position_ids.to(device) == 0).long(), dim=1)
    rows = query_rows.to(device).bool().to(torch.float64)
    if row_weights is not None:
        rows = rows * row_weights.to(device=device, dtype=torch.float64)
    return rows, key_valid, doc


def _visible(key_valid: torch.Tensor, doc: torch.Tensor, r0: int, r1: int):
    """[B, c, r1] keys visible from queries r0..r1-1; rows with none get their diagonal (and a 0 weight)."""
    device = key_valid.device
    i = torch.arange(r0, r1, device=device)[:, None]
    j = torch.arange(r1, device=device)[None, :]
    vis = (j <= i)[None] & key_valid[:, None, :r1] & (doc[:, r0:r1, None] == doc[:, None, :r1])
    has = vis.any(-1)  # [B, c]
    vis = vis | ((j == i)[None] & ~has[..., None])
    return vis, has


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _chunks(L: int, chunk_rows: int):
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}: must be >= 1")
    return [(r0, min(r0 + chunk_rows, L)) for r0 in range(0, L, chunk_rows)]


def _run(fn, needs_grad: bool, *args):
    if needs_grad:
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ----------------------------------------------------------------------------- MiniLM-v2 relations


def _resplit(x: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, L, d] -> [B, R, L, H*d/R] in `dtype`."""
    B, H, L, d = x.shape
    return x.to(dtype).transpose(1, 2).reshape(B, L, heads, (H * d) // heads).transpose(1, 2)


def _masked_log_softmax(logits: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~vis, float("-inf")).log_softmax(-1)


def _relation_chunk(xs, xt, rows, key_valid, doc, r0: int, r1: int):
    vis, has = _visible(key_valid, doc, r0, r1)  # built here, so autograd keeps no [B, c, r1] mask per chunk
    weight = rows[:, r0:r1].to(xs.dtype) * has.to(xs.dtype)
    scale_s = xs.shape[-1] ** -0.5
    scale_t = xt.shape[-1] ** -0.5
    m = vis[:, None]  # [B, 1, c, r1]
    logp_s = _masked_log_softmax(xs[:, :, r0:r1] @ xs[:, :, :r1].transpose(-1, -2) * scale_s, m)
    logp_t = _masked_log_softmax(xt[:, :, r0:r1] @ xt[:, :, :r1].transpose(-1, -2) * scale_t, m)
    p_t = logp_t.exp()  # 0 at masked keys
    kl = (p_t * (logp_t.masked_fill(~m, 0.0) - logp_s.masked_fill(~m, 0.0))).sum(-1)  # [B, R, c]
    return (kl.mean(1) * weight).sum()


def relation_kl_sum(student: QKV, teacher: QKV, *, relations: Sequence[str] = RELATIONS, relation_heads: int,
                    query_rows: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, chunk_rows: int = 128,
                    row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over counted query rows of sum_x mean_R KL(teacher rel_x || student rel_x); 0-dim, fp32 (or fp64).

    `student` / `teacher`: {"q": [B, Hq, L, d], "k": [B, Hkv, L, d], "v": ...} or a captured (q, k, v) tuple;
    the two may differ in head counts and head dims. `query_rows` [B, L] bool: the rows that count;
    `row_weights` [B, L]: each counted row's coefficient (the objective's per-token c_n; None: 1).
    """
    s, t = _as_qkv(student), _as_qkv(teacher)
    used = _used(relations)
    widths = {}
    for side, qkv in (("student", s), ("teacher", t)):
        for x in used:
            _, H, _, d = qkv[x].shape
            widths[f"{side} {x}"] = H * d
    check_relation_heads(relation_heads, widths)
    B, _, L, _ = s[used[0]].shape
    for side, qkv in (("student", s), ("teacher", t)):
        for x in used:
            if qkv[x].shape[0] != B or qkv[x].shape[2] != L:
                raise ValueError(f"{side} {x} has shape {tuple(qkv[x].shape)}: expected batch {B} and length {L}")
    device = s[used[0]].device
    rows, key_valid, doc = _context(query_rows, attention_mask, position_ids, B, L, device, row_weights)
    dtype = _compute_dtype(*(s[x] for x in used), *(t[x] for x in used))
    total = torch.zeros((), dtype=dtype, device=device)
    with torch.autocast(device_type=device.type, enabled=False):  # the scores in fp32 even inside a bf16 step
        for x in used:
            xs = _resplit(s[x], relation_heads, dtype)
            xt = _resplit(t[x], relation_heads, dtype)
            needs_grad = torch.is_grad_enabled() and (xs.requires_grad or xt.requires_grad)
            for r0, r1 in _chunks(L, chunk_rows):
                total = total + _run(_relation_chunk, needs_grad, xs, xt, rows, key_valid, doc, r0, r1)
    return total


# ----------------------------------------------------------------------------- TinyBERT attention scores


def _repeat_kv(k: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return k
    B, H, L, d = k.shape
    return k[:, :, None].expand(B, H, groups, L, d).reshape(B, H * groups, L, d)


def _score_chunk(qs, ks, qt, kt, rows, key_valid, doc, r0: int, r1: int):
    vis, has = _visible(key_valid, doc, r0, r1)
    weight = rows[:, r0:r1].to(qs.dtype) * has.to(qs.dtype)
    Hq = qs.shape[1]
    ss = qs[:, :, r0:r1] @ _repeat_kv(ks[:, :, :r1], Hq // ks.shape[1]).transpose(-1, -2) * qs.shape[-1] ** -0.5
    st = qt[:, :, r0:r1] @ _repeat_kv(kt[:, :, :r1], Hq // kt.shape[1]).transpose(-1, -2) * qt.shape[-1] ** -0.5
    m = vis[:, None]
    sq = (ss - st).square().masked_fill(~m, 0.0).sum((1, 3))  # [B, c]
    per_row = sq / (Hq * vis.sum(-1)).to(sq.dtype)
    return (per_row * weight).sum()


def attention_score_mse_sum(student_qk: QKV, teacher_qk: QKV, *, query_rows: torch.Tensor,
                            attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                            chunk_rows: int = 128, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over counted query rows of the mean over heads and visible keys of (s_student - s_teacher)^2
    (times `row_weights` [B, L], the objective's per-row coefficients, when given)."""
    s, t = _as_qkv(student_qk), _as_qkv(teacher_qk)
    qs, ks, qt, kt = s["q"], s["k"], t["q"], t["k"]
    if qs.shape[1] != qt.shape[1]:
        raise ValueError(f"attention_score needs equal head counts (student {qs.shape[1]}, teacher {qt.shape[1]}); "
                         "use attention_relation")
    for side, q, k in (("student", qs, ks), ("teacher", qt, kt)):
        if q.shape[1] % k.shape[1] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
            raise ValueError(f"{side} q {tuple(q.shape)} and k {tuple(k.shape)} do not fit together")
    if qs.shape[0] != qt.shape[0] or qs.shape[2] != qt.shape[2]:
        raise ValueError(f"student q {tuple(qs.shape)} and teacher q {tuple(qt.shape)}: batch and length differ")
    B, _, L, _ = qs.shape
    rows, key_valid, doc = _context(query_rows, attention_mask, position_ids, B, L, qs.device, row_weights)
    dtype = _compute_dtype(qs, ks, qt, kt)
    qs, ks, qt, kt = (x.to(dtype) for x in (qs, ks, qt, kt))
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (qs, ks, qt, kt))
    total = torch.zeros((), dtype=dtype, device=qs.device)
    with torch.autocast(device_type=qs.device.type, enabled=False):
        for r0, r1 in _chunks(L, chunk_rows):
            total = total + _run(_score_chunk, needs_grad, qs, ks, qt, kt, rows, key_valid, doc, r0, r1)
    return total
