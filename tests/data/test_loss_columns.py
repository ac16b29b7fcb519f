"""Per-example loss weights (data.weight_field) and negative rows (data.negative_field): reading, errors,
the collator's per-token tensors, and packing (each member keeps its own)."""

from __future__ import annotations

import re

import pytest
import torch

from kdlm.config import DataConfig
from kdlm.data import IGNORE, Collator, Example, prepare_data
from kdlm.data.packing import pack_examples
from kdlm.errors import DataError


def chat(answer: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": "Hello world!"}, {"role": "assistant", "content": answer}],
            **extra}


def cfg(path, **kw) -> DataConfig:
    return DataConfig(train=str(path), validation_fraction=0.0, **kw)


def test_weights_and_negatives_are_read_per_row(make_jsonl, tiny_tokenizer):
    path = make_jsonl([chat("I am fine.", weight=0.3, negative=False), chat("Go away.", weight=2, negative=True),
                       chat("Thank you.", weight=0, negative=False)])
    train, _, report = prepare_data(cfg(path, weight_field="weight", negative_field="negative"), tiny_tokenizer, seed=0)
    assert [(ex.weight, ex.negative) for ex in train] == [(0.3, False), (2.0, True), (0.0, False)]
    assert isinstance(train[1].weight, float)
    assert report.negative_examples == 1 and "(1 negative)" in report.summary()
    # the columns are ignored unless named
    plain, _, _ = prepare_data(cfg(path), tiny_tokenizer, seed=0)
    assert [(ex.weight, ex.negative) for ex in plain] == [(1.0, False)] * 3


@pytest.mark.parametrize("row, message", [
    (chat("x"), "got nothing"),
    (chat("x", weight="0.5"), "got '0.5'"),
    (chat("x", weight=True), "got True"),
    (chat("x", weight=-0.1), "got -0.1"),
    (chat("x", weight=float("nan")), "got nan"),
    (chat("x", weight=None), "got None"),
])
def test_a_bad_weight_names_file_line_and_field(make_jsonl, tiny_tokenizer, row, message):
    path = make_jsonl([chat("fine", weight=1.0), row])
    want = f"{path}:2: field 'weight' (data.weight_field) must be a number >= 0, {message}"
    with pytest.raises(DataError, match=re.escape(want)) as err:
        prepare_data(cfg(path, weight_field="weight"), tiny_tokenizer, seed=0)
    assert "\n" not in str(err.value) and "skip_bad_rows" in str(err.value)
    train, _, report = prepare_data(cfg(path, weight_field="weight", skip_bad_rows=True), tiny_tokenizer, seed=0)
    assert len(train) == 1 and report.skipped_bad == 1


@pytest.mark.parametrize("value", [None, "true", 1, "missing"])
def test_a_bad_negative_flag_names_file_line_and_field(make_jsonl, tiny_tokenizer, value):
    row = chat("x") if value == "missing" else chat("x", negative=value)
    path = make_jsonl([row])
    with pytest.raises(DataError, match=rf"{path}:1: field 'negative' \(data.negative_field\) must be true or false"):
        prepare_data(cfg(path, negative_field="negative"), tiny_tokenizer, seed=0)


def _ex(sid, n, weight=1.0, negative=False, prompt=2):
    ids = [10 + (i % 7) for i in range(n)]
    return Example(sid, ids, [IGNORE] * prompt + ids[prompt:], weight=weight, negative=negative)


def test_collator_adds_per_token_tensors_only_when_needed():
    plain = Collator(0)([_ex("a", 5), _ex("b", 9)])
    assert "token_weights" not in plain and "negative" not in plain

    out = Collator(0)([_ex("a", 5, weight=0.5), _ex("b", 9, negative=True)])
    assert out["token_weights"].dtype == torch.float32 and out["token_weights"].shape == out["labels"].shape
    assert out["token_weights"][0, :5].tolist() == [0.5] * 5 and out["token_weights"][1, :9].tolist() == [1.0] * 9
    assert out["negative"].dtype == torch.bool
    assert not out["negative"][0].any() and out["negative"][1, :9].all() and not out["negative"][1, 9:].any()


def test_packed_members_keep_their_own_weight_and_flag():
    examples = [_ex("a", 5, weight=0.3), _ex("b", 4, weight=0.7, negative=True), _ex("c", 6)]
    rows = pack_examples(examples, pack_length=16)
    assert len(rows) == 1
    row = rows[0]
    by_id = {ex.sample_id: ex for ex in examples}
    spans = row.spans()
    assert [(b - a, w, n) for a, b, w, n in spans] == [
        (len(by_id[s].input_ids), by_id[s].weight, by_id[s].negative) for s in row.members]
    out = Collator(0)(rows)
    for (start, end, weight, negative) in spans:
        assert out["token_weights"][0, start:end].tolist() == [pytest.approx(weight)] * (end - start)
        assert out["negative"][0, start:end].tolist() == [negative] * (end - start)


def test_all_unit_weights_collate_exactly_as_no_weights(make_jsonl, tiny_tokenizer):
    path = make_jsonl([chat("I am fine.", weight=1.0), chat("Thank you.", weight=1)])
    weighted, _, _ = prepare_data(cfg(path, weight_field="weight"), tiny_tokenizer, seed=0)
    plain, _, _ = prepare_data(cfg(path), tiny_tokenizer, seed=0)
    a, b = Collator(0)(weighted), Collator(0)(plain)
    assert a.keys() == b.keys() and "token_weights" not in a
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
