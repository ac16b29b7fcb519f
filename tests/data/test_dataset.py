"""Tests for kdlm.data.dataset and kdlm.data.sources: every source, splits, bad rows, the report, the collator."""

from __future__ import annotations

import json

import pytest
import torch

from kdlm.config import DataConfig
from kdlm.data import IGNORE, Collator, Example, prepare_data, read_rows
from kdlm.errors import DataError

TEXTS = [f"Sentence number {i}: the quick brown fox jumps over the lazy dog." for i in range(20)]
PC_ROWS = [{"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(6)]
CHAT_ROW = {"messages": [{"role": "user", "content": "Hello world!"}, {"role": "assistant", "content": "I am fine."}]}


def cfg(train, **kw) -> DataConfig:
    kw.setdefault("validation_fraction", 0.0)
    return DataConfig(train=str(train), **kw)


def n_counted(tokenizer, text: str) -> int:
    """Counted tokens of a text row: all but position 0 (which nothing predicts)."""
    return len(tokenizer(text)["input_ids"]) - 1


# ----------------------------------------------------------------------------- formats and report


def test_text_rows_all_tokens_counted(make_jsonl, tiny_tokenizer):
    path = make_jsonl([{"text": t} for t in TEXTS[:5]])
    train, val, report = prepare_data(cfg(path), tiny_tokenizer, seed=0)
    assert val == [] and len(train) == 5
    assert [ex.input_ids for ex in train] == [tiny_tokenizer(t)["input_ids"] for t in TEXTS[:5]]
    assert all(ex.labels == ex.input_ids for ex in train)
    assert [ex.sample_id for ex in train] == [f"{path}:{i}" for i in range(1, 6)]
    assert report.rows == 5 and report.train_examples == 5 and report.validation_examples == 0
    assert report.formats == {"text": 5}
    assert report.train_counted_tokens == sum(n_counted(tiny_tokenizer, t) for t in TEXTS[:5])
    assert report.truncated == report.skipped_bad == report.dropped_empty == 0
    assert "5 rows" in report.summary()


def test_prompt_completion_rows_count_completion_and_eos(make_jsonl, tiny_tokenizer):
    path = make_jsonl(PC_ROWS)
    train, _, report = prepare_data(cfg(path), tiny_tokenizer, seed=0)
    expected = sum(len(tiny_tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in PC_ROWS)
    assert report.train_counted_tokens == expected
    assert report.formats == {"prompt_completion": 6}
    for ex, row in zip(train, PC_ROWS):
        kept = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
        assert tiny_tokenizer.decode(kept) == row["completion"] + "</s>"


def test_completion_only_false_counts_prompt_too(make_jsonl, tiny_tokenizer):
    path = make_jsonl(PC_ROWS)
    train, _, report = prepare_data(cfg(path, completion_only=False), tiny_tokenizer, seed=0)
    assert report.train_counted_tokens == sum(len(ex.input_ids) - 1 for ex in train)


def test_format_auto_detects_each_row(make_jsonl, tiny_tokenizer):
    path = make_jsonl([{"text": TEXTS[0]}, PC_ROWS[0], CHAT_ROW, {"text": TEXTS[1]}])
    train, _, report = prepare_data(cfg(path), tiny_tokenizer, seed=0)
    assert report.formats == {"text": 2, "prompt_completion": 1, "messages": 1}
    chat = tiny_tokenizer.decode(train[2].input_ids)
    assert chat.startswith("<|im_start|>user\nHello world!")


def test_explicit_format_is_not_detected(make_jsonl, tiny_tokenizer):
    # with format: text a prompt/completion row lacks the text field
    path = make_jsonl([{"text": TEXTS[0]}, PC_ROWS[0]])
    with pytest.raises(DataError) as info:
        prepare_data(cfg(path, format="text"), tiny_tokenizer, seed=0)
    assert f"{path}:2" in str(info.value) and "'text'" in str(info.value)


def test_max_samples_limits_training_rows(make_jsonl, tiny_tokenizer):
    path = make_jsonl([{"text": t} for t in TEXTS])
    train, _, report = prepare_data(cfg(path, max_samples=4), tiny_tokenizer, seed=0)
    assert report.rows == 4 and [ex.sample_id for ex in train] == [f"{path}:{i}" for i in range(1, 5)]


# ----------------------------------------------------------------------------- sources


ROWS = [{"text": t} for t in TEXTS[:4]]


def _ids(examples):
    return [ex.input_ids for ex in examples]


@pytest.fixture
def expected_ids(tiny_tokenizer):
    return [tiny_tokenizer(r["text"])["input_ids"] for r in ROWS]


def test_json_array_file(tmp_path, tiny_tokenizer, expected_ids):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS))
    train, _, _ = prepare_data(cfg(path), tiny_tokenizer, seed=0)
    assert _ids(train) == expected_ids


def test_unreadable_json_file(tmp_path, tiny_tokenizer):
    path = tmp_path / "data.json"
    path.write_text('[{"text": "a"}, {"text": ')
    with pytest.raises(DataError) as info:
        prepare_data(cfg(path), tiny_tokenizer, seed=0)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_csv_file(tmp_path, tiny_tokenizer, expected_ids):
    from datasets import Dataset

    path = tmp_path / "data.csv"
    Dataset.from_list(ROWS).to_csv(str(path), index=False)
    train, _, _ = prepare_data(cfg(path), tiny_tokenizer, seed=0)
    assert _ids(train) == expected_ids
    assert [ex.sample_id for ex in train] == [f"{path}:{i}" for i in range(2, 6)]  # line 1 is the header


def test_csv_bad_row_names_its_line(tmp_path, tiny_tokenizer):
    from datasets import Dataset

    path = tmp_path / "pc.csv"
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}, {"prompt": "e", "completion": "f"}]
    Dataset.from_list(rows).to_csv(str(path), index=False)
    with pytest.raises(DataError) as info:
        prepare_data(cfg(path, format="prompt_completion"), tiny_tokenizer, seed=0)
    assert f"{path}:3:" in str(info.value) and "'completion'" in str(info.value)


def test_parquet_file(tmp_path, tiny_tokenizer, expected_ids):
    from datasets import Dataset

    path = tmp_path / "data.parquet"
    Dataset.from_list(ROWS).to_parquet(str(path))
    train, _, _ = prepare_data(cfg(path), tiny_tokenizer, seed=0)
    assert _ids(train) == expected_ids


def test_saved_dataset_folder(tmp_path, tiny_tokenizer, expected_ids):
    from datasets import Dataset

    folder = tmp_path / "saved"
    Dataset.from_list(ROWS).save_to_disk(str(folder))
    train, _, _ = prepare_data(cfg(folder), tiny_tokenizer, seed=0)
    assert _ids(train) == expected_ids


def test_saved_dataset_dict_with_splits(tmp_path, tiny_tokenizer, expected_ids):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "saved_dict"
    DatasetDict({
        "train": Dataset.from_list(ROWS),
        "dev": Dataset.from_list([{"text": TEXTS[10]}, {"text": TEXTS[11]}]),
    }).save_to_disk(str(folder))
    train, val, report = prepare_data(
        cfg(folder, validation=str(folder), validation_split="dev"), tiny_tokenizer, seed=0)
    assert _ids(train) == expected_ids
    assert _ids(val) == [tiny_tokenizer(TEXTS[i])["input_ids"] for i in (10, 11)]
    assert report.validation_examples == 2


def test_saved_dataset_dict_missing_split(tmp_path, tiny_tokenizer):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "saved_dict"
    DatasetDict({"dev": Dataset.from_list(ROWS)}).save_to_disk(str(folder))
    with pytest.raises(DataError) as info:
        prepare_data(cfg(folder), tiny_tokenizer, seed=0)
    assert "'train'" in str(info.value) and "dev" in str(info.value)


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.csv", "missing.parquet", "missing.json", "missing_dir/"])
def test_missing_file(tmp_path, tiny_tokenizer, name):
    path = str(tmp_path / name)
    with pytest.raises(DataError) as info:
        prepare_data(cfg(path), tiny_tokenizer, seed=0)
    assert str(tmp_path / name.rstrip("/")) in str(info.value) and "not found" in str(info.value)


def test_missing_validation_file(make_jsonl, tmp_path, tiny_tokenizer):
    path = make_jsonl(ROWS)
    with pytest.raises(DataError, match="val.jsonl"):
        prepare_data(cfg(path, validation=str(tmp_path / "val.jsonl")), tiny_tokenizer, seed=0)


def test_no_training_data(tiny_tokenizer):
    with pytest.raises(DataError, match="data.train"):
        prepare_data(DataConfig(), tiny_tokenizer, seed=0)


def test_folder_that_is_not_a_saved_dataset(tmp_path, tiny_tokenizer):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        prepare_data(cfg(tmp_path / "plain"), tiny_tokenizer, seed=0)


# ----------------------------------------------------------------------------- truncation and dropped rows


def test_truncation_is_counted(make_jsonl, tiny_tokenizer):
    long_text = " ".join(TEXTS[:3])
    path = make_jsonl([{"text": "Hi"}, {"text": long_text}, {"text": long_text}])
    train, _, report = prepare_data(cfg(path, max_length=16), tiny_tokenizer, seed=0)
    assert report.truncated == 2
    assert [len(ex.input_ids) for ex in train] == [len(tiny_tokenizer("Hi")["input_ids"]), 16, 16]


def test_example_whose_completion_is_cut_away_is_dropped(make_jsonl, tiny_tokenizer):
    long_prompt = " ".join(TEXTS[:2])
    assert len(tiny_tokenizer(long_prompt)["input_ids"]) > 32
    path = make_jsonl([PC_ROWS[0], {"prompt": long_prompt, "completion": " cut away"}, PC_ROWS[1]])
    train, val, report = prepare_data(cfg(path, max_length=32), tiny_tokenizer, seed=0)
    assert report.dropped_empty == 1
    assert report.truncated == 1
    assert report.rows == 3 and report.train_examples == 2
    assert f"{path}:2" not in [ex.sample_id for ex in train + val]


def test_nothing_usable_is_an_error(make_jsonl, tiny_tokenizer):
    long_prompt = " ".join(TEXTS[:2])
    path = make_jsonl([{"prompt": long_prompt, "completion": " cut away"}])
    with pytest.raises(DataError, match="no usable training examples"):
        prepare_data(cfg(path, max_length=8), tiny_tokenizer, seed=0)


# ----------------------------------------------------------------------------- validation split


def test_validation_file_is_used_as_given(make_jsonl, tiny_tokenizer):
    train_path = make_jsonl([{"text": t} for t in TEXTS[:6]], "train.jsonl")
    val_path = make_jsonl([{"text": t} for t in TEXTS[6:9]], "val.jsonl")
    train, val, report = prepare_data(cfg(train_path, validation=str(val_path), validation_fraction=0.5),
                                      tiny_tokenizer, seed=0)
    assert [ex.sample_id for ex in train] == [f"{train_path}:{i}" for i in range(1, 7)]  # nothing held out
    assert [ex.sample_id for ex in val] == [f"{val_path}:{i}" for i in range(1, 4)]
    assert report.train_examples == 6 and report.validation_examples == 3 and report.rows == 9
    assert report.train_counted_tokens == sum(n_counted(tiny_tokenizer, t) for t in TEXTS[:6])


def test_held_out_fraction_is_seeded_and_disjoint(make_jsonl, tiny_tokenizer):
    path = make_jsonl([{"text": t} for t in TEXTS])
    config = cfg(path, validation_fraction=0.25)
    train, val, report = prepare_data(config, tiny_tokenizer, seed=0)
    ids_train, ids_val = [ex.sample_id for ex in train], [ex.sample_id for ex in val]
    assert len(ids_val) == 5 and len(ids_train) == 15
    assert set(ids_train).isdisjoint(ids_val)
    assert set(ids_train) | set(ids_val) == {f"{path}:{i}" for i in range(1, 21)}
    assert report.train_examples == 15 and report.validation_examples == 5
    assert report.train_counted_tokens == sum(sum(lab != IGNORE for lab in ex.labels[1:]) for ex in train)
    # same seed: same split; another seed: another split
    again_train, again_val, _ = prepare_data(config, tiny_tokenizer, seed=0)
    assert [ex.sample_id for ex in again_val] == ids_val and [ex.sample_id for ex in again_train] == ids_train
    _, other_val, _ = prepare_data(config, tiny_tokenizer, seed=1)
    assert {ex.sample_id for ex in other_val} != set(ids_val)
    # the training examples keep the file order
    assert ids_train == sorted(ids_train, key=lambda s: int(s.rsplit(":", 1)[1]))


def test_small_fraction_still_holds_out_one(make_jsonl, tiny_tokenizer):
    path = make_jsonl([{"text": t} for t in TEXTS[:3]])
    train, val, _ = prepare_data(cfg(path, validation_fraction=0.05), tiny_tokenizer, seed=0)
    assert len(val) == 1 and len(train) == 2


def test_zero_fraction_holds_out_nothing(make_jsonl, tiny_tokenizer):
    path = make_jsonl([{"text": t} for t in TEXTS[:3]])
    train, val, _ = prepare_data(cfg(path, validation_fraction=0.0), tiny_tokenizer, seed=0)
    assert val == [] and len(train) == 3


# ----------------------------------------------------------------------------- bad rows


def test_invalid_json_names_file_and_line(make_jsonl, tiny_tokenizer):
    path = make_jsonl([{"text": "a"}, "", {"text": "b"}, '{"text": "unterminated', {"text": "c"}])
    with pytest.raises(DataError) as info:
        prepare_data(cfg(path), tiny_tokenizer, seed=0)
    message = str(info.value)
    assert f"{path}:4:" in message  # blank line 2 still counts as a line
    assert "skip_bad_rows" in message and "\n" not in message


def test_json_line_that_is_not_an_object(make_jsonl, tiny_tokenizer):
    path = make_jsonl([{"text": "a"}, [1, 2]])
    with pytest.raises(DataError) as info:
        prepare_data(cfg(path), tiny_tokenizer, seed=0)
    assert f"{path}:2:" in str(info.value)


def test_row_missing_the_field_names_file_line_and_field(make_jsonl, tiny_tokenizer):
    path = make_jsonl([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"},
                       {"prompt": "e", "answer": "f"}])
    with pytest.raises(DataError) as info:
        prepare_data(cfg(path, format="prompt_completion"), tiny_tokenizer, seed=0)
    message = str(info.value)
    assert f"{path}:3:" in message and "'completion'" in message


def test_row_of_unknown_shape_under_auto(make_jsonl, tiny_tokenizer):
    path = make_jsonl([{"text": "a"}, {"body": "b"}])
    with pytest.raises(DataError) as info:
        prepare_data(cfg(path), tiny_tokenizer, seed=0)
    assert f"{path}:2:" in str(info.value) and "body" in str(info.value)


def test_wrong_message_role_names_file_and_line(make_jsonl, tiny_tokenizer):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}
    path = make_jsonl([CHAT_ROW, CHAT_ROW, bad])
    with pytest.raises(DataError) as info:
        prepare_data(cfg(path), tiny_tokenizer, seed=0)
    message = str(info.value)
    assert f"{path}:3:" in message and "messages[1]" in message and "role" in message


def test_bad_validation_row_names_the_validation_file(make_jsonl, tiny_tokenizer):
    train_path = make_jsonl([{"text": "a b c"}], "train.jsonl")
    val_path = make_jsonl([{"text": "a"}, {"txt": "b"}], "val.jsonl")
    with pytest.raises(DataError) as info:
        prepare_data(cfg(train_path, validation=str(val_path), format="text"), tiny_tokenizer, seed=0)
    assert f"{val_path}:2:" in str(info.value)


def test_skip_bad_rows_skips_and_counts(make_jsonl, tiny_tokenizer):
    bad_role = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}
    path = make_jsonl([
        {"text": TEXTS[0]},
        '{"text": broken',
        {"txt": "no field"},
        bad_role,
        "[1, 2, 3]",
        CHAT_ROW,
        PC_ROWS[0],
    ])
    train, _, report = prepare_data(cfg(path, skip_bad_rows=True), tiny_tokenizer, seed=0)
    assert report.skipped_bad == 4
    assert [ex.sample_id for ex in train] == [f"{path}:1", f"{path}:6", f"{path}:7"]
    assert report.formats == {"text": 1, "messages": 1, "prompt_completion": 1}
    assert "skipped bad 4" in report.summary()


def test_read_rows_keeps_locations(make_jsonl):
    path = make_jsonl([{"text": "a"}, "", "   ", {"text": "b"}])
    raw = read_rows(str(path), "train")
    assert raw.rows == [{"text": "a"}, {"text": "b"}]
    assert raw.locations == [f"{path}:1", f"{path}:4"]
    assert raw.skipped == 0


# ----------------------------------------------------------------------------- collator


def test_collator_pads_right_to_a_multiple_of_8():
    batch = [
        Example("a:1", [5, 6, 7], [IGNORE, 6, 7]),
        Example("a:2", list(range(10, 20)), [IGNORE] * 4 + list(range(14, 20))),
    ]
    out = Collator(pad_token_id=3)(batch)
    assert {"input_ids", "attention_mask", "labels"} <= set(out)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape == (2, 16)
    assert all(out[k].dtype == torch.long for k in ("input_ids", "attention_mask", "labels"))
    if "sample_ids" in out:  # the batch's sample ids, in row order (used for teacher-cache lookups)
        assert out["sample_ids"] == ["a:1", "a:2"]
    assert out["input_ids"][0].tolist() == [5, 6, 7] + [3] * 13
    assert out["input_ids"][1].tolist() == list(range(10, 20)) + [3] * 6
    assert out["labels"][0].tolist() == [IGNORE, 6, 7] + [IGNORE] * 13
    assert out["labels"][1].tolist() == [IGNORE] * 4 + list(range(14, 20)) + [IGNORE] * 6
    assert out["attention_mask"][0].tolist() == [1] * 3 + [0] * 13
    assert out["attention_mask"][1].tolist() == [1] * 10 + [0] * 6


@pytest.mark.parametrize("longest, width", [(1, 8), (8, 8), (9, 16), (16, 16), (17, 24)])
def test_collator_width(longest, width):
    out = Collator(pad_token_id=0)([Example("x", [1] * longest, [1] * longest)])
    assert out["input_ids"].shape == (1, width)
    assert out["attention_mask"].sum().item() == longest


def test_collator_other_multiple():
    out = Collator(pad_token_id=0, pad_to_multiple_of=1)([Example("x", [1] * 5, [1] * 5), Example("y", [2], [2])])
    assert out["input_ids"].shape == (2, 5)


def test_collated_real_examples(make_jsonl, tiny_tokenizer):
    path = make_jsonl([PC_ROWS[0], {"text": TEXTS[0]}])
    train, _, _ = prepare_data(cfg(path), tiny_tokenizer, seed=0)
    out = Collator(tiny_tokenizer.pad_token_id)(train)
    for row, ex in enumerate(train):
        n = len(ex.input_ids)
        assert out["input_ids"][row, :n].tolist() == ex.input_ids
        assert (out["input_ids"][row, n:] == tiny_tokenizer.pad_token_id).all()
        assert out["labels"][row].tolist() == ex.labels + [IGNORE] * (out["labels"].shape[1] - n)
