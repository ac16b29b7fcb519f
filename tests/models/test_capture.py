"""Tests for kdlm.models.capture: hidden states and post-RoPE q/k/v without switching attention implementation."""

from __future__ import annotations

import pytest
import torch

from kdlm.errors import ConfigError
from kdlm.losses.attention import _visible, relation_kl_sum
from kdlm.models import capture as capture_mod
from kdlm.models.capture import FeatureCapture


def tiny_llama(attn: str, seed: int = 0, layers: int = 2, heads: int = 4, kv_heads: int = 2, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=100,
                         max_position_embeddings=64, attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def pair():
    sdpa = tiny_llama("sdpa")
    eager = tiny_llama("eager", seed=1)
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    return sdpa, eager


IDS = torch.tensor([[5, 17, 23, 42, 8, 9, 11, 3], [7, 1, 2, 60, 61, 0, 0, 0]])
MASK = torch.tensor([[1] * 8, [1, 1, 1, 1, 1, 0, 0, 0]])
LEFT_MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
PACKED_POS = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 1]])


def expected_weights(q, k, visible):
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    return scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)


def full_visible(attention_mask, position_ids, L):
    key_valid = torch.ones(IDS.shape, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    doc = torch.zeros(IDS.shape, dtype=torch.long) if position_ids is None else (position_ids == 0).long().cumsum(1)
    return _visible(key_valid, doc, 0, L)[0]


@pytest.mark.parametrize("layout", ["padded", "left_padded", "packed"])
def test_sdpa_capture_equals_eager_attention_weights(pair, layout):
    sdpa, eager = pair
    kwargs = {"padded": {"attention_mask": MASK}, "left_padded": {"attention_mask": LEFT_MASK},
              "packed": {"position_ids": PACKED_POS}}[layout]
    with torch.no_grad():
        want = eager(IDS, output_attentions=True, use_cache=False, **kwargs).attentions
        with FeatureCapture(sdpa, attention_layers=[0, 1], detach=True) as cap:
            sdpa(IDS, use_cache=False, **kwargs)
    assert sorted(cap.qkv) == [0, 1]
    visible = full_visible(kwargs.get("attention_mask"), kwargs.get("position_ids"), IDS.shape[1])
    for i in (0, 1):
        q, k, v = cap.qkv[i]
        assert q.shape == (2, 4, 8, 16) and k.shape == (2, 2, 8, 16) and v.shape == (2, 2, 8, 16)
        got = expected_weights(q, k, visible)
        b, row = kwargs.get("attention_mask", torch.ones(IDS.shape)).bool().nonzero(as_tuple=True)  # real queries
        torch.testing.assert_close(got[b, :, row], want[i][b, :, row], atol=1e-5, rtol=0)


def test_capture_leaves_model_unchanged(pair):
    sdpa, _ = pair
    from transformers.modeling_utils import AttentionInterface

    original = AttentionInterface.__dict__["get_interface"]
    layer = sdpa.model.layers[1]
    hooks_before = (len(layer._forward_hooks), len(sdpa.model._forward_pre_hooks),
                    len(sdpa.model.norm._forward_hooks), len(sdpa.model.embed_tokens._forward_hooks))
    with torch.no_grad():
        plain = sdpa(IDS, attention_mask=MASK).logits
        with FeatureCapture(sdpa, hidden_layers=["embeddings", 1, "final"], attention_layers=[1], detach=True) as cap:
            assert capture_mod.interface_wrapped()
            assert sdpa.config._attn_implementation == "sdpa"
            out = sdpa(IDS, attention_mask=MASK, output_hidden_states=False)
            captured = out.logits
    assert torch.equal(plain, captured)
    assert sdpa.config._attn_implementation == "sdpa"
    assert not capture_mod.interface_wrapped() and capture_mod.active_watchers() == 0
    assert AttentionInterface.__dict__["get_interface"] is original
    assert (len(layer._forward_hooks), len(sdpa.model._forward_pre_hooks), len(sdpa.model.norm._forward_hooks),
            len(sdpa.model.embed_tokens._forward_hooks)) == hooks_before
    # hidden states equal what output_hidden_states reports
    with torch.no_grad():
        ref = sdpa(IDS, attention_mask=MASK, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cap.hidden["embeddings"], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(cap.hidden[1], _layer1_output(sdpa), rtol=0, atol=0)
    assert not torch.equal(cap.hidden[1], cap.hidden["final"])
    torch.testing.assert_close(cap.hidden["final"], ref[-1], rtol=0, atol=0)
    # after exit, forwards record nothing
    cap.clear()
    with torch.no_grad():
        sdpa(IDS, attention_mask=MASK)
    assert cap.hidden == {} and cap.qkv == {}


def _layer1_output(model):
    got = {}
    handle = model.model.layers[1].register_forward_hook(lambda m, a, o: got.setdefault("h", o))
    with torch.no_grad():
        model(IDS, attention_mask=MASK)
    handle.remove()
    return got["h"]


def test_two_captures_on_two_models_do_not_clash(pair):
    sdpa, eager = pair
    other = tiny_llama("sdpa", seed=3, layers=3)
    with torch.no_grad():
        with FeatureCapture(sdpa, attention_layers=[0], detach=True) as a, \
                FeatureCapture(other, attention_layers=[2], hidden_layers=[0], detach=True) as b:
            sdpa(IDS)
            assert sorted(a.qkv) == [0] and b.qkv == {} and b.hidden == {}
            other(IDS)
            assert sorted(b.qkv) == [2] and sorted(b.hidden) == [0]
            with FeatureCapture(sdpa, attention_layers=[1], detach=True) as c:  # a second one on the same model
                sdpa(IDS)
            assert sorted(c.qkv) == [1] and sorted(a.qkv) == [0]
            assert not torch.equal(a.qkv[0][0], b.qkv[2][0][:, :, :8])
        assert capture_mod.active_watchers() == 0
    # eager is captured the same way
    with torch.no_grad(), FeatureCapture(eager, attention_layers=[0], detach=True) as e:
        eager(IDS)
    with torch.no_grad(), FeatureCapture(sdpa, attention_layers=[0], detach=True) as s:
        sdpa(IDS)
    for x, y in zip(e.qkv[0], s.qkv[0]):
        torch.testing.assert_close(x, y)


def test_detach_modes():
    model = tiny_llama("sdpa", seed=4).train()
    with FeatureCapture(model, attention_layers=[0], hidden_layers=[1], detach=True) as cap:
        model(IDS)
    assert all(not t.requires_grad for t in cap.qkv[0]) and not cap.hidden[1].requires_grad
    with FeatureCapture(model, attention_layers=[0], hidden_layers=[1], detach=False) as cap:
        model(IDS)
    assert all(t.requires_grad for t in cap.qkv[0]) and cap.hidden[1].requires_grad


def _student_grads(model, teacher_qkv, checkpointing: bool):
    model.zero_grad(set_to_none=True)
    if not checkpointing:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    elif hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with FeatureCapture(model, attention_layers=[0, 1], detach=False) as cap:
        model(IDS, attention_mask=MASK, use_cache=False)
    assert sorted(cap.qkv) == [0, 1]
    captured = {i: [id(t) for t in cap.qkv[i]] for i in (0, 1)}
    loss = sum(relation_kl_sum(cap.qkv[i], teacher_qkv[i], relation_heads=4, query_rows=MASK.bool(),
                               attention_mask=MASK, chunk_rows=3) for i in (0, 1))
    with cap:  # the backward replay of checkpointed layers must not record again
        loss.backward()
    assert {i: [id(t) for t in cap.qkv[i]] for i in (0, 1)} == captured
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_student_gradients_reach_q_proj_also_with_checkpointing():
    teacher = tiny_llama("sdpa", seed=5, heads=8, kv_heads=4, hidden=128)  # different head counts and dims
    with torch.no_grad(), FeatureCapture(teacher, attention_layers=[0, 1], detach=True) as tcap:
        teacher(IDS, attention_mask=MASK)
    student = tiny_llama("sdpa", seed=6)
    plain = _student_grads(student, tcap.qkv, checkpointing=False)
    for i in (0, 1):
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert plain[f"model.layers.{i}.self_attn.{proj}.weight"].abs().sum() > 0
    ckpt = _student_grads(student, tcap.qkv, checkpointing=True)
    assert student.model.layers[0].gradient_checkpointing
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden_layers": [31]}, "layer 31 does not exist: the model has 2 decoder layers (0..1)"),
    ({"attention_layers": [2]}, "layer 2 does not exist: the model has 2 decoder layers (0..1)"),
    ({"hidden_layers": [-1]}, "layer -1 does not exist: the model has 2 decoder layers (0..1)"),
    ({"hidden_layers": ["middle"]}, "layer 'middle' is not a layer index or one of 'embeddings', 'final'"),
    ({"attention_layers": ["final"]}, "layer 'final': attention is captured from decoder layers only (0..1)"),
])
def test_bad_layer_refs(pair, kwargs, message):
    sdpa, _ = pair
    with pytest.raises(ConfigError) as err:
        FeatureCapture(sdpa, detach=True, **kwargs)
    assert str(err.value) == message and "\n" not in str(err.value)
    assert capture_mod.active_watchers() == 0
