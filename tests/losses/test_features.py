"""Hint (hidden-state) terms: values and gradients against float64 references, layer maps, projections."""

from __future__ import annotations

import pytest
import torch

from kdlm.config import load_recipe
from kdlm.errors import ConfigError
from kdlm.losses.features import (FeatureProjections, ModelDims, feature_layers, hint_sum, hint_values, layer_pairs,
                                  resolve_feature_terms)
from kdlm.losses.objective import resolve_terms


def reference(student, teacher, metric):
    """Straightforward per-token definitions, one token at a time."""
    out = []
    mean_square = (teacher**2).mean(0)
    for s, t in zip(student, teacher):
        if metric == "mse":
            out.append(((s - t) ** 2).mean())
        elif metric == "normalised_mse":
            out.append((((s - t) ** 2) / (mean_square + 1e-6)).mean())
        else:
            out.append(1 - (s @ t) / torch.clamp(s.norm() * t.norm(), min=1e-6))
    return torch.stack(out)


@pytest.mark.parametrize("metric", ["mse", "normalised_mse", "cosine"])
def test_hint_values_and_gradients_match_the_float64_reference(metric):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    teacher = torch.randn(7, 5, dtype=torch.float64, generator=g)
    teacher[:, 2] *= 50  # an outlier channel, as LLM residual streams have
    got = hint_values(student, teacher, metric)
    want = reference(student, teacher, metric)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want)
    weights = torch.rand(7, dtype=torch.float64, generator=g)
    (g_got,) = torch.autograd.grad((got * weights).sum(), student)
    (g_want,) = torch.autograd.grad((want * weights).sum(), student)
    torch.testing.assert_close(g_got, g_want)


def test_normalised_mse_does_not_let_one_outlier_channel_dominate():
    teacher = torch.ones(16, 4, dtype=torch.float64)
    teacher[:, 0] = 100.0
    off_outlier = teacher.clone()
    off_outlier[:, 0] += 1.0  # 1% off on the outlier channel
    off_normal = teacher.clone()
    off_normal[:, 1] += 1.0  # 100% off on an ordinary channel
    assert hint_values(off_outlier, teacher, "mse").mean() == hint_values(off_normal, teacher, "mse").mean()
    assert hint_values(off_outlier, teacher, "normalised_mse").mean() < 1e-3 * hint_values(off_normal, teacher, "normalised_mse").mean()


def test_bf16_states_are_compared_in_fp32():
    s = torch.randn(4, 8).bfloat16()
    assert hint_values(s, s.float() + 1, "mse").dtype == torch.float32


def test_layer_maps():
    assert layer_pairs("proportional", student_layers=4, teacher_layers=10) == ((0, 0), (1, 3), (2, 6), (3, 9))
    assert layer_pairs("proportional", student_layers=1, teacher_layers=10) == ((0, 9),)
    assert layer_pairs("tinybert", student_layers=4, teacher_layers=12) == ((0, 2), (1, 5), (2, 8), (3, 11))
    assert layer_pairs("kept", student_layers=3, teacher_layers=30, kept=[0, 20, 29]) == ((0, 0), (1, 20), (2, 29))
    assert layer_pairs(None, student_layers=3, teacher_layers=30, kept=[0, 20, 29]) == ((0, 0), (1, 20), (2, 29))
    assert layer_pairs(None, student_layers=2, teacher_layers=5) == ((0, 0), (1, 4))
    assert layer_pairs([["embeddings", "embeddings"], [1, 4], ["final", "final"]], student_layers=2,
                       teacher_layers=5) == (("embeddings", "embeddings"), (1, 4), ("final", "final"))


@pytest.mark.parametrize("spec, kept, message", [
    ([[0, 30]], None, r"layers\.0: teacher layer 30 does not exist: the teacher has 30 decoder layers \(0\.\.29\)"),
    ([[10, 3]], None, r"layers\.0: student layer 10 does not exist"),
    ([[0, "middle"]], None, r"'middle' is not a layer"),
    ([[0]], None, r"expected a \[student, teacher\] pair"),
    ("kept", None, r"kept maps each student layer"),
    ("tinybert", None, r"tinybert needs the teacher's 30 layers to be a multiple of the student's 4"),
    ("stride", None, r"'stride' is not a layer map"),
])
def test_bad_layer_maps_are_one_line_errors(spec, kept, message):
    with pytest.raises(ConfigError, match=message) as err:
        layer_pairs(spec, student_layers=4, teacher_layers=30, kept=kept,
                    field="loss.terms[1].layers")
    assert str(err.value).startswith("loss.terms[1].layers")
    assert "\n" not in str(err.value)


class _Config:
    def __init__(self, layers, hidden, heads, kv, head_dim=None):
        self.num_hidden_layers, self.hidden_size, self.num_attention_heads = layers, hidden, heads
        self.num_key_value_heads, self.head_dim = kv, head_dim


def _terms(*terms):
    recipe = load_recipe(None, ["data.train=x.jsonl", f"loss.terms={list(terms)}"])
    return resolve_terms(recipe.loss)


def test_feature_terms_resolve_their_layers_and_relation_heads():
    student, teacher = ModelDims(_Config(4, 64, 4, 2)), ModelDims(_Config(8, 96, 6, 3, 16))
    terms = resolve_feature_terms(_terms({"name": "hint"}, {"name": "attention_relation", "layers": [[3, 7]]},
                                         {"name": "forward_kl"}), student=student, teacher=teacher)
    assert terms[0].layers == ((0, 0), (1, 2), (2, 5), (3, 7))
    assert terms[1].layers == ((3, 7),) and terms[1].relation_heads == 2  # the smaller KV head count
    assert terms[2].layers == ()
    assert feature_layers(terms) == ({0, 1, 2, 3}, {0, 2, 5, 7}, {3}, {7})


@pytest.mark.parametrize("term, message", [
    ({"name": "attention_relation", "relation_heads": 5}, r"loss.terms\[0\].relation_heads: 5 does not divide the "
                                                          r"student's qq width 64"),
    ({"name": "attention_score"}, r"needs equal head counts \(student 4, teacher 6\); use attention_relation"),
    ({"name": "attention_relation", "layers": [["final", "final"]]}, r"loss.terms\[0\].layers: attention_relation "
                                                                     r"compares decoder layers"),
])
def test_bad_feature_settings_are_one_line_errors(term, message):
    student, teacher = ModelDims(_Config(4, 64, 4, 2)), ModelDims(_Config(8, 96, 6, 3, 16))
    with pytest.raises(ConfigError, match=message) as err:
        resolve_feature_terms(_terms(term), student=student, teacher=teacher)
    assert "\n" not in str(err.value)


def test_projections_only_where_needed_identity_init_and_the_sum():
    student, teacher = ModelDims(_Config(2, 8, 2, 2)), ModelDims(_Config(4, 12, 2, 2))
    terms = resolve_feature_terms(_terms({"name": "hint", "layers": [[0, 1], [1, 3]]}), student=student,
                                  teacher=teacher)
    projections = FeatureProjections(terms, 8, 12, dtype=torch.float64)
    assert sorted(projections.maps) == ["hint__0__1", "hint__1__3"]
    weight = projections.maps["hint__0__1"].weight
    assert weight.shape == (12, 8) and torch.equal(weight[:8], torch.eye(8, dtype=torch.float64))
    assert weight[8:].abs().sum() == 0
    same = FeatureProjections(terms, 12, 12)
    assert len(same.maps) == 0  # equal widths, identity: compared as they are
    xavier = resolve_feature_terms(_terms({"name": "hint", "layers": [[0, 1]], "projection": "xavier"}),
                                   student=student, teacher=teacher)
    assert len(FeatureProjections(xavier, 12, 12).maps) == 1

    g = torch.Generator().manual_seed(1)
    s_hidden = {0: torch.randn(5, 8, dtype=torch.float64, generator=g), 1: torch.randn(5, 8, dtype=torch.float64, generator=g)}
    t_hidden = {1: torch.randn(5, 12, dtype=torch.float64, generator=g), 3: torch.randn(5, 12, dtype=torch.float64, generator=g)}
    c = torch.rand(5, dtype=torch.float64, generator=g)
    got = hint_sum(terms[0], s_hidden, t_hidden, projections, c)
    pad = torch.nn.functional.pad
    want = sum((reference(pad(s_hidden[s], (0, 4)), t_hidden[t], "mse") * c).sum() for s, t in ((0, 1), (1, 3))) / 2
    torch.testing.assert_close(got, want)
