"""Tests for kdlm.models.prune: depth by block influence / removal loss, width by activations, the report."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from kdlm.config.schema import PruneConfig
from kdlm.errors import ConfigError, DataError, ModelError
from kdlm.models.init_student import keep_layers, parameter_count
from kdlm.models.prune import (PruneReport, calibration_texts, calibration_token_ids, load_calibration,
                               prune_student)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, HIDDEN, LAYERS, HEADS, KV, INTER = 128, 64, 4, 4, 2, 128


def tiny_config(**overrides):
    from transformers import LlamaConfig

    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=64,
                tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    return LlamaConfig(**base)


def tiny_model(seed: int = 0, **overrides):
    """A seeded random Llama; weights scaled up a little so that layers differ clearly from the identity."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config(**overrides))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and "embed" not in name:
                    p.mul_(1 + 4 * torch.rand(()))  # a different scale per matrix: layers of unequal influence
    return model.eval()


def calibration(n: int = 10, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 24, (n,), generator=g)
    return [torch.randint(3, VOCAB, (int(k),), generator=g).tolist() for k in lengths]


CALIB = calibration()


def prune(model, keep, **cfg):
    return prune_student(model, keep, PruneConfig(**cfg), CALIB, batch_size=3)


@torch.no_grad()
def logits(model, seqs=CALIB) -> list[torch.Tensor]:
    return [model(torch.tensor([s])).logits[0] for s in seqs]


def assert_same_logits(a, b, atol=1e-5):
    for x, y in zip(logits(a), logits(b)):
        assert torch.allclose(x, y, atol=atol), (x - y).abs().max()


# ----------------------------------------------------------------------------- direct references


@torch.no_grad()
def direct_influence(model, seqs=CALIB) -> list[float]:
    """Block influence from hidden states, one unpadded sequence at a time (final norm made the identity)."""
    model = copy.deepcopy(model)
    model.model.norm = torch.nn.Identity()
    n = model.config.num_hidden_layers
    sums, count = [0.0] * n, 0
    for s in seqs:
        hs = model(torch.tensor([s]), output_hidden_states=True).hidden_states
        assert len(hs) == n + 1
        for i in range(n):
            sums[i] += float((1 - torch.nn.functional.cosine_similarity(hs[i][0], hs[i + 1][0], dim=-1)).sum())
        count += len(s)
    return [x / count for x in sums]


@torch.no_grad()
def direct_loss(model, seqs=CALIB) -> float:
    """Mean next-token cross-entropy over all calibration tokens, one unpadded sequence at a time."""
    total, count = 0.0, 0
    for s in seqs:
        ids = torch.tensor([s])
        out = model(ids).logits[0, :-1]
        total += float(torch.nn.functional.cross_entropy(out, ids[0, 1:], reduction="sum"))
        count += len(s) - 1
    return total / count


def without(model, drop: list[int]):
    m = copy.deepcopy(model)
    keep_layers(m, [i for i in range(m.config.num_hidden_layers) if i not in drop])
    return m


def make_identity(model, i: int) -> None:
    """Layer i adds nothing to the residual stream: its block influence is 0."""
    with torch.no_grad():
        model.model.layers[i].self_attn.o_proj.weight.zero_()
        model.model.layers[i].mlp.down_proj.weight.zero_()


# ----------------------------------------------------------------------------- depth


def test_block_influence_equals_a_direct_computation():
    model = tiny_model()
    expected = direct_influence(model)
    report = prune(model, 2, method="block_influence", keep_first=False)
    assert report.layer_scores == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert len(set(round(s, 6) for s in expected)) == LAYERS  # distinct, so the choice below is meaningful
    top = sorted(sorted(range(LAYERS), key=lambda i: -expected[i])[:2])
    assert report.kept_layers == top
    assert report.calibration_tokens == sum(map(len, CALIB))


def test_block_influence_drops_the_least_influential_and_keeps_the_weights():
    reference = tiny_model()
    make_identity(reference, 2)
    model = copy.deepcopy(reference)
    report = prune(model, 3, method="block_influence")
    assert report.layer_scores[2] == pytest.approx(0.0, abs=1e-6)
    assert report.kept_layers == [0, 1, 3] and report.drop_order == [2]
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    assert_same_logits(model, without(reference, [2]))
    assert_same_logits(model, reference)  # the identity layer contributed nothing
    assert report.parameters == (parameter_count(reference), parameter_count(model))


def test_padding_does_not_change_scores():
    model = tiny_model()
    one = prune_student(copy.deepcopy(model), 2, PruneConfig(method="block_influence"), CALIB, batch_size=1)
    many = prune_student(copy.deepcopy(model), 2, PruneConfig(method="block_influence"), CALIB, batch_size=10)
    assert many.layer_scores == pytest.approx(one.layer_scores, rel=1e-5)
    a = prune_student(copy.deepcopy(model), 2, PruneConfig(method="removal_loss"), CALIB, batch_size=1)
    b = prune_student(copy.deepcopy(model), 2, PruneConfig(method="removal_loss"), CALIB, batch_size=10)
    assert b.layer_scores == pytest.approx(a.layer_scores, rel=1e-5)


@pytest.mark.parametrize("keep_first, keep_last, expected", [(True, False, [0, 1]), (False, False, [1, 2]),
                                                             (False, True, [1, 3]), (True, True, [0, 3])])
def test_keep_first_and_keep_last(keep_first, keep_last, expected):
    model = tiny_model()
    make_identity(model, 0)  # first and last are the least influential layers
    make_identity(model, 3)
    direct = direct_influence(model)
    assert direct[1] > 1e-3 and direct[2] > 1e-3 and direct[0] < 1e-6 and direct[3] < 1e-6
    report = prune(model, 2, method="block_influence", keep_first=keep_first, keep_last=keep_last)
    assert report.kept_layers == expected


def test_removal_loss_equals_the_measured_loss_without_the_layer():
    model = tiny_model()
    expected = [direct_loss(without(model, [i])) for i in range(LAYERS)]
    report = prune(copy.deepcopy(model), 2, method="removal_loss", keep_first=False)
    assert report.layer_scores == pytest.approx(expected, rel=1e-5)
    assert report.baseline_loss == pytest.approx(direct_loss(model), rel=1e-5)
    cheapest = sorted(range(LAYERS), key=lambda i: expected[i])[:2]
    assert report.kept_layers == sorted(set(range(LAYERS)) - set(cheapest))
    assert sorted(report.drop_order) == sorted(cheapest)


def test_iterative_block_influence_rescores_after_each_drop():
    model = tiny_model(seed=3, num_hidden_layers=6)
    oneshot = prune(copy.deepcopy(model), 2, method="block_influence", keep_last=True)
    iterative = prune(copy.deepcopy(model), 2, method="block_influence", keep_last=True, iterative=True)
    assert iterative.iterative and not oneshot.iterative
    # one-shot: every score from the full model
    assert oneshot.layer_scores == pytest.approx(direct_influence(model), rel=1e-4, abs=1e-6)
    # iterative: each dropped layer is the least influential of what was left at its round
    dropped: list[int] = []
    for layer in iterative.drop_order:
        remaining = [i for i in range(6) if i not in dropped]
        scores = dict(zip(remaining, direct_influence(without(model, dropped))))
        candidates = [i for i in remaining if i not in (0, 5)]
        assert layer == min(candidates, key=lambda i: scores[i])
        assert iterative.layer_scores[layer] == pytest.approx(scores[layer], rel=1e-4, abs=1e-6)
        dropped.append(layer)
    assert iterative.kept_layers == [i for i in range(6) if i not in dropped] and len(dropped) == 4
    # re-scoring changed the scores of the layers after the first dropped one
    first = iterative.drop_order[0]
    later = [i for i in iterative.kept_layers if i > first]
    assert later and any(abs(iterative.layer_scores[i] - oneshot.layer_scores[i]) > 1e-6 for i in later)


def test_iterative_removal_loss():
    model = tiny_model(seed=5, num_hidden_layers=5)
    report = prune(copy.deepcopy(model), 3, method="removal_loss", iterative=True)
    first, second = report.drop_order
    round1 = {i: direct_loss(without(model, [i])) for i in range(1, 5)}
    assert first == min(round1, key=round1.get)
    round2 = {i: direct_loss(without(model, [first, i])) for i in range(1, 5) if i != first}
    assert second == min(round2, key=round2.get)
    assert report.layer_scores[second] == pytest.approx(round2[second], rel=1e-5)
    assert report.kept_layers == sorted(set(range(5)) - {first, second})


def test_explicit_list_and_none_do_no_depth_scoring():
    model = tiny_model()
    report = prune(model, [1, 3], method="block_influence")
    assert report.kept_layers == [1, 3] and report.layer_scores is None and report.calibration_tokens == 0
    report = prune(tiny_model(), None, method="removal_loss")
    assert report.kept_layers == [0, 1, 2, 3] and report.layer_scores is None
    report = prune(tiny_model(), 2)  # uniform
    assert report.kept_layers == [0, 3] and report.method == "uniform"


# ----------------------------------------------------------------------------- width


def test_intermediate_pruning_removes_the_silent_neurons():
    reference = tiny_model()
    g = torch.Generator().manual_seed(7)
    silent = {}
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            silent[i] = torch.randperm(INTER, generator=g)[:INTER - 48]  # a different set in each layer
            layer.mlp.up_proj.weight[silent[i]] = 0  # act(gate x) * 0: the neuron never fires
    model = copy.deepcopy(reference)
    report = prune(model, None, intermediate_size=48)
    assert report.widths == {"intermediate_size": (INTER, 48)}
    assert model.config.intermediate_size == 48
    for i, layer in enumerate(model.model.layers):
        keep = sorted(set(range(INTER)) - set(silent[i].tolist()))
        old = reference.model.layers[i].mlp
        assert torch.equal(layer.mlp.gate_proj.weight, old.gate_proj.weight[keep])
        assert torch.equal(layer.mlp.down_proj.weight, old.down_proj.weight[:, keep])
        assert layer.mlp.down_proj.in_features == 48
    assert_same_logits(model, reference)


def test_intermediate_pruning_of_live_neurons_changes_the_output():
    reference = tiny_model()
    model = copy.deepcopy(reference)
    prune(model, None, intermediate_size=48)
    assert not torch.allclose(logits(model)[0], logits(reference)[0], atol=1e-3)


def test_kv_group_pruning_removes_the_silent_group():
    reference = tiny_model()
    d = HIDDEN // HEADS
    silent = {0: 0, 1: 1, 2: 1, 3: 0}
    with torch.no_grad():
        for i, group in silent.items():  # the group's values are 0, so its heads' outputs are 0
            reference.model.layers[i].self_attn.v_proj.weight[group * d:(group + 1) * d] = 0
    model = copy.deepcopy(reference)
    report = prune(model, None, num_key_value_heads=1)
    assert report.widths == {"num_key_value_heads": (2, 1), "num_attention_heads": (4, 2)}
    c = model.config
    assert (c.num_key_value_heads, c.num_attention_heads, c.head_dim, c.hidden_size) == (1, 2, d, HIDDEN)
    for i, group in silent.items():
        kept = 1 - group
        old, new = reference.model.layers[i].self_attn, model.model.layers[i].self_attn
        q_rows = list(range(kept * 2 * d, (kept + 1) * 2 * d))  # query heads 2g, 2g+1 read KV group g
        assert torch.equal(new.q_proj.weight, old.q_proj.weight[q_rows])
        assert torch.equal(new.k_proj.weight, old.k_proj.weight[kept * d:(kept + 1) * d])
        assert torch.equal(new.o_proj.weight, old.o_proj.weight[:, q_rows])
    assert_same_logits(model, reference)


def silence_channels(model, channels) -> None:
    """Channels `channels` of the residual stream are 0 everywhere: embeddings and every writer zeroed."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, channels] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[channels] = 0
            layer.mlp.down_proj.weight[channels] = 0


def rms_corrected(model, kept: int, total: int):
    """The full model with RMSNorm's statistics as they are over `kept` of `total` channels: each norm's
    weight times sqrt(kept/total) and its eps times kept/total (exact when the other channels are 0)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("norm"):
                module.weight.mul_(math.sqrt(kept / total))
                module.variance_epsilon *= kept / total
    return model


def test_hidden_pruning_removes_the_silent_channels():
    reference = tiny_model()
    channels = torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(3))[:16]
    silence_channels(reference, channels)
    model = copy.deepcopy(reference)
    report = prune(model, None, hidden_size=48)
    assert report.widths == {"hidden_size": (HIDDEN, 48)}
    keep = sorted(set(range(HIDDEN)) - set(channels.tolist()))
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight[:, keep])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    layer, old = model.model.layers[1], reference.model.layers[1]
    assert torch.equal(layer.self_attn.q_proj.weight, old.self_attn.q_proj.weight[:, keep])
    assert torch.equal(layer.mlp.down_proj.weight, old.mlp.down_proj.weight[keep])
    assert torch.equal(layer.input_layernorm.weight, old.input_layernorm.weight[keep])
    assert model.config.hidden_size == 48 and model.config.head_dim == HIDDEN // HEADS
    # equal to the full model once RMSNorm averages over the kept channels only ...
    assert_same_logits(model, rms_corrected(reference, 48, HIDDEN))
    # ... and not equal without that correction: the statistics change (Minitron accepts this)
    assert not torch.allclose(logits(model)[0], logits(reference)[0], atol=1e-3)


def test_depth_and_width_save_reload_and_generate(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    report = prune(model, 3, method="block_influence", intermediate_size=64, num_key_value_heads=1, hidden_size=40)
    c = model.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_key_value_heads, c.num_attention_heads,
            c.hidden_size, c.head_dim) == (3, 64, 1, 2, 40, 16)
    assert report.parameters[1] == parameter_count(model) < report.parameters[0]
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["head_dim"] == 16
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert parameter_count(loaded) == parameter_count(model)
    assert_same_logits(loaded, model, atol=1e-6)
    prompt = torch.tensor([CALIB[0]])
    out = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, prompt.shape[1] + 6)
    # the KV cache works (layer_idx renumbered): incremental decoding equals a full pass
    with torch.no_grad():
        full = loaded(out).logits
        first = loaded(out[:, :-1], use_cache=True)
        step = loaded(out[:, -1:], past_key_values=first.past_key_values, use_cache=True).logits
    assert torch.allclose(step[0, -1], full[0, -1], atol=1e-5)


def test_qwen2_with_biases(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.normal_()
    prune(model, 3, method="removal_loss", intermediate_size=32, num_key_value_heads=1, hidden_size=24)
    assert model.model.layers[0].self_attn.q_proj.bias.shape == (2 * 8,)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert loaded.config.hidden_size == 24 and loaded.lm_head.weight.shape == (VOCAB, 24)
    assert_same_logits(loaded, model, atol=1e-6)


def test_gemma3_depth_and_mlp_but_not_hidden():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                              sliding_window=8)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    kinds = list(model.config.layer_types)
    report = prune(model, 2, method="removal_loss", intermediate_size=32, num_key_value_heads=1)
    assert model.config.layer_types == [kinds[i] for i in report.kept_layers]
    assert model.config.intermediate_size == 32 and model.config.num_attention_heads == 2
    model(torch.tensor([CALIB[0]]))
    with pytest.raises(ModelError, match="hidden_size"):
        prune(Gemma3ForCausalLM(config).eval(), None, hidden_size=16)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("cfg, message", [
    ({"intermediate_size": 4000}, "student.prune.intermediate_size: 4000 is more than the model's 128 MLP neurons"),
    ({"num_key_value_heads": 3}, "student.prune.num_key_value_heads: 3 is more than the model's 2 KV heads"),
    ({"hidden_size": 65}, "student.prune.hidden_size: 65 is more than the model's 64 hidden channels"),
    ({"hidden_size": 42}, "student.prune.hidden_size: 42 gives an invalid LlamaConfig: The hidden size (42) is not "
                          "a multiple of the number of attention heads (4)."),
])
def test_too_many_units_is_a_one_line_error(cfg, message):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as info:
        prune(model, 2, method="block_influence", **cfg)
    assert str(info.value) == message
    assert model.config.num_hidden_layers == LAYERS
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("keep, cfg, field", [(5, {}, "student.keep_layers: 5 is more than the model's 4 layers"),
                                              (1, {"method": "removal_loss", "keep_last": True}, "protected"),
                                              ([2, 1], {}, "student.keep_layers")])
def test_bad_keep(keep, cfg, field):
    with pytest.raises(ConfigError, match=field):
        prune(tiny_model(), keep, **cfg)


def test_scoring_without_calibration_is_an_error():
    with pytest.raises(ConfigError, match="calibration"):
        prune_student(tiny_model(), 2, PruneConfig(method="block_influence"), [])


def test_width_on_an_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    with pytest.raises(ModelError, match="GPT2LMHeadModel"):
        prune(model, None, intermediate_size=16)
    assert prune(model, 1, method="block_influence", keep_first=False).kept_layers in ([0], [1])  # depth works


# ----------------------------------------------------------------------------- report and calibration data


def test_report_markdown_and_summary():
    model = tiny_model()
    report = prune(model, 2, method="block_influence", intermediate_size=64)
    md = report.markdown()
    assert "block_influence" in md and str(report.kept_layers) in md and "| intermediate_size | 128 | 64 |" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert len(rows) == LAYERS  # one score row per original layer
    assert sum(line.rstrip().endswith("| yes |") for line in rows) == 2
    line = report.summary()
    assert "\n" not in line and "2/4" in line and "intermediate_size 128->64" in line
    data = json.loads(report.to_json())
    assert data["kept_layers"] == report.kept_layers and data["widths"] == {"intermediate_size": [128, 64]}
    assert isinstance(report, PruneReport)


def test_calibration_from_the_quickstart_prompts(tiny_tokenizer):
    texts = calibration_texts(None, 5, tiny_tokenizer)
    assert len(texts) == 5 and all(t.startswith("<|im_start|>user\n") for t in texts)
    assert "Thursday" in texts[0]  # the first quickstart prompt
    ids = calibration_token_ids(tiny_tokenizer, texts, 12)
    assert len(ids) == 5 and all(len(x) == 12 for x in ids)
    assert ids[0] == tiny_tokenizer(texts[0])["input_ids"][:12]


def test_calibration_from_a_file(tiny_tokenizer, make_jsonl):
    path = make_jsonl([{"text": "Hello world"}, {"prompt": "Why?", "completion": "Because."},
                       {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
                       {"text": "not read"}])
    texts = calibration_texts(str(path), 3, tiny_tokenizer)
    assert texts[0] == "Hello world"
    assert texts[1] == "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\nBecause.<|im_end|>\n"
    assert "Yo" in texts[2] and len(texts) == 3
    cfg = PruneConfig(calibration=str(path), calibration_samples=2, calibration_length=8)
    ids = load_calibration(tiny_tokenizer, cfg)
    assert len(ids) == 2 and ids[0][0] == tiny_tokenizer.bos_token_id and all(len(x) <= 8 for x in ids)
    bad = make_jsonl([{"question": "?"}], name="bad.jsonl")
    with pytest.raises(DataError, match="bad.jsonl:1"):
        calibration_texts(str(bad), 3, tiny_tokenizer)


# ----------------------------------------------------------------------------- the real teacher


@pytest.mark.slow
def test_smollm2_block_influence_10_of_30():
    from kdlm.models import bundled
    from kdlm.models.loading import load_model, load_tokenizer, resolve_source

    source = resolve_source(str(bundled.materialize("smollm2-135m-instruct")))
    model = load_model(source, dtype=torch.float32, device=torch.device("cpu"))
    tokenizer = load_tokenizer(source)
    cfg = PruneConfig(method="block_influence")  # keep_first, not keep_last; 64 quickstart prompts
    report = prune_student(model, 10, cfg, load_calibration(tokenizer, cfg))
    kept = report.kept_layers
    # measured (transformers 5.2, float32, CPU): [0, 1, 11, 20, 22, 23, 24, 27, 28, 29]; an earlier run on the
    # quickstart's teacher answers got [0, 1, 20, 21, 22, 23, 24, 27, 28, 29]
    assert len(kept) == 10 and kept[0] == 0 and model.config.num_hidden_layers == 10
    assert sum(i >= 20 for i in kept) >= 6
    assert max(report.layer_scores[1:29]) < report.layer_scores[0]  # the first layer is the most influential
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
