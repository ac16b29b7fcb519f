"""Cross-tokenizer KD in the one loop, on tiny models whose byte-level BPE tokenizers differ: alm and uld train,
are logged on their own, validation reports the chunk-likelihood gap, and the tokenizer checks say what to do."""

from __future__ import annotations

import pytest
import torch

from kdlm.config import load_recipe
from kdlm.errors import ModelError
from kdlm.training import distill
from kdlm.training.metrics import read_metrics

OTHER_CORPUS = ["a teacher with other merges: distillation, students, models and tokens",
                "the cat sat on a mat and the dog ran to the park while birds sang in green trees"] * 8


@pytest.fixture(scope="module")
def other_teacher_dir(tmp_path_factory):
    """A 3-layer tiny Llama with its own byte-level BPE (300 tokens, other merges, no BOS), sharpened."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(OTHER_CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<eos>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>")
    config = LlamaConfig(vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=1, pad_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
    out = tmp_path_factory.mktemp("other_teacher")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _recipe(recipe_file, teacher, terms, *extra):
    return load_recipe(recipe_file, [f"teacher.model={teacher}", f"loss.terms={terms}", *extra])


def test_alm_trains_across_tokenizers_and_the_chunk_gap_falls(recipe_file, other_teacher_dir, one_thread):
    # alm alone: a ce term would pull the student towards the data, which this random teacher finds unlikely
    recipe = _recipe(recipe_file, other_teacher_dir, "[{name: alm, weight: 1.0}]",
                     "train.max_steps=12", "train.learning_rate=0.01", "train.save_every=0")
    result = distill(recipe, show_progress=False)
    rows = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss/total" in r]
    assert all(r["loss/alm"] > 0 for r in rows)
    assert rows[-1]["loss/total"] == pytest.approx(rows[-1]["loss/alm"], rel=1e-5)
    assert {"chunk_gap", "chunk_logp_gap", "chunks"} <= set(result.after)
    assert "kl_to_teacher" not in result.after  # no shared vocabulary to take a KL over
    assert result.after["chunk_gap"] < result.before["chunk_gap"]
    card = (result.model_dir / "README.md").read_text()
    assert "chunk-likelihood gap" in card


def test_uld_trains_across_tokenizers(recipe_file, other_teacher_dir, one_thread):
    recipe = _recipe(recipe_file, other_teacher_dir, "[{name: uld, weight: 1.0}, {name: ce, weight: 0.1}]",
                     "train.max_steps=3")
    result = distill(recipe, show_progress=False)
    rows = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss/total" in r]
    assert all(r["loss/uld"] > 0 for r in rows)


def test_a_divergence_across_tokenizers_suggests_alm(recipe_file, other_teacher_dir, tmp_path):
    recipe = _recipe(recipe_file, other_teacher_dir, "[{name: forward_kl}]")
    with pytest.raises(ModelError, match="use an alm or uld loss term") as err:
        distill(recipe, show_progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_alm_on_one_tokenizer_works_and_says_so(recipe_file, capsys, one_thread):
    recipe = load_recipe(recipe_file, ["loss.terms=[{name: alm}]", "train.max_steps=2"])
    result = distill(recipe, show_progress=False)
    assert "share one tokenizer" in capsys.readouterr().out
    assert result.after["chunks"] > 0
