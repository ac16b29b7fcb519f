"""Grey-box KD: rows' API top-k log-probs -> the offline teacher cache (`cache-teacher --from-logprobs`) -> distill."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from kdlm.cache import MAX_DECODE_ERROR, CachedTeacher
from kdlm.cache.capture import capture_teacher
from kdlm.config import load_recipe
from kdlm.data import prepare_data
from kdlm.errors import ConfigError, DataError, ModelError, OutputError
from kdlm.generation.greybox import TokenMapper

K = 3
ANSWERS = ["Paris is the capital of France.", "The quick brown fox.", "One two three four five.",
           "Hello world! I am fine.", "Knowledge distillation trains a small student.", "seven eight nine ten"]


def write_folder(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "manifest.json").write_text(json.dumps({"format": "kdlm-dataset", "shards": ["data-00000.jsonl"]}))
    return folder


def recipe_for(folder: Path, tmp_path: Path, model_dir: Path, *extra: str):
    return load_recipe(None, [
        f"teacher.model={model_dir}", f"student.model={model_dir}", f"data.train={folder}", "data.format=messages",
        "data.validation_fraction=0.0", "teacher.source=cache", f"teacher.cache_top_k={K}",
        "loss.terms=[{name: forward_kl, weight: 1.0}]", "train.max_steps=1", "train.batch_size=2",
        "train.report_to=[]", f"output.dir={tmp_path / 'run'}", *extra])


def logprob_rows(tmp_path, model_dir, tokenizer, *, as_ids: bool = True, spoil=None) -> tuple[Path, dict]:
    """Rows whose teacher_logprobs are built from the student's own encoding of each answer: position j's
    top-1 is the answer token (p = 0.7), then two other tokens (0.2, 0.05), the rest is the tail (0.05)."""
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": a}]}
            for i, a in enumerate(ANSWERS)]
    folder = write_folder(tmp_path / "gen", rows)
    recipe = recipe_for(folder, tmp_path, model_dir)
    train, _, _ = prepare_data(recipe.data, tokenizer, seed=0)
    by_id = {ex.sample_id: ex for ex in train}
    spell = (lambda t: f"token_id:{t}") if as_ids else (lambda t: tokenizer.convert_ids_to_tokens(t))
    expected = {}
    for line, row in enumerate(rows, start=1):
        ex = by_id[f"{folder / 'data-00000.jsonl'}:{line}"]
        targets = [ex.input_ids[i] for i in range(1, len(ex.labels)) if ex.labels[i] != -100]
        top = [[[spell(t), math.log(0.7)], [spell((t + 1) % 300), math.log(0.2)], [spell((t + 2) % 300), math.log(0.05)]]
               for t in targets]
        row["teacher_logprobs"] = {"tokens": [spell(t) for t in targets] + [spell(0)],  # + a token past max_length
                                   "logprobs": [math.log(0.7)] * (len(targets) + 1), "top": top + [top[-1]]}
        expected[ex.sample_id] = targets
    if spoil:
        spoil(rows)
    write_folder(folder, rows)
    return folder, expected


def test_logprobs_become_a_cache_that_trains(tmp_path, tiny_model_dir, tiny_tokenizer):
    from kdlm.training import distill

    folder, expected = logprob_rows(tmp_path, tiny_model_dir, tiny_tokenizer)
    recipe = recipe_for(folder, tmp_path, tiny_model_dir)
    cache_dir = capture_teacher(recipe, show_progress=False, from_logprobs=True)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["identity"]["teacher.signal"] == "api-logprobs"
    cache = CachedTeacher(cache_dir, recipe, tiny_tokenizer)
    for sample_id, targets in expected.items():
        ids, codes = cache.rows(sample_id)
        assert ids[:, 0].tolist() == targets  # top-1 is the generated token, at every counted position
        assert ids[:, 1].tolist() == [(t + 1) % 300 for t in targets]
        from kdlm.cache.format import decode_logprobs

        lp = decode_logprobs(codes)
        assert np.allclose(lp, np.log([0.7, 0.2, 0.05]), atol=MAX_DECODE_ERROR)
    assert capture_teacher(recipe, show_progress=False, from_logprobs=True) == cache_dir  # complete: a no-op
    result = distill(recipe, show_progress=False)
    assert result.steps == 1


def test_string_tokens_map_through_the_vocabulary(tmp_path, tiny_model_dir, tiny_tokenizer):
    folder, expected = logprob_rows(tmp_path, tiny_model_dir, tiny_tokenizer, as_ids=False)
    recipe = recipe_for(folder, tmp_path, tiny_model_dir)
    cache = CachedTeacher(capture_teacher(recipe, show_progress=False, from_logprobs=True), recipe, tiny_tokenizer)
    for sample_id, targets in expected.items():
        assert cache.rows(sample_id)[0][:, 0].tolist() == targets


def test_a_tokenizer_mismatch_names_the_row_and_position(tmp_path, tiny_model_dir, tiny_tokenizer):
    def spoil(rows):
        tokens = rows[2]["teacher_logprobs"]["tokens"]
        tokens[1] = "token_id:399"

    folder, _ = logprob_rows(tmp_path, tiny_model_dir, tiny_tokenizer, spoil=spoil)
    with pytest.raises(ModelError, match=r"data-00000.jsonl:3: answer token 1 .* tokenizers disagree"):
        capture_teacher(recipe_for(folder, tmp_path, tiny_model_dir), show_progress=False, from_logprobs=True)


def test_unknown_teacher_token_is_a_clear_error(tmp_path, tiny_model_dir, tiny_tokenizer):
    def spoil(rows):
        rows[0]["teacher_logprobs"]["top"][0][2][0] = "token_id:100000"  # beyond the shared vocabulary

    folder, _ = logprob_rows(tmp_path, tiny_model_dir, tiny_tokenizer, spoil=spoil)
    with pytest.raises(ModelError, match="not in the student's vocabulary"):
        capture_teacher(recipe_for(folder, tmp_path, tiny_model_dir), show_progress=False, from_logprobs=True)


def test_too_few_top_logprobs_and_missing_ones(tmp_path, tiny_model_dir, tiny_tokenizer):
    folder, _ = logprob_rows(tmp_path, tiny_model_dir, tiny_tokenizer)
    with pytest.raises(DataError, match="teacher.cache_top_k"):
        capture_teacher(recipe_for(folder, tmp_path, tiny_model_dir, "teacher.cache_top_k=4"), show_progress=False,
                        from_logprobs=True)

    def drop(rows):
        del rows[1]["teacher_logprobs"]

    folder, _ = logprob_rows(tmp_path / "b", tiny_model_dir, tiny_tokenizer, spoil=drop)
    with pytest.raises(DataError, match="data-00000.jsonl:2: the row has no teacher_logprobs"):
        capture_teacher(recipe_for(folder, tmp_path / "b", tiny_model_dir), show_progress=False, from_logprobs=True)


def test_api_cache_is_t1_only_and_never_taken_for_a_live_one(tmp_path, tiny_model_dir, tiny_tokenizer):
    folder, _ = logprob_rows(tmp_path, tiny_model_dir, tiny_tokenizer)
    with pytest.raises(ConfigError, match="T = 1"):
        capture_teacher(recipe_for(folder, tmp_path, tiny_model_dir, "teacher.cache_temperature=2.0",
                                   "loss.temperature=2.0"), show_progress=False, from_logprobs=True)
    recipe = recipe_for(folder, tmp_path, tiny_model_dir)
    capture_teacher(recipe, show_progress=False, from_logprobs=True)
    with pytest.raises(OutputError, match="teacher.signal api-logprobs in the cache, model now"):
        capture_teacher(recipe, show_progress=False)  # a live capture into the API cache's folder


def test_token_mapper(tiny_tokenizer):
    mapper = TokenMapper(tiny_tokenizer)
    some_id = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert mapper(f"token_id:{some_id}") == some_id and mapper(some_id) == some_id
    assert mapper("<|im_end|>") == some_id
    piece = tiny_tokenizer.decode([300])
    assert tiny_tokenizer.decode([mapper(piece)]) == piece  # decoded text maps back to a token that spells it
    assert mapper("token_id:x") is None and mapper(None) is None


def test_same_tokens_filter_drops_rows_that_retokenise_differently(tmp_path, tiny_model_dir, tiny_tokenizer):
    from kdlm.data import read_rows
    from kdlm.generation.filters import run_filter

    def spoil(rows):
        rows[4]["teacher_logprobs"]["tokens"][0] = "token_id:399"

    folder, _ = logprob_rows(tmp_path, tiny_model_dir, tiny_tokenizer, spoil=spoil)
    rows = read_rows(str(folder), "train").rows
    for row in rows:  # as the server lists them: the answer's tokens, then the end-of-turn token
        row["teacher_logprobs"]["tokens"][-1] = f"token_id:{tiny_tokenizer.convert_tokens_to_ids('<|im_end|>')}"
    kept, dropped = run_filter("same_tokens", rows + [{"messages": rows[0]["messages"]}], tokenizer=tiny_tokenizer)
    assert len(kept) == len(ANSWERS) and [r for r, _ in dropped] == [rows[4]]
    assert "re-tokenises differently from the teacher's tokens (from token 0 of" in dropped[0][1]
