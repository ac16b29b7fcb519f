"""Reading a `kdlm generate` dataset folder: JSONL shards listed in manifest.json, read in manifest order."""

from __future__ import annotations

import json

import pytest

from kdlm.config import DataConfig
from kdlm.data import prepare_data, read_rows
from kdlm.errors import DataError


def _folder(tmp_path, manifest, shards: dict[str, list[dict]]):
    folder = tmp_path / "generated"
    folder.mkdir()
    for name, rows in shards.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if manifest is not None:
        (folder / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    return folder


SHARDS = {"part-00001.jsonl": [{"text": "c"}, {"text": "d"}, {"text": "e"}],
          "part-00000.jsonl": [{"text": "a"}, {"text": "b"}]}


def test_shards_are_read_in_manifest_order_with_shard_line_locations(tmp_path):
    folder = _folder(tmp_path, {"format": "kdlm-dataset", "shards": ["part-00000.jsonl", "part-00001.jsonl"]}, SHARDS)
    raw = read_rows(str(folder), "train")
    assert [r["text"] for r in raw.rows] == ["a", "b", "c", "d", "e"]
    assert raw.locations == [f"{folder}/part-00000.jsonl:1", f"{folder}/part-00000.jsonl:2",
                             f"{folder}/part-00001.jsonl:1", f"{folder}/part-00001.jsonl:2",
                             f"{folder}/part-00001.jsonl:3"]
    assert [r["text"] for r in read_rows(str(folder), "train", limit=3).rows] == ["a", "b", "c"]


def test_a_generated_folder_trains_like_any_source(tmp_path, tiny_tokenizer):
    folder = _folder(tmp_path, {"format": "kdlm-dataset", "shards": ["part-00000.jsonl", "part-00001.jsonl"]}, SHARDS)
    train, _, report = prepare_data(DataConfig(train=str(folder), validation_fraction=0.0), tiny_tokenizer, seed=0)
    assert report.rows == 5 and train[0].sample_id == f"{folder}/part-00000.jsonl:1"


def test_a_bad_line_in_a_shard_names_the_shard_and_line(tmp_path):
    folder = _folder(tmp_path, {"format": "kdlm-dataset", "shards": ["a.jsonl"]}, {})
    (folder / "a.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"generated/a\.jsonl:2: invalid JSON line"):
        read_rows(str(folder), "train")
    assert len(read_rows(str(folder), "train", skip_bad_rows=True).rows) == 1


@pytest.mark.parametrize("manifest, message", [
    ({"format": "kdlm-dataset", "shards": []}, "lists no data shards"),
    ({"format": "kdlm-dataset"}, "lists no data shards"),
    ({"format": "kdlm-dataset", "shards": [3]}, "shard 3 is not a file name"),
    ({"format": "kdlm-dataset", "shards": ["missing.jsonl"]}, "missing.jsonl: data file not found"),
])
def test_a_broken_manifest_is_a_clear_error(tmp_path, manifest, message):
    folder = _folder(tmp_path, manifest, SHARDS)
    with pytest.raises(DataError, match=message) as err:
        read_rows(str(folder), "train")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("manifest", [None, "{not json", {"format": "something-else", "shards": ["part-00000.jsonl"]}])
def test_a_folder_without_a_kdlm_manifest_is_read_as_a_saved_dataset(tmp_path, manifest):
    folder = _folder(tmp_path, manifest, SHARDS)
    with pytest.raises(DataError, match="not a dataset saved with save_to_disk"):
        read_rows(str(folder), "train")
