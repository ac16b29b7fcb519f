"""The cache's value encoding and bookkeeping helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdlm.cache import format as fmt


def test_fixed_point_logprobs_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    logp = np.concatenate([-rng.uniform(0, 16 - 2**-12, 100_000), [0.0, -1e-9, -(16 - 2**-12)]]).astype(np.float32)
    codes = fmt.encode_logprobs(logp)
    assert codes.dtype == np.uint16
    err = np.abs(fmt.decode_logprobs(codes).astype(np.float64) - logp.astype(np.float64))
    assert err.max() <= fmt.MAX_DECODE_ERROR == 2**-13
    # relative error of each probability: exp(2^-13) - 1 = 1.2e-4
    assert math.expm1(fmt.MAX_DECODE_ERROR) < 1.23e-4


def test_logprobs_below_16_nats_clip():
    codes = fmt.encode_logprobs(np.array([-16.5, -100.0, -np.inf, np.nan], dtype=np.float32))
    assert codes.tolist() == [65535] * 4
    assert fmt.decode_logprobs(codes)[0] == pytest.approx(-65535 / 4096)


def test_tail_is_derived_from_the_head():
    logp = np.log(np.array([[0.5, 0.25, 0.125], [0.6, 0.4, 0.0001]], dtype=np.float64)).astype(np.float32)
    tail = fmt.tail_logprob(logp)
    assert math.exp(tail[0]) == pytest.approx(0.125, rel=1e-6)
    assert tail[1] == -np.inf  # the head already sums to more than 1: no mass left


def test_id_width_and_bytes_per_position():
    assert fmt.id_dtype(65_536) == np.uint16 and fmt.bytes_per_position(64, 65_536) == 256
    assert fmt.id_dtype(65_537) == np.int32 and fmt.bytes_per_position(64, 151_936) == 384
    assert fmt.ids_file(3, 448) == "shard-00003.ids.u16" and fmt.ids_file(3, 70_000) == "shard-00003.ids.i32"


def test_offsets_as_runs():
    labels = [-100, -100, 5, 6, 7, -100, 9, -100, 11, 12]
    offsets = fmt.counted_offsets(labels)
    assert offsets == [2, 3, 4, 6, 8, 9]
    ranges = fmt.offsets_to_ranges(offsets)
    assert ranges == [[2, 5], [6, 7], [8, 10]]
    assert fmt.ranges_count(ranges) == len(offsets)
    assert fmt.counted_offsets([7, 8]) == [1]  # token 0 is never predicted, even when labelled


def test_first_mismatch_prefers_the_weights_hash_over_the_name():
    cached = {"teacher.model": "a", "teacher.weights_sha256": "h1", "data.max_length": 64, "teacher.cache_temperature": 1.0}
    assert fmt.first_mismatch(cached, dict(cached, **{"teacher.model": "moved/a"})) is None  # same weights
    assert fmt.first_mismatch(cached, dict(cached, **{"teacher.weights_sha256": "h2"}))[0] == "teacher.weights_sha256"
    no_hash = dict(cached, **{"teacher.weights_sha256": None})
    assert fmt.first_mismatch(cached, no_hash) is None  # weights not on this machine: names decide
    assert fmt.first_mismatch(cached, dict(no_hash, **{"teacher.model": "b"})) == ("teacher.model", "a", "b")
    assert fmt.first_mismatch(cached, dict(cached, **{"data.max_length": 32})) == ("data.max_length", 64, 32)
    assert fmt.first_mismatch(cached, dict(cached, **{"teacher.cache_temperature": 1.0 + 1e-12})) is None
