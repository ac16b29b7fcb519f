"""`capture_teacher`: files, size per position, precision against the live teacher, resume, no-op, refusal."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kdlm.cache import CachedTeacher, capture_teacher
from kdlm.cache import capture as capture_mod
from kdlm.cache import format as fmt
from kdlm.errors import OutputError
from kdlm.models.loading import load_model, resolve_source
from kdlm.training.step import Teacher, counted_positions

from .conftest import examples_of, tokenizer_of


def _data_files(folder):
    return sorted(p for p in folder.iterdir() if p.name.startswith("shard-") and not p.name.endswith(".json"))


def test_capture_writes_shards_an_index_per_shard_and_a_manifest(make_recipe):
    recipe = make_recipe()
    folder = capture_teacher(recipe, shard_rows=100, show_progress=False)
    assert str(folder) == recipe.teacher.cache_dir
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = manifest["layout"]["shards"]
    assert shards >= 3 and manifest["complete"]
    expected = {"manifest.json"} | {f"shard-{s:05d}.{ext}" for s in range(shards) for ext in ("ids.u16", "nlp.u16", "index.json")}
    assert {p.name for p in folder.iterdir()} == expected  # no temporary file left behind
    examples = examples_of(recipe)
    assert manifest["samples"] == len(examples)
    assert manifest["positions"] == sum(len(fmt.counted_offsets(ex.labels)) for ex in examples)
    assert manifest["k"] == 64 and manifest["vocab"] == 448 and manifest["bytes_per_position"] == 256
    for key in ("teacher.model", "teacher.weights_sha256", "tokenizer.vocab_sha256", "tokenizer.chat_template_sha256",
                "data.max_length", "teacher.cache_top_k", "teacher.cache_temperature", "data.train", "data_sha256"):
        assert manifest["identity"][key] is not None, key
    # index: every sample once, rows of a shard tile it, offsets match the example
    seen = {}
    for s in range(shards):
        index = json.loads((folder / f"shard-{s:05d}.index.json").read_text())
        assert sum(r[2] for r in index["samples"]) == index["rows"] <= 100 or len(index["samples"]) == 1
        first = 0
        for sample_id, row, rows, sha, ranges in index["samples"]:
            assert row == first and rows == fmt.ranges_count(ranges)
            first += rows
            seen[sample_id] = (sha, ranges)
    assert [sid for sid in seen] == sorted(seen)  # shards follow sample-id order
    for ex in examples:
        assert seen[ex.sample_id] == (fmt.ids_sha(ex.input_ids), fmt.offsets_to_ranges(fmt.counted_offsets(ex.labels)))


def test_bytes_per_position_from_file_sizes(make_recipe):
    recipe = make_recipe()
    folder = capture_teacher(recipe, shard_rows=100, show_progress=False)
    positions = json.loads((folder / "manifest.json").read_text())["positions"]
    total = sum(p.stat().st_size for p in _data_files(folder))
    assert total / positions == 256


def test_decoded_logprobs_match_the_live_teacher(make_recipe, cache_teacher_dir):
    recipe = make_recipe()
    folder = capture_teacher(recipe, shard_rows=100, show_progress=False)
    cache = CachedTeacher(folder, recipe, tokenizer_of(recipe))
    model = load_model(resolve_source(str(cache_teacher_dir)), dtype=torch.float32, device=torch.device("cpu"), frozen=True)
    teacher = Teacher(model, 448)
    clipped = tails = 0
    for ex in examples_of(recipe)[:12]:
        labels = torch.tensor([ex.labels])
        mask, _ = counted_positions(labels)
        ids_t = torch.tensor([ex.input_ids])
        true = torch.log_softmax(teacher.logits({"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t)}, mask), -1)
        signal = cache.signal([ex.sample_id], labels)
        assert signal.ids.shape == (true.shape[0], 64)
        at_ids = true.gather(1, signal.ids).double()
        decoded = signal.logprobs.double()
        ok = at_ids > -16 + 2**-13
        assert (decoded[ok] - at_ids[ok]).abs().max() <= 2**-13 + 1e-5
        assert (decoded[~ok] == -65535 / 4096).all()
        clipped += int((~ok).sum())
        # the cached ids are a top-k set, sorted, with the argmax first
        outside = true.double().scatter(1, signal.ids, -math.inf)
        assert (at_ids.min(1).values >= outside.max(1).values - 1e-5).all()
        assert (signal.ids[:, 0] == true.argmax(1)).all()
        assert (decoded[:, :-1] >= decoded[:, 1:]).all()
        true_tail = torch.logsumexp(outside, 1).exp()
        assert (signal.tail_logprob.double().exp() - true_tail).abs().max() <= 2e-4
        tails += int((true_tail > 1e-3).sum())
    assert tails > 0  # the test sees real tails, not only trivially empty ones


def test_vocabularies_above_65536_store_int32_ids(tmp_path, make_jsonl, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdlm.config import load_recipe

    tok = tiny_tokenizer
    config = LlamaConfig(vocab_size=70_000, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "big")
    tok.save_pretrained(tmp_path / "big")
    data = make_jsonl([{"prompt": f"one two {i}", "completion": " three four"} for i in range(4)])
    path = tmp_path / "r.yaml"
    path.write_text(f"teacher: {{model: {tmp_path / 'big'}, device: cpu, cache_top_k: 8}}\nstudent: {{model: {tmp_path / 'big'}}}\n"
                    f"data: {{train: {data}, validation_fraction: 0}}\noutput: {{dir: {tmp_path / 'run'}}}\n")
    recipe = load_recipe(path)
    folder = capture_teacher(recipe, show_progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["bytes_per_position"] == 8 * 6 and manifest["vocab"] == 70_000
    assert (folder / "shard-00000.ids.i32").stat().st_size == manifest["positions"] * 8 * 4
    examples = examples_of(recipe)
    signal = CachedTeacher(folder, recipe, tokenizer_of(recipe)).signal(examples, _labels(examples))
    assert signal.ids.max() < 70_000 and signal.ids.dtype == torch.long


def _labels(examples):
    width = max(len(ex.labels) for ex in examples)
    return torch.tensor([ex.labels + [-100] * (width - len(ex.labels)) for ex in examples])


def test_an_interrupted_capture_resumes_and_equals_an_uninterrupted_one(make_recipe, monkeypatch, capsys, tmp_path):
    reference = capture_teacher(make_recipe(f"teacher.cache_dir={tmp_path / 'reference'}"), shard_rows=100,
                                show_progress=False)
    recipe = make_recipe()
    folder = reference.parent / "cache"
    store = capture_mod._store_rows

    def crash_in_second_shard(*args, **kwargs):
        if (folder / "shard-00000.index.json").exists():  # the first shard is complete
            raise RuntimeError("simulated crash")
        return store(*args, **kwargs)

    monkeypatch.setattr(capture_mod, "_store_rows", crash_in_second_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        capture_teacher(recipe, shard_rows=100, show_progress=False)
    assert not json.loads((folder / "manifest.json").read_text())["complete"]
    assert not (folder / "shard-00001.index.json").exists() and (folder / ".shard-00001.nlp.u16.tmp").exists()
    first_shard_mtime = (folder / "shard-00000.nlp.u16").stat().st_mtime_ns
    with pytest.raises(Exception, match="did not finish"):
        CachedTeacher(folder, recipe, tokenizer_of(recipe))

    monkeypatch.setattr(capture_mod, "_store_rows", store)
    capsys.readouterr()
    capture_teacher(recipe, shard_rows=7, show_progress=False)  # a resume keeps the layout it started with
    assert "resuming" in capsys.readouterr().out
    assert (folder / "shard-00000.nlp.u16").stat().st_mtime_ns == first_shard_mtime  # not recomputed
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == names
    for name in names:
        if name != "manifest.json":
            assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    strip = lambda m: {k: v for k, v in m.items() if k not in ("written", "identity")}  # noqa: E731
    ours, theirs = (json.loads((f / "manifest.json").read_text()) for f in (folder, reference))
    assert strip(ours) == strip(theirs) and ours["complete"]


def test_a_complete_identical_cache_is_a_no_op(make_recipe, capsys, monkeypatch):
    recipe = make_recipe()
    folder = capture_teacher(recipe, shard_rows=100, show_progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    monkeypatch.setattr(capture_mod, "_load_teacher", lambda *a: pytest.fail("the teacher must not be loaded"))
    capsys.readouterr()
    assert capture_teacher(recipe, show_progress=False) == folder
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


@pytest.mark.parametrize("override, field", [("data.max_length=40", "data.max_length"),
                                             ("teacher.cache_top_k=32", "teacher.cache_top_k"),
                                             ("teacher.cache_temperature=2.0", "teacher.cache_temperature")])
def test_a_folder_holding_a_different_cache_is_refused(make_recipe, override, field):
    folder = capture_teacher(make_recipe(), shard_rows=100, show_progress=False)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(OutputError, match=rf"holds a different cache \({field} "):
        capture_teacher(make_recipe(override), show_progress=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing mixed in


def test_changed_data_is_a_different_cache(make_recipe):
    recipe = make_recipe()
    capture_teacher(recipe, shard_rows=100, show_progress=False)
    with open(recipe.data.train) as fh:
        lines = fh.readlines()
    lines[3] = lines[3].replace("assistant", "assistant").replace('"content": "', '"content": "green ', 2)
    with open(recipe.data.train, "w") as fh:
        fh.writelines(lines)
    with pytest.raises(OutputError, match="data_sha256"):
        capture_teacher(recipe, show_progress=False)


def test_a_folder_with_other_files_is_refused(make_recipe, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="no manifest.json"):
        capture_teacher(make_recipe(), show_progress=False)
