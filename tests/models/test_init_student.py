"""Tests for kdlm.models.init_student and `kdlm init-student`: layer selection and the saved student."""

from __future__ import annotations

import pytest
import torch

from kdlm.errors import ModelError
from kdlm.models.init_student import decoder_layers, keep_layers, parameter_count, uniform_layers

INPUT = torch.tensor([[1, 45, 78, 200, 17, 300, 9, 5]])


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def layer_state(layer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


# ----------------------------------------------------------------------------- uniform_layers


def test_uniform_layers_30_to_10():
    indices = uniform_layers(30, 10)
    assert indices == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert len(indices) == 10 and indices[0] == 0 and indices[-1] == 29


@pytest.mark.parametrize("total, keep, expected", [(4, 2, [0, 3]), (4, 4, [0, 1, 2, 3]), (12, 6, [0, 2, 4, 7, 9, 11]),
                                                   (5, 3, [0, 2, 4])])
def test_uniform_layers_examples(total, keep, expected):
    assert uniform_layers(total, keep) == expected


def test_uniform_layers_properties():
    for total in range(2, 41):
        for keep in range(2, total + 1):
            indices = uniform_layers(total, keep)
            assert len(indices) == keep, (total, keep)
            assert indices[0] == 0 and indices[-1] == total - 1, (total, keep)
            assert all(a < b for a, b in zip(indices, indices[1:])), (total, keep)
            gaps = [b - a for a, b in zip(indices, indices[1:])]
            assert max(gaps) - min(gaps) <= 1, (total, keep, indices)  # an even stride


def test_uniform_layers_keep_one():
    indices = uniform_layers(7, 1)
    assert len(indices) == 1 and 0 <= indices[0] < 7


@pytest.mark.parametrize("total, keep", [(10, 0), (10, 11), (10, -2)])
def test_uniform_layers_bad_count(total, keep):
    with pytest.raises(ModelError) as info:
        uniform_layers(total, keep)
    assert str(keep) in str(info.value) and str(total) in str(info.value)


# ----------------------------------------------------------------------------- keep_layers on the tiny model


def test_keep_layers_count(tiny_model_dir):
    model = load(tiny_model_dir)
    original = [layer_state(layer) for layer in model.model.layers]
    kept = keep_layers(model, 2)
    assert kept == [0, 3]
    assert model.config.num_hidden_layers == 2
    assert len(model.model.layers) == 2 and decoder_layers(model) is model.model.layers
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    for new, old in enumerate(kept):
        state = model.model.layers[new].state_dict()
        assert state.keys() == original[old].keys()
        for name, tensor in original[old].items():
            assert torch.equal(state[name], tensor), (new, old, name)


def test_keep_layers_explicit_list(tiny_model_dir):
    model = load(tiny_model_dir)
    original = [layer_state(layer) for layer in model.model.layers]
    embed = model.model.embed_tokens.weight.clone()
    assert keep_layers(model, [1, 2]) == [1, 2]
    assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    for new, old in enumerate([1, 2]):
        for name, tensor in original[old].items():
            assert torch.equal(model.model.layers[new].state_dict()[name], tensor)
    assert torch.equal(model.model.embed_tokens.weight, embed)  # embeddings, norm and head untouched
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("keep", [[], [2, 1], [0, 0, 3], [-1, 2], [0, 4], 5, 0])
def test_keep_layers_bad_selection(tiny_model_dir, keep):
    model = load(tiny_model_dir)
    with pytest.raises(ModelError):
        keep_layers(model, keep)
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4  # unchanged


def test_kept_model_runs_with_the_kv_cache(tiny_model_dir):
    """Incremental decoding with the cache equals a full forward pass (layer_idx indexes the cache)."""
    model = load(tiny_model_dir)
    keep_layers(model, [0, 2, 3])
    with torch.no_grad():
        full = model(INPUT).logits
        first = model(INPUT[:, :-1], use_cache=True)
        step = model(INPUT[:, -1:], past_key_values=first.past_key_values, use_cache=True).logits
    assert torch.allclose(step[0, -1], full[0, -1], atol=1e-5)
    assert torch.allclose(first.logits[0], full[0, :-1], atol=1e-5)


def test_kept_model_equals_a_manual_forward(tiny_model_dir):
    """The kept model computes embed -> kept layers (in order) -> norm -> head, nothing else."""
    reference = load(tiny_model_dir)
    model = load(tiny_model_dir)
    keep_layers(model, [0, 3])
    with torch.no_grad():
        inner = reference.model
        hidden = inner.embed_tokens(INPUT)
        positions = torch.arange(INPUT.shape[1]).unsqueeze(0)
        rope = inner.rotary_emb(hidden, positions)
        mask = torch.full((INPUT.shape[1], INPUT.shape[1]), float("-inf")).triu(1)[None, None]
        for i in (0, 3):
            out = inner.layers[i](hidden, attention_mask=mask, position_ids=positions, position_embeddings=rope)
            hidden = out[0] if isinstance(out, tuple) else out
        expected = reference.lm_head(inner.norm(hidden))
        got = model(INPUT).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, reference(INPUT).logits, atol=1e-3)  # and differs from the 4-layer model


def test_parameter_count_counts_tied_weights_once(tiny_model_dir):
    model = load(tiny_model_dir)
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    per_layer = (
        2 * c.hidden_size * c.hidden_size  # q, o
        + 2 * c.hidden_size * c.num_key_value_heads * head_dim  # k, v
        + 3 * c.hidden_size * c.intermediate_size  # gate, up, down
        + 2 * c.hidden_size  # two norms
    )
    expected = c.vocab_size * c.hidden_size + c.num_hidden_layers * per_layer + c.hidden_size
    assert parameter_count(model) == expected
    keep_layers(model, 2)
    assert parameter_count(model) == expected - 2 * per_layer


# ----------------------------------------------------------------------------- `kdlm init-student`


def _init_student(*args) -> int:
    from kdlm.cli import main

    return main(["init-student", *map(str, args)])


def test_init_student_writes_a_loadable_folder(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "student"
    assert _init_student("--teacher", tiny_model_dir, "--layers", 2, "--output", out) == 0
    assert "[0, 3]" in capsys.readouterr().out
    for name in ("model.safetensors", "config.json", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
    assert "[0, 3]" in (out / "README.md").read_text()
    # nothing left behind by the atomic write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]

    student = AutoModelForCausalLM.from_pretrained(out).eval()
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    tokenizer = AutoTokenizer.from_pretrained(out)
    original_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.get_vocab() == original_tok.get_vocab()
    assert tokenizer.chat_template == original_tok.chat_template

    expected = load(tiny_model_dir)
    keep_layers(expected, 2)
    with torch.no_grad():
        assert torch.allclose(student(INPUT).logits, expected(INPUT).logits, atol=1e-6)


def test_init_student_layer_list(tiny_model_dir, tmp_path):
    out = tmp_path / "student"
    assert _init_student("--teacher", tiny_model_dir, "--layer-list", "1,3", "--output", out) == 0
    student = load(out)
    teacher = load(tiny_model_dir)
    assert student.config.num_hidden_layers == 2
    for new, old in enumerate([1, 3]):
        for name, tensor in teacher.model.layers[old].state_dict().items():
            assert torch.equal(student.model.layers[new].state_dict()[name], tensor)


def test_init_student_into_an_existing_empty_folder(tiny_model_dir, tmp_path):
    out = tmp_path / "student"
    out.mkdir()
    assert _init_student("--teacher", tiny_model_dir, "--layers", 3, "--output", out) == 0
    assert load(out).config.num_hidden_layers == 3


def test_init_student_refuses_a_non_empty_folder(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "student"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert _init_student("--teacher", tiny_model_dir, "--layers", 2, "--output", out) == 2
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    err = capsys.readouterr().err
    assert err.startswith("kdlm: error: ") and "not empty" in err and err.count("\n") == 1


def test_init_student_refuses_a_file_as_output(tiny_model_dir, tmp_path, capsys):
    # regression: a file given as --output used to crash with NotADirectoryError
    out = tmp_path / "student.bin"
    out.write_text("data")
    assert _init_student("--teacher", tiny_model_dir, "--layers", 2, "--output", out) == 2
    assert out.read_text() == "data"
    err = capsys.readouterr().err
    assert err.startswith("kdlm: error: ") and str(out) in err


@pytest.mark.parametrize("args", [("--layers", 9), ("--layer-list", "3,1"), ("--layer-list", "a,b")])
def test_init_student_bad_layers_writes_nothing(tiny_model_dir, tmp_path, capsys, args):
    out = tmp_path / "student"
    assert _init_student("--teacher", tiny_model_dir, *args, "--output", out) == 2
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # transformers may draw a weight-loading progress bar on stderr first; the error is the last line
    assert capsys.readouterr().err.splitlines()[-1].startswith("kdlm: error: ")


def test_init_student_missing_teacher(tmp_path, capsys):
    assert _init_student("--teacher", tmp_path / "nope", "--layers", 2, "--output", tmp_path / "out") == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_keep_layers_selects_per_layer_attention_types():
    """Models with a per-layer attention kind (sliding/full) keep the kinds of the kept layers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kinds = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         use_sliding_window=True, sliding_window=4, layer_types=list(kinds))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    assert keep_layers(model, [1, 3]) == [1, 3]
    assert model.config.layer_types == [kinds[1], kinds[3]]
    assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    with torch.no_grad():
        ids = torch.randint(64, (1, 10))
        full = model(ids).logits
        first = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=first.past_key_values, use_cache=True).logits
    assert torch.allclose(step[0, -1], full[0, -1], atol=1e-5)


# ----------------------------------------------------------------------------- `kdlm init-student` with pruning


def test_init_student_block_influence_writes_the_report(tiny_model_dir, tmp_path, make_jsonl, tiny_tokenizer, capsys):
    import json

    from kdlm.config.schema import PruneConfig
    from kdlm.models.prune import load_calibration, prune_student

    data = make_jsonl([{"text": t} for t in ("The quick brown fox jumps over the lazy dog.", "Hello world! How are you?",
                                              "What is the capital of France? Paris.", "One two three four five six.")])
    out = tmp_path / "student"
    assert _init_student("--teacher", tiny_model_dir, "--layers", 2, "--method", "block_influence", "--keep-last",
                         "--no-keep-first", "--calibration", data, "--no-progress", "--output", out) == 0
    report = json.loads((out / "prune_report.json").read_text())
    # the same choice as the API on the same calibration
    cfg = PruneConfig(method="block_influence", keep_first=False, keep_last=True, calibration=str(data))
    expected = prune_student(load(tiny_model_dir), 2, cfg, load_calibration(tiny_tokenizer, cfg))
    assert report["kept_layers"] == expected.kept_layers and 3 in report["kept_layers"]
    assert report["layer_scores"] == pytest.approx(expected.layer_scores, rel=1e-5)
    assert report["method"] == "block_influence" and report["calibration_tokens"] == expected.calibration_tokens
    card = (out / "README.md").read_text()
    assert "## Pruning" in card and "| layer | score" in card and str(expected.kept_layers) in card
    assert str(expected.kept_layers) in capsys.readouterr().out
    student = load(out)
    assert student.config.num_hidden_layers == 2
    teacher = load(tiny_model_dir)
    for new, old in enumerate(expected.kept_layers):
        for name, tensor in teacher.model.layers[old].state_dict().items():
            assert torch.equal(student.model.layers[new].state_dict()[name], tensor)


def test_init_student_width_pruning_on_the_default_prompts(tiny_model_dir, tmp_path):
    import json

    out = tmp_path / "student"
    assert _init_student("--teacher", tiny_model_dir, "--layers", 3, "--method", "removal_loss",
                         "--intermediate-size", 32, "--kv-heads", 1, "--hidden-size", 24, "--calibration-samples", 4,
                         "--calibration-length", 32, "--no-progress", "--output", out) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["widths"] == {"intermediate_size": [64, 32], "num_key_value_heads": [2, 1],
                                "num_attention_heads": [4, 2], "hidden_size": [32, 24]}
    assert 0 < report["calibration_tokens"] <= 4 * 32 and len(report["layer_scores"]) == 4
    student = load(out)
    c = student.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_key_value_heads, c.num_attention_heads, c.hidden_size,
            c.head_dim) == (3, 32, 1, 2, 24, 8)
    assert parameter_count(student) == report["parameters"][1]
    generated = student.generate(INPUT, attention_mask=torch.ones_like(INPUT), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, INPUT.shape[1] + 3)


@pytest.mark.parametrize("args, message", [
    (("--intermediate-size", 4000), "student.prune.intermediate_size: 4000 is more than the model's 64 MLP neurons"),
    (("--kv-heads", 3), "student.prune.num_key_value_heads: 3 is more than the model's 2 KV heads"),
    (("--calibration-samples", 0), "student.prune.calibration_samples"),
    (("--method", "removal_loss", "--keep-last", "--layers", 1), "student.keep_layers: 1 is fewer than"),
])
def test_init_student_bad_pruning_writes_nothing(tiny_model_dir, tmp_path, capsys, args, message):
    out = tmp_path / "student"
    layers = () if "--layers" in args else ("--layers", 2)
    assert _init_student("--teacher", tiny_model_dir, *layers, *args, "--no-progress", "--output", out) == 2
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("kdlm: error: " + message)
