"""`CachedTeacher`: lookup by sample id whatever the batch order, manifest checks, signal errors."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from kdlm.cache import CachedTeacher, capture_teacher
from kdlm.data import Collator
from kdlm.data.packing import pack_examples
from kdlm.errors import ConfigError, DataError
from kdlm.training.step import counted_positions

from .conftest import examples_of, tokenizer_of


@pytest.fixture
def cached(make_recipe):
    recipe = make_recipe()
    folder = capture_teacher(recipe, shard_rows=60, show_progress=False)
    return recipe, folder, CachedTeacher(folder, recipe, tokenizer_of(recipe)), examples_of(recipe)


def _per_sample(cache, batches):
    """sample id -> (ids, logprobs) rows, cut out of per-batch signals."""
    out = {}
    for batch in batches:
        signal = cache.signal(batch["sample_ids"], batch["labels"])
        mask, _ = counted_positions(batch["labels"])
        row = 0
        for sample_id, n in zip(batch["sample_ids"], mask.sum(1).tolist()):
            out[sample_id] = (signal.ids[row:row + n], signal.logprobs[row:row + n], signal.tail_logprob[row:row + n])
            row += n
        assert row == len(signal) == mask.sum()
    return out


def test_lookup_by_sample_id_does_not_depend_on_batch_order(cached):
    _, _, cache, examples = cached
    collate = Collator(pad_token_id=0)
    in_order = [collate(examples[i:i + 4]) for i in range(0, len(examples), 4)]
    shuffled = examples[:]
    random.Random(3).shuffle(shuffled)
    other = [collate(shuffled[i:i + 5]) for i in range(0, len(shuffled), 5)]
    a, b = _per_sample(cache, in_order), _per_sample(cache, other)
    assert set(a) == set(b) == {ex.sample_id for ex in examples}
    for sample_id in a:
        for x, y in zip(a[sample_id], b[sample_id]):
            assert torch.equal(x, y)
        ids, codes = cache.rows(sample_id)
        assert torch.equal(a[sample_id][0], torch.from_numpy(ids.astype("int64")))


def test_examples_and_packed_rows_give_the_same_rows(cached):
    _, _, cache, examples = cached
    labels = Collator(0)(examples[:6])["labels"]
    by_id = cache.signal([ex.sample_id for ex in examples[:6]], labels)
    by_example = cache.signal(examples[:6], labels)
    assert torch.equal(by_id.ids, by_example.ids) and torch.equal(by_id.logprobs, by_example.logprobs)
    packed = pack_examples(examples, 96)
    assert any(len(ex.members) > 1 for ex in packed[:3])
    batch = Collator(0)(packed[:3])
    flat = cache.signal(batch["sample_ids"], batch["labels"])  # flat ids, in order of appearance
    per_row = cache.signal(packed[:3], batch["labels"])  # packed Examples: checked row by row
    nested = cache.signal([ex.members for ex in packed[:3]], batch["labels"])
    want = torch.cat([torch.from_numpy(cache.rows(sid)[0].astype("int64")) for sid in batch["sample_ids"]])
    assert torch.equal(flat.ids, want) and torch.equal(per_row.ids, want) and torch.equal(nested.ids, want)
    assert len(flat) == counted_positions(batch["labels"])[0].sum()


def test_signal_errors_name_the_sample(cached):
    _, _, cache, examples = cached
    batch = Collator(0)(examples[:2])
    labels = batch["labels"].clone()
    row = labels[1]
    row[(row != -100).nonzero()[0]] = -100  # one counted position fewer in row 1
    with pytest.raises(DataError, match=examples[1].sample_id.replace("/", ".")):
        cache.signal(batch["sample_ids"], labels)
    with pytest.raises(DataError, match="not in the cache"):
        cache.signal(["nowhere.jsonl:1", examples[1].sample_id], batch["labels"])
    changed = examples[0].__class__(examples[0].sample_id, examples[0].input_ids[:-1] + [7], examples[0].labels)
    with pytest.raises(DataError, match="other tokens"):
        cache.verify([changed])
    with pytest.raises(DataError, match="other tokens"):
        cache.signal([changed, examples[1]], batch["labels"])
    cache.verify(examples)  # the real ones pass
    out = cache.signal([], torch.full((0, 4), -100))
    assert out.ids.shape == (0, 64) and out.tail_logprob.shape == (0,)


def test_signal_on_a_device_and_with_the_temperature(cached):
    _, _, cache, examples = cached
    batch = Collator(0)(examples[:2])
    signal = cache.signal(batch["sample_ids"], batch["labels"], device="cpu")
    assert signal.temperature == 1.0 and signal.ids.dtype == torch.long and signal.logprobs.dtype == torch.float32
    assert signal.tail_logprob.dtype == torch.float32 and signal.k == 64


@pytest.mark.parametrize("override, message", [
    ("data.max_length=40", "data.max_length 48 in the cache, 40 in the recipe"),
    ("teacher.cache_top_k=32", "teacher.cache_top_k 64 in the cache, 32 in the recipe"),
    ("teacher.cache_temperature=2.0", "teacher.cache_temperature 1.0 in the cache, 2.0 in the recipe"),
    ("loss.temperature=2.0", "temperature 1 in the cache, 2 for loss term forward_kl"),
    ("data.completion_only=false", "data.completion_only true in the cache, false in the recipe"),
])
def test_a_recipe_that_does_not_fit_the_cache_is_refused(cached, make_recipe, override, message):
    _, folder, _, _ = cached
    recipe = make_recipe(override)
    with pytest.raises(ConfigError, match=rf"teacher cache {folder}: {message}") as err:
        CachedTeacher(folder, recipe, tokenizer_of(recipe))
    assert "kdlm cache-teacher" in str(err.value)


def test_another_tokenizer_is_refused(cached):
    recipe, folder, _, _ = cached
    tokenizer = tokenizer_of(recipe)
    tokenizer.add_tokens(["<extra_token>"])
    with pytest.raises(ConfigError, match="tokenizer.vocab_sha256 .* in the cache, .* in the recipe"):
        CachedTeacher(folder, recipe, tokenizer)
    tokenizer = tokenizer_of(recipe)
    tokenizer.chat_template = tokenizer.chat_template + " "
    with pytest.raises(ConfigError, match="tokenizer.chat_template_sha256"):
        CachedTeacher(folder, recipe, tokenizer)


def test_other_teacher_weights_are_refused(make_recipe, cache_teacher_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher = tmp_path / "teacher_copy"
    shutil.copytree(cache_teacher_dir, teacher)
    recipe = make_recipe(f"teacher.model={teacher}")
    folder = capture_teacher(recipe, show_progress=False)
    CachedTeacher(folder, recipe, tokenizer_of(recipe))  # fits
    moved = tmp_path / "moved_teacher"
    shutil.copytree(teacher, moved)
    CachedTeacher(folder, make_recipe(f"teacher.model={moved}"), tokenizer_of(recipe))  # same weights elsewhere: fits
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.01)
    model.save_pretrained(teacher)
    with pytest.raises(ConfigError, match="teacher.weights_sha256 [0-9a-f]{12} in the cache, [0-9a-f]{12} in the recipe"):
        CachedTeacher(folder, recipe, tokenizer_of(recipe))


def test_the_vocabulary_is_checked_when_given(cached):
    recipe, folder, _, _ = cached
    CachedTeacher(folder, recipe, tokenizer_of(recipe), vocab=448)
    with pytest.raises(ConfigError, match="vocab 448 in the cache, 400 in the recipe"):
        CachedTeacher(folder, recipe, tokenizer_of(recipe), vocab=400)


def test_a_missing_cache_says_how_to_make_one(make_recipe, tmp_path):
    recipe = make_recipe()
    with pytest.raises(ConfigError, match="run `kdlm cache-teacher RECIPE` first"):
        CachedTeacher(tmp_path / "nothing", recipe, tokenizer_of(recipe))
