"""The transformers backend with a tiny random Llama: greedy answers equal model.generate run by hand (one prompt at
a time and as one left-padded batch), whatever the batching; n samples; finish reasons; stop strings.

The shared tiny teacher ties its embeddings and, random, just repeats its last input token ("\\n", stripped to
nothing); this module builds an untied one (init std 0.3) whose greedy text differs from prompt to prompt.
"""

from __future__ import annotations

import json

import pytest
import torch

from kdlm.generation.backends import Counters
from kdlm.generation.backends.local import TransformersBackend

PROMPTS = ["Hello", "What is the capital of France? Tell me now.", "fox",
           "one two three four five six seven eight nine ten eleven twelve", "Hi there, how are you today?"]
MAX_NEW = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: a model this small gains nothing from more, and spinning OpenMP workers on a busy
    2-core machine made these tests 3x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tiny_model_dir, tmp_path_factory):
    """(folder, model, tokenizer): a 2-layer untied random Llama with the ChatML tiny tokenizer, saved to disk."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(vocab_size=448, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("untied_teacher")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


@torch.no_grad()
def greedy_alone(model, tokenizer, prompt: str, max_new_tokens: int = MAX_NEW) -> list[int]:
    """The new token ids of greedy model.generate on one unpadded chat."""
    enc = tokenizer.apply_chat_template(chat(prompt), add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


@torch.no_grad()
def greedy_left_padded(model, tokenizer, prompts: list[str]) -> list[list[int]]:
    """The new token ids of greedy model.generate on all chats as one left-padded batch."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer.apply_chat_template([chat(p) for p in prompts], add_generation_prompt=True, padding=True,
                                            return_dict=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    assert enc["attention_mask"][:, 0].tolist().count(0) == len(prompts) - 1  # all but the longest are padded
    out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:].tolist()


def text_of(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def local_recipe(make_recipe, prompts_path, folder, out="out", *, batch_size=32, **generate):
    return make_recipe(prompts_path, out, teacher={"backend": "transformers", "model": str(folder), "batch_size": batch_size},
                       max_new_tokens=MAX_NEW, **generate)


@pytest.fixture
def prompts_path(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


class SpyBackend(TransformersBackend):
    """Records the size of every batch the LocalBatcher hands to the model."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    def _run_batch(self, requests):
        self.batches.append(len(requests))
        return super()._run_batch(requests)


@pytest.mark.parametrize("batch_size, batches", [(32, [5]), (2, [2, 2, 1]), (1, [1] * 5)])
def test_greedy_equals_model_generate_by_hand(teacher, make_recipe, prompts_path, run_generate, read_dataset,
                                              batch_size, batches):
    folder, model, tokenizer = teacher
    side = tokenizer.padding_side
    alone = [greedy_alone(model, tokenizer, p) for p in PROMPTS]
    padded = greedy_left_padded(model, tokenizer, PROMPTS)
    assert padded == alone  # left padding changes no greedy token (so the comparison below is fair)
    assert len({text_of(tokenizer, ids) for ids in alone}) == len(PROMPTS) and all(text_of(tokenizer, i) for i in alone)
    assert all(tokenizer.eos_token_id not in ids for ids in alone)

    recipe = local_recipe(make_recipe, prompts_path, folder, batch_size=batch_size, concurrency=32)  # all queued at once
    backend = SpyBackend(recipe.teacher, Counters(), model=model, tokenizer=tokenizer)
    result = run_generate(recipe, backend)
    rows, _ = read_dataset(result.output_dir)
    assert backend.batches == batches
    assert [r["messages"] for r in rows] == [chat(p) + [{"role": "assistant", "content": text_of(tokenizer, ids)}]
                                             for p, ids in zip(PROMPTS, alone)]
    for row, prompt in zip(rows, PROMPTS):
        prov = row["provenance"]
        assert prov["finish_reason"] == "length"  # no eos within MAX_NEW tokens
        prompt_ids = tokenizer.apply_chat_template(chat(prompt), add_generation_prompt=True)
        prompt_ids = prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids
        assert prov["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": MAX_NEW}
        assert prov["teacher"]["backend"] == "transformers" and prov["teacher"]["model"] == str(folder)
        assert prov["teacher"]["fingerprint"].startswith("sha256:") and len(prov["teacher"]["fingerprint"]) == 23
    assert tokenizer.padding_side == side  # the backend puts the tokenizer's padding side back


def test_generate_loads_nothing_when_given_model_and_tokenizer(teacher, make_recipe, prompts_path, read_dataset):
    from kdlm.generation.run import generate

    folder, model, tokenizer = teacher
    result = generate(local_recipe(make_recipe, prompts_path, folder), model=model, tokenizer=tokenizer,
                      show_progress=False)
    rows, _ = read_dataset(result.output_dir)
    assert [r["messages"][-1]["content"] for r in rows] == [
        text_of(tokenizer, greedy_alone(model, tokenizer, p)) for p in PROMPTS]


def test_n_samples_with_temperature(teacher, make_recipe, prompts_path, run_generate, read_dataset):
    folder, model, tokenizer = teacher
    recipe = local_recipe(make_recipe, prompts_path, folder, n=2, temperature=1.0, seed=7)
    result = run_generate(recipe, TransformersBackend(recipe.teacher, Counters(), model=model, tokenizer=tokenizer))
    rows, _ = read_dataset(result.output_dir)
    assert len(rows) == 2 * len(PROMPTS) and len({r["id"] for r in rows}) == len(rows)
    assert [(r["messages"][0]["content"], r["provenance"]["sample_index"]) for r in rows] == [
        (p, j) for p in PROMPTS for j in (0, 1)]
    assert [r["provenance"]["sampling"]["seed"] for r in rows] == [7, 8] * len(PROMPTS)
    assert {r["provenance"]["sampling"]["temperature"] for r in rows} == {1.0}
    greedy = {text_of(tokenizer, greedy_alone(model, tokenizer, p)) for p in PROMPTS}
    sampled = {r["messages"][-1]["content"] for r in rows}
    assert len(sampled - greedy) >= 5  # sampled, not greedy, text (a random model at T = 1 is near-uniform)


def test_finish_reason_stop_at_the_eos_token(teacher, make_recipe, prompts_path, run_generate, read_dataset):
    folder, model, tokenizer = teacher
    ids = greedy_alone(model, tokenizer, PROMPTS[1])
    stop_at = 3
    assert ids[stop_at] not in ids[:stop_at]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = ids[stop_at]  # the 4th greedy token now ends the turn
    try:
        recipe = local_recipe(make_recipe, prompts_path, folder)
        result = run_generate(recipe, TransformersBackend(recipe.teacher, Counters(), model=model, tokenizer=tokenizer))
    finally:
        model.generation_config.eos_token_id = saved
    row = read_dataset(result.output_dir)[0][1]
    assert row["messages"][-1]["content"] == text_of(tokenizer, ids[:stop_at])
    assert row["provenance"]["finish_reason"] == "stop"
    assert row["provenance"]["usage"]["completion_tokens"] == stop_at + 1  # the eos counts


def test_stop_strings_cut_the_text(teacher, make_recipe, prompts_path, run_generate, read_dataset):
    folder, model, tokenizer = teacher
    full = [tokenizer.decode(greedy_alone(model, tokenizer, p), skip_special_tokens=True) for p in PROMPTS]
    text = full[1]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    at = text.find(stop)
    assert stop.strip() and text[:at].strip()
    recipe = local_recipe(make_recipe, prompts_path, folder, stop=[stop])
    result = run_generate(recipe, TransformersBackend(recipe.teacher, Counters(), model=model, tokenizer=tokenizer))
    rows, _ = read_dataset(result.output_dir)
    assert rows[1]["messages"][-1]["content"] == text[:at].strip()
    assert rows[1]["provenance"]["finish_reason"] == "stop"
    for row, whole in zip(rows, full):  # the others are cut where (and only if) they hold the stop string
        cut = whole.find(stop)
        assert row["messages"][-1]["content"] == (whole[:cut] if cut >= 0 else whole).strip()
        assert row["provenance"]["finish_reason"] == ("stop" if cut >= 0 else "length")


def test_a_tokenizer_without_chat_template_is_refused(teacher, make_recipe, prompts_path, run_generate, tiny_tokenizer):
    from kdlm.errors import ConfigError

    folder, model, _ = teacher
    tiny_tokenizer.chat_template = None
    recipe = local_recipe(make_recipe, prompts_path, folder)
    with pytest.raises(ConfigError, match="has no chat template"):
        run_generate(recipe, TransformersBackend(recipe.teacher, Counters(), model=model, tokenizer=tiny_tokenizer))
