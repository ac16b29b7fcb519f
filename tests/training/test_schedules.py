"""Adaptive schedules (kdlm.training.schedules): hand-computed sequences and state round trips."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import pytest
import torch

from kdlm.training.schedules import DomainWeights, FreshSchedule, ReplayBuffer, TaidSchedule


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _json_round_trip(state: dict) -> dict:
    return json.loads(json.dumps(state))  # the trainer's state file is JSON: the state must survive it


# ----------------------------------------------------------------------------- TAID


def test_taid_adaptive_updates_by_hand():
    # a large alpha and a long run: the adaptive branch beats the linear ramp
    s = TaidSchedule(t_start=0.4, t_end=1.0, alpha=0.5, momentum=0.9, total_steps=1000)
    assert s.t == 0.4
    losses = [2.0, 1.5, 1.2, 1.3]
    got = [s.update(loss, step) for step, loss in enumerate(losses, start=1)]
    # step 1: no previous loss -> recorded; only the linear floor applies
    t1, m1 = 0.4 + 0.6 * 1 / 1000, 0.0
    # step 2: delta = (2.0 - 1.5) / 2.0 = 0.25
    m2 = 0.9 * m1 + 0.1 * ((2.0 - 1.5) / (2.0 + 1e-9))
    t2 = min(1.0, max(0.4 + 0.6 * 2 / 1000, t1 + 0.5 * _sigmoid(m2) * (1 - t1)))
    # step 3: delta = (1.5 - 1.2) / 1.5 = 0.2
    m3 = 0.9 * m2 + 0.1 * ((1.5 - 1.2) / (1.5 + 1e-9))
    t3 = min(1.0, max(0.4 + 0.6 * 3 / 1000, t2 + 0.5 * _sigmoid(m3) * (1 - t2)))
    # step 4: the loss got worse, delta < 0, t still grows (sigmoid > 0), more slowly
    m4 = 0.9 * m3 + 0.1 * ((1.2 - 1.3) / (1.2 + 1e-9))
    t4 = min(1.0, max(0.4 + 0.6 * 4 / 1000, t3 + 0.5 * _sigmoid(m4) * (1 - t3)))
    assert got == pytest.approx([t1, t2, t3, t4], rel=1e-15, abs=0)
    assert s.m == pytest.approx(m4, rel=1e-15)
    assert m2 == pytest.approx(0.025, rel=1e-8) and t2 == pytest.approx(t1 + 0.5 * _sigmoid(0.025) * (1 - t1), rel=1e-8)
    assert t1 < t2 < t3 < t4 < 1.0


def test_taid_follows_the_linear_ramp_and_stops_at_t_end():
    s = TaidSchedule(total_steps=10)  # defaults: t_start 0.4, t_end 1.0, alpha 5e-4, momentum 0.99
    s.update(2.0, 1)
    assert s.update(1.9, 2) == pytest.approx(0.4 + 0.6 * 2 / 10, rel=1e-15)  # alpha-step is tiny: the ramp wins
    assert s.update(1.8, 10) == 1.0
    assert s.update(1.7, 20) == 1.0  # past total_steps: capped at t_end
    capped = TaidSchedule(total_steps=4, t_end=0.7)
    capped.update(1.0, 1)
    assert capped.update(0.5, 4) == 0.7


def test_taid_ignores_non_finite_losses():
    s = TaidSchedule(total_steps=100, alpha=0.5)
    s.update(2.0, 1)
    before = s.state_dict()
    assert s.update(math.nan, 2) == before["t"] and s.state_dict() == before
    assert s.update(math.inf, 3) == before["t"] and s.state_dict() == before


def test_taid_state_round_trip_continues_identically():
    a = TaidSchedule(total_steps=50, alpha=0.3, momentum=0.8)
    for step, loss in enumerate([3.0, 2.5, 2.4], start=1):
        a.update(loss, step)
    b = TaidSchedule(total_steps=50, alpha=0.3, momentum=0.8)
    b.load_state_dict(_json_round_trip(a.state_dict()))
    for step, loss in enumerate([2.0, 2.1, 1.5, 1.4], start=4):
        assert a.update(loss, step) == b.update(loss, step)
    assert a.state_dict() == b.state_dict()
    fresh = TaidSchedule(total_steps=50)
    fresh.load_state_dict(_json_round_trip(TaidSchedule(total_steps=50).state_dict()))  # prev_loss None survives JSON
    assert fresh.prev_loss is None


def test_taid_validation():
    with pytest.raises(ValueError, match="total_steps"):
        TaidSchedule(total_steps=0)
    with pytest.raises(ValueError, match="t_start"):
        TaidSchedule(total_steps=10, t_start=0.9, t_end=0.5)


# ----------------------------------------------------------------------------- DistiLLM's fresh-sample probability


def test_fresh_schedule_sequence():
    s = FreshSchedule()  # start 0, step 0.1, tolerance 0.1
    observations = [3.0, 3.05, 3.2, 3.0, 3.5, 3.55, 2.0]
    # 3.0: no previous; +0.05: within tolerance; +0.15: raise; -0.2: no; +0.5: raise; +0.05: no; -1.55: no
    want = [0.0, 0.0, 0.1, 0.1, 0.2, 0.2, 0.2]
    assert [s.observe(v) for v in observations] == pytest.approx(want, abs=1e-15)
    strict = FreshSchedule(tolerance=0.5)
    strict.observe(1.0)
    assert strict.observe(1.5) == 0.0  # worse by exactly the tolerance: "more than" it is needed
    assert strict.observe(2.25) == 0.1


def test_fresh_schedule_saturates_and_round_trips():
    s = FreshSchedule(start=0.5, step=0.3, tolerance=0.0)
    assert [s.observe(v) for v in [1.0, 2.0, 3.0, 4.0]] == pytest.approx([0.5, 0.8, 1.0, 1.0])
    t = FreshSchedule(start=0.5, step=0.3, tolerance=0.0)
    t.load_state_dict(_json_round_trip(s.state_dict()))
    assert t.p == s.p and t.previous == 4.0
    u = FreshSchedule(step=0.25, tolerance=0.1)
    u.observe(1.0)
    v = FreshSchedule(step=0.25, tolerance=0.1)
    v.load_state_dict(_json_round_trip(u.state_dict()))
    for x in [1.5, 1.4, 2.0]:
        assert u.observe(x) == v.observe(x)
    assert v.p == 0.5


# ----------------------------------------------------------------------------- DDK's domain weights


def test_domain_weights_follow_the_ce_ratios_by_hand():
    w = DomainWeights(["code", "math", "web"])  # smoothing 0.5, uniform 0.1
    assert w.weights == pytest.approx([1 / 3] * 3)
    student = {"code": 2.0, "math": 3.0, "web": 1.5}
    teacher = {"code": 1.0, "math": 1.0, "web": 1.5}  # ratios 2, 3, 1: math trails most
    got = w.update(student, teacher)
    exp = [math.exp(2.0), math.exp(3.0), math.exp(1.0)]
    new = [e / sum(exp) for e in exp]
    want = [0.9 * (0.5 * (1 / 3) + 0.5 * x) + 0.1 / 3 for x in new]
    assert got == pytest.approx(want, rel=1e-14)
    assert max(range(3), key=lambda k: got[k]) == 1 and got[1] > got[0] > got[2]
    assert sum(got) == pytest.approx(1.0, abs=1e-14)
    # a second update keeps half of the previous weights
    student2 = {"code": 1.2, "math": 1.1, "web": 3.0}  # now web trails: ratios 1.2, 1.1, 2.0
    got2 = w.update(student2, teacher)
    exp2 = [math.exp(1.2), math.exp(1.1), math.exp(2.0)]
    new2 = [e / sum(exp2) for e in exp2]
    want2 = [0.9 * (0.5 * prev + 0.5 * x) + 0.1 / 3 for prev, x in zip(want, new2)]
    assert got2 == pytest.approx(want2, rel=1e-14)
    assert sum(got2) == pytest.approx(1.0, abs=1e-14) and all(x >= 0.1 / 3 for x in got2)


def test_domain_weights_stay_a_distribution_and_round_trip():
    g = torch.Generator().manual_seed(0)
    domains = ["a", "b", "c", "d"]
    a = DomainWeights(domains, smoothing=0.3, uniform=0.05)
    for _ in range(5):
        ce = (1 + 3 * torch.rand(8, generator=g, dtype=torch.float64)).tolist()
        a.update(dict(zip(domains, ce[:4])), dict(zip(domains, ce[4:])))
        assert sum(a.weights) == pytest.approx(1.0, abs=1e-14) and min(a.weights) >= 0.05 / 4
    b = DomainWeights(domains, smoothing=0.3, uniform=0.05)
    b.load_state_dict(_json_round_trip(a.state_dict()))
    student, teacher = {"a": 2.0, "b": 1.0, "c": 1.0, "d": 1.0}, {d: 1.0 for d in domains}
    assert a.update(student, teacher) == b.update(student, teacher)
    with pytest.raises(ValueError, match="domains"):
        DomainWeights(["a", "b"]).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="c"):
        a.update({"a": 1.0, "b": 1.0, "d": 1.0}, {d: 1.0 for d in domains})


# ----------------------------------------------------------------------------- replay buffer


@dataclass
class _Sample:
    sample_id: str
    tokens: list


def test_replay_buffer_evicts_the_oldest():
    buf = ReplayBuffer(capacity=3)
    assert len(buf) == 0
    buf.add([_Sample("a", [1]), _Sample("b", [2])])
    buf.add([_Sample("c", [3]), _Sample("d", [4]), _Sample("e", [5])])
    assert len(buf) == 3
    assert [s.sample_id for s in buf.state_dict()["items"]] == ["c", "d", "e"]
    buf.add([_Sample("f", [6])])
    assert [s.sample_id for s in buf.state_dict()["items"]] == ["d", "e", "f"]


def test_replay_buffer_sampling_is_reproducible():
    buf = ReplayBuffer(capacity=10)
    buf.add([_Sample(str(i), [i]) for i in range(10)])
    first = buf.sample(4, torch.Generator().manual_seed(7))
    again = buf.sample(4, torch.Generator().manual_seed(7))
    assert first == again
    assert len({s.sample_id for s in first}) == 4  # n <= len: without replacement
    other = [buf.sample(4, torch.Generator().manual_seed(s)) for s in range(5)]
    assert any(o != first for o in other)
    small = ReplayBuffer(capacity=5)
    small.add([_Sample("x", [0]), _Sample("y", [1])])
    many = small.sample(6, torch.Generator().manual_seed(1))  # n > len: with replacement
    assert len(many) == 6 and {s.sample_id for s in many} <= {"x", "y"}
    assert small.sample(0, torch.Generator()) == []
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer().sample(1, torch.Generator())


def test_replay_buffer_state_round_trip_through_torch_save():
    a = ReplayBuffer(capacity=4)
    a.add([_Sample(str(i), [i, i + 1]) for i in range(6)])
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)
    blob.seek(0)
    b = ReplayBuffer(capacity=4)
    b.load_state_dict(torch.load(blob, weights_only=False))
    assert len(b) == 4 and b.state_dict() == a.state_dict()
    assert a.sample(3, torch.Generator().manual_seed(3)) == b.sample(3, torch.Generator().manual_seed(3))
    a.add([_Sample("new", [])])
    b.add([_Sample("new", [])])
    assert a.state_dict() == b.state_dict()
