"""Tests for kdlm.losses.divergences.

The reference below is written directly from the formulas with plain probabilities
(softmax, then sum p*log(p/q)); it shares no code with the module under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kdlm.losses import DIVERGENCE_KINDS, divergence, get_divergence, per_position_divergence, register_divergence
from kdlm.losses import divergences as divergences_module

KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl", "taid")
# taid's gradient goes through log p_S only (its target p_t is detached by design), so it is not the
# derivative of its value: finite-difference checks do not apply (its gradient is tested in test_taid.py)
DIFFERENTIABLE_KINDS = tuple(kind for kind in KINDS if kind != "taid")
GOLDEN_PATH = Path(__file__).with_name("golden_divergences.json")


# ----------------------------------------------------------------------------- independent reference


def _softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    ratio = torch.where(p > 0, p / q, torch.ones_like(p))
    return (p * torch.log(ratio)).sum(-1)


def ref_per_position(s, t, kind, temperature=1.0, beta=0.5, skew=0.1):
    s, t = s.double(), t.double()
    p_s, p_t = _softmax(s / temperature), _softmax(t / temperature)
    if kind == "forward_kl":
        return _kl(p_t, p_s)
    if kind == "reverse_kl":
        return _kl(p_s, p_t)
    if kind == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        # a weight-0 term is 0 (its limit), even where its KL is infinite
        teacher_term = beta * _kl(p_t, m) if beta > 0 else 0.0
        student_term = (1 - beta) * _kl(p_s, m) if beta < 1 else 0.0
        return teacher_term + student_term
    if kind == "tvd":
        return 0.5 * (p_t - p_s).abs().sum(-1)
    if kind == "skew_forward_kl":
        return _kl(p_t, skew * p_t + (1 - skew) * p_s)
    if kind == "skew_reverse_kl":
        return _kl(p_s, skew * p_s + (1 - skew) * p_t)
    if kind == "taid":  # p_target = normalised p_S^(1-beta) * p_T^beta (the endpoints are exact: no 0 * log 0)
        if beta == 0:
            return _kl(p_s, p_s)
        if beta == 1:
            return _kl(p_t, p_s)
        mixed = p_s ** (1 - beta) * p_t**beta
        return _kl(mixed / mixed.sum(-1, keepdim=True), p_s)
    raise AssertionError(kind)


def ref_divergence(s, t, kind, temperature=1.0, beta=0.5, skew=0.1, mask=None):
    per_pos = ref_per_position(s, t, kind, temperature, beta, skew)
    if mask is not None:
        per_pos = per_pos[mask]
    return temperature**2 * per_pos.mean()


def _logits(*shape, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=dtype)


def _pair(*shape, seed=0, scale=2.0, dtype=torch.float64):
    return _logits(*shape, seed=seed, scale=scale, dtype=dtype), _logits(*shape, seed=seed + 1000, scale=scale, dtype=dtype)


# ----------------------------------------------------------------------------- against the reference


def test_kinds_listed():
    assert DIVERGENCE_KINDS == KINDS


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_reference_float64(kind, temperature):
    s, t = _pair(3, 5, 17, seed=1)
    mask = _logits(3, 5, seed=2) > -1.0
    assert 0 < mask.sum() < mask.numel()
    kw = dict(temperature=temperature, beta=0.3, skew=0.2)
    got = divergence(s, t, kind, mask=mask, **kw)
    want = ref_divergence(s, t, kind, mask=mask, **kw)
    assert got.dim() == 0 and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    per_pos = per_position_divergence(s, t, kind, **kw)
    torch.testing.assert_close(per_pos, ref_per_position(s, t, kind, **kw), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_float32(kind):
    s, t = _pair(4, 6, 33, seed=3, dtype=torch.float32)
    mask = _logits(4, 6, seed=4) > 0.0
    got = divergence(s, t, kind, temperature=2.0, mask=mask)
    assert got.dtype == torch.float32
    want = ref_divergence(s, t, kind, temperature=2.0, mask=mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("kind", KINDS)
def test_zero_for_identical_inputs(kind):
    x = _logits(4, 7, 19, seed=5)
    assert abs(divergence(x, x.clone(), kind, temperature=1.5).item()) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_non_negative_on_many_inputs(kind):
    for seed, scale in [(10, 0.1), (11, 1.0), (12, 5.0), (13, 20.0)]:
        s, t = _pair(200, 13, seed=seed, scale=scale)
        values = per_position_divergence(s, t, kind, beta=0.7, skew=0.3)
        assert values.shape == (200,)
        assert (values >= -1e-12).all(), (kind, scale, values.min())
        assert torch.isfinite(values).all()


def test_jsd_symmetric_at_half():
    s, t = _pair(5, 23, seed=6)
    torch.testing.assert_close(divergence(s, t, "jsd"), divergence(t, s, "jsd"), rtol=1e-12, atol=1e-14)
    # away from 0.5 swapping the roles swaps beta <-> 1 - beta (beta is the teacher's weight) ...
    torch.testing.assert_close(divergence(s, t, "jsd", beta=0.2), divergence(t, s, "jsd", beta=0.8), rtol=1e-12, atol=0)
    # ... and the divergence is not symmetric
    assert abs(divergence(s, t, "jsd", beta=0.2).item() - divergence(t, s, "jsd", beta=0.2).item()) > 1e-5


def test_jsd_endpoints_are_zero_and_continuous():
    s, t = _pair(5, 23, seed=7)
    assert divergence(s, t, "jsd", beta=0.0).item() == pytest.approx(0.0, abs=1e-14)
    assert divergence(s, t, "jsd", beta=1.0).item() == pytest.approx(0.0, abs=1e-14)
    # beta*KL(p_T||m) <= beta*log(1/beta): within ~2e-5 of the endpoint value at 1e-6
    assert abs(divergence(s, t, "jsd", beta=1e-6).item()) < 1e-4
    assert abs(divergence(s, t, "jsd", beta=1 - 1e-6).item()) < 1e-4
    # no jump anywhere along beta
    betas = torch.linspace(0, 1, 201).tolist()
    values = torch.stack([divergence(s, t, "jsd", beta=b) for b in betas])
    assert (values.diff().abs() < 0.02).all()
    assert values.max() > 0.05  # the sweep is not trivially flat


def test_tvd_bounded():
    for scale in [0.5, 5.0, 50.0]:
        s, t = _pair(100, 9, seed=8, scale=scale)
        values = per_position_divergence(s, t, "tvd")
        assert (values >= 0).all() and (values <= 1 + 1e-12).all()
    assert values.max() > 0.9  # far-apart distributions approach 1


def test_skew_zero_equals_plain_kl():
    s, t = _pair(4, 11, seed=9)
    for skewed, plain in [("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")]:
        torch.testing.assert_close(divergence(s, t, skewed, skew=0.0), divergence(s, t, plain), rtol=1e-12, atol=0)
        assert divergence(s, t, skewed, skew=0.5) < divergence(s, t, plain)


def test_temperature_scaling():
    s, t = _pair(3, 4, 13, seed=10)
    for kind in KINDS:
        got = divergence(s, t, kind, temperature=2.0)
        want = 4.0 * per_position_divergence(s / 2.0, t / 2.0, kind).mean()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        # temperature really changes the value (not merely a T^2 factor on the T=1 value)
        assert abs(got.item() - 4.0 * divergence(s, t, kind).item()) > 1e-3


def test_forward_kl_is_not_cross_entropy():
    s, t = _pair(6, 15, seed=11)
    p_t = _softmax(t)
    cross_entropy = -(p_t * torch.log_softmax(s, -1)).sum(-1).mean()
    teacher_entropy = -(p_t * torch.log(p_t)).sum(-1).mean()
    kl = divergence(s, t, "forward_kl")
    assert teacher_entropy > 0.5
    torch.testing.assert_close(kl, cross_entropy - teacher_entropy, rtol=1e-12, atol=1e-12)
    assert abs(kl.item() - cross_entropy.item()) > 0.5


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", DIFFERENTIABLE_KINDS)
def test_gradcheck(kind):
    s, t = _pair(2, 3, 5, seed=12)
    s.requires_grad_(True)
    mask = torch.tensor([[True, False, True], [True, True, False]])

    def f(student):
        return divergence(student, t, kind, temperature=1.7, beta=0.3, skew=0.2, mask=mask)

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_gets_no_gradient(kind):
    s, t = _pair(2, 3, 5, seed=13)
    s.requires_grad_(True)
    t.requires_grad_(True)
    divergence(s, t, kind).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_empty_mask_is_zero_with_zero_grads(kind):
    s, t = _pair(2, 3, 5, seed=14, dtype=torch.float32)
    s.requires_grad_(True)
    out = divergence(s, t, kind, mask=torch.zeros(2, 3, dtype=torch.bool), temperature=2.0)
    assert out.dim() == 0 and out.item() == 0.0
    out.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("kind", KINDS)
def test_mask_selects_exactly_the_counted_positions(kind):
    s, t = _pair(3, 4, 9, seed=15)
    mask = torch.tensor([[True, False, False, True], [False, False, False, False], [False, True, False, False]])
    s_dirty, t_dirty = s.clone(), t.clone()
    s_dirty[~mask] = float("nan")  # garbage in the masked-out rows must not leak in
    t_dirty[~mask] = float("inf")
    got = divergence(s_dirty, t_dirty, kind, temperature=1.3, mask=mask)
    want = ref_divergence(s[mask], t[mask], kind, temperature=1.3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # counted rows differ from "all rows"
    assert abs(got.item() - divergence(s, t, kind, temperature=1.3).item()) > 1e-6


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("kind", KINDS)
def test_extreme_logits_finite(kind):
    s, t = _pair(3, 11, seed=16, scale=1e4, dtype=torch.float32)
    s.requires_grad_(True)
    out = divergence(s, t, kind)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()
    if kind in ("forward_kl", "reverse_kl", "taid"):
        # probabilities underflow even in fp64 here: the reference KL is taken from log-probs
        log_p_s, log_p_t = torch.log_softmax(s.detach().double(), -1), torch.log_softmax(t.double(), -1)
        p, log_p, log_q = (log_p_t, log_p_t, log_p_s) if kind == "forward_kl" else (log_p_s, log_p_s, log_p_t)
        if kind == "taid":  # target softmax(0.5 log p_S + 0.5 log p_T) at the default beta
            log_m = torch.log_softmax(0.5 * log_p_s + 0.5 * log_p_t, -1)
            p, log_p, log_q = log_m, log_m, log_p_s
        want = (p.exp() * (log_p - log_q)).nan_to_num(0.0).sum(-1).mean()
        assert want > 1e3  # the regime really is extreme
    else:
        want = ref_divergence(s.detach(), t, kind)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_teacher_neg_inf_entries_finite(kind, dtype):
    s, t = _pair(4, 10, seed=17, dtype=dtype)
    t[:, [0, 3, 7]] = -math.inf  # masked vocabulary on the teacher side
    s.requires_grad_(True)
    out = divergence(s, t, kind, beta=0.4)
    out.backward()
    assert torch.isfinite(out), out
    assert torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_shared_neg_inf_entries_finite(kind, beta):
    # both sides block the same vocabulary entries (e.g. padding of the vocab): every kind is
    # finite, and so is every gradient, including the mixture at the beta endpoints
    s, t = _pair(3, 8, seed=23)
    s[:, [2, 5]] = -math.inf
    t[:, [2, 5]] = -math.inf
    if kind != "reverse_kl":  # (reverse KL is +inf there: tested below)
        t[0, 6] = -math.inf  # and one the teacher blocks alone
    s.requires_grad_(True)
    out = divergence(s, t, kind, beta=beta, skew=0.1)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all(), (out, s.grad)
    keep = [0, 1, 3, 4, 6, 7]  # entries with zero mass on both sides drop out of every divergence
    want = ref_divergence(s.detach()[:, keep], t[:, keep], kind, beta=beta)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)


def test_teacher_neg_inf_forward_kl_matches_reference_over_allowed_vocab():
    s, t = _pair(4, 10, seed=18)
    blocked = [1, 2, 8]
    allowed = [v for v in range(10) if v not in blocked]
    t[:, blocked] = -math.inf
    p_t = _softmax(t[:, allowed])  # teacher mass lives on the allowed vocabulary only
    log_p_s = torch.log(_softmax(s))[:, allowed]  # student normalised over the full vocabulary
    want = (p_t * (torch.log(p_t) - log_p_s)).sum(-1).mean()
    torch.testing.assert_close(divergence(s, t, "forward_kl"), want, rtol=1e-10, atol=1e-12)


def test_reverse_kl_teacher_neg_inf():
    s, t = _pair(2, 6, seed=19)
    t[:, 0] = -math.inf
    # the student has mass where the teacher has none: the divergence is truly infinite
    assert divergence(s, t, "reverse_kl").item() == math.inf
    # ... and finite when the student's mass there underflows to 0 too
    s = s.clone()
    s[:, 0] = -1e4
    s.requires_grad_(True)
    out = divergence(s, t, "reverse_kl")
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_upcast(low):
    s, t = _pair(3, 5, 31, seed=20, dtype=torch.float32)
    s, t = s.to(low), t.to(low)
    for kind in KINDS:
        got = divergence(s, t, kind, temperature=2.0)
        assert got.dtype == torch.float32
        want = divergence(s.float(), t.float(), kind, temperature=2.0)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        # and it is the fp32 value, not a bf16-rounded one
        torch.testing.assert_close(got.double(), ref_divergence(s, t, kind, temperature=2.0), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- golden values


GOLDEN_CONFIGS = {
    "default": dict(temperature=1.0, beta=0.5, skew=0.1),
    "t2_b03_s02": dict(temperature=2.0, beta=0.3, skew=0.2),
}


def _golden_inputs():
    g = torch.Generator().manual_seed(20240611)
    s = 3.0 * torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
    t = 3.0 * torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    return s, t, mask


def _golden_values() -> dict:
    s, t, mask = _golden_inputs()
    return {
        name: {kind: divergence(s, t, kind, mask=mask, **cfg).item() for kind in KINDS}
        for name, cfg in GOLDEN_CONFIGS.items()
    }


def test_golden_values():
    frozen = json.loads(GOLDEN_PATH.read_text())
    got = _golden_values()
    assert set(frozen) == set(got)
    for name in frozen:
        assert set(frozen[name]) == set(KINDS)
        for kind in KINDS:
            assert got[name][kind] == pytest.approx(frozen[name][kind], rel=1e-12, abs=1e-12), (name, kind)


# ----------------------------------------------------------------------------- registry and validation


def test_registry_duplicate_and_unknown():
    with pytest.raises(ValueError, match="already registered"):
        register_divergence("forward_kl")(lambda s, t, *, beta, skew: s.sum(-1))
    with pytest.raises(ValueError, match=r"Did you mean 'forward_kl'") as info:
        get_divergence("forwrd_kl")
    for kind in KINDS:
        assert kind in str(info.value)
    assert get_divergence("tvd") is divergences_module.tvd


def test_registry_custom_kind():
    @register_divergence("_test_squared_logprob_gap")
    def gap(student_logprobs, teacher_logprobs, *, beta, skew):
        return ((student_logprobs - teacher_logprobs) ** 2).sum(-1)

    try:
        s, t = _pair(2, 5, seed=21)
        want = ((torch.log_softmax(s, -1) - torch.log_softmax(t, -1)) ** 2).sum(-1).mean()
        torch.testing.assert_close(divergence(s, t, "_test_squared_logprob_gap"), want)
    finally:
        divergences_module._REGISTRY.pop("_test_squared_logprob_gap")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="kl"), "valid kinds: .*forward_kl"),
        (dict(kind="jsd", beta=-0.1), "beta"),
        (dict(kind="jsd", beta=1.5), "beta"),
        (dict(kind="jsd", beta=math.nan), "beta"),
        (dict(kind="skew_forward_kl", skew=1.0), "skew"),
        (dict(kind="skew_forward_kl", skew=-0.1), "skew"),
        (dict(kind="forward_kl", temperature=0.0), "temperature"),
        (dict(kind="forward_kl", temperature=-1.0), "temperature"),
        (dict(kind="forward_kl", mask=torch.ones(2, 4, dtype=torch.bool)), r"mask shape \(2, 4\)"),
        (dict(kind="forward_kl", mask=torch.ones(2, 3, dtype=torch.long)), "bool"),
    ],
)
def test_validation_errors(kwargs, message):
    s, t = _pair(2, 3, 5, seed=22)
    with pytest.raises(ValueError, match=message):
        divergence(s, t, **kwargs)


def test_shape_mismatch_names_both_shapes():
    s, t = _logits(2, 3, 5), _logits(2, 3, 6)
    for fn in (divergence, per_position_divergence):
        with pytest.raises(ValueError, match=r"student \(2, 3, 5\) and teacher \(2, 3, 6\)"):
            fn(s, t, "forward_kl")


if __name__ == "__main__":
    # Regenerate the frozen fixture ONLY for an intentional, reviewed change of the maths.
    GOLDEN_PATH.write_text(json.dumps(_golden_values(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN_PATH}")
