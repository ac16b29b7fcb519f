"""Multi-teacher pooling: each pooling's target distribution on hand-made examples, and the per-teacher terms'
gradients equal the gradient of the single divergence to that target."""

import math

import pytest
import torch

from kdlm.config import from_dict
from kdlm.config.schema import Recipe
from kdlm.errors import ConfigError
from kdlm.losses.divergences import per_position_divergence
from kdlm.losses.multi_teacher import example_mean_ce, expand_terms, pooled_target, selection
from kdlm.losses.objective import Term


def _log(p):
    return torch.tensor(p, dtype=torch.float64).log()


# two teachers, two positions, three tokens: teacher A is sure of token 0, teacher B of token 2
A = [[0.8, 0.1, 0.1], [0.5, 0.25, 0.25]]
B = [[0.1, 0.1, 0.8], [0.25, 0.25, 0.5]]
TEACHERS = torch.stack([_log(A), _log(B)])  # [K=2, N=2, V=3]


def test_mixture_is_the_weighted_average_of_the_teachers():
    target = pooled_target(TEACHERS, "mixture", weights=[3, 1]).exp()
    expected = torch.tensor([[0.625, 0.1, 0.275], [0.4375, 0.25, 0.3125]], dtype=torch.float64)
    torch.testing.assert_close(target, expected)


def test_geometric_is_the_normalised_product():
    target = pooled_target(TEACHERS, "geometric", weights=[1, 1]).exp()
    raw = torch.tensor([[math.sqrt(0.08), 0.1, math.sqrt(0.08)], [math.sqrt(0.125), 0.25, math.sqrt(0.125)]],
                       dtype=torch.float64)
    torch.testing.assert_close(target, raw / raw.sum(-1, keepdim=True))
    # a product of experts: the token both teachers find equally (un)likely gains against the ones only one of
    # them backs, where the arithmetic mixture keeps it at 0.1
    assert target[0, 1] > pooled_target(TEACHERS, "mixture").exp()[0, 1] + 0.05


def test_min_ce_picks_each_examples_best_teacher():
    # two examples of one position each; references: token 0 (A is right) and token 2 (B is right)
    targets = torch.tensor([0, 2])
    example = torch.tensor([0, 1])
    logp = TEACHERS.gather(-1, targets.view(1, 2, 1).expand(2, 2, 1)).squeeze(-1)  # [K, N]
    ce = torch.stack([example_mean_ce(logp[k], example, 2) for k in range(2)])  # [K, E]
    target = pooled_target(TEACHERS, "min_ce", example_ce=ce, example=example).exp()
    torch.testing.assert_close(target[0], torch.tensor(A[0], dtype=torch.float64))
    torch.testing.assert_close(target[1], torch.tensor(B[1], dtype=torch.float64))


def test_min_ce_averages_over_the_examples_tokens():
    # one example of two tokens: A is better on the first, B on the second, A wins on the mean
    logp = torch.log(torch.tensor([[0.9, 0.2], [0.1, 0.3]], dtype=torch.float64))  # [K, N]
    example = torch.tensor([0, 0])
    ce = torch.stack([example_mean_ce(logp[k], example, 1) for k in range(2)])
    chosen = selection("min_ce", example=example, num_teachers=2, example_ce=ce)
    assert chosen.tolist() == [[True, True], [False, False]]
    # an example with no counted tokens never wins
    assert example_mean_ce(logp[0], example, 2)[1] == float("inf")


def test_domain_routes_each_token_to_its_teacher():
    target = pooled_target(TEACHERS, "domain", route=torch.tensor([1, 0])).exp()
    torch.testing.assert_close(target[0], torch.tensor(B[0], dtype=torch.float64))
    torch.testing.assert_close(target[1], torch.tensor(A[1], dtype=torch.float64))


def _term(name, weight=1.0):
    return Term(label=name, name=name, weight=weight, temperature=1.0, beta=0.5, skew=0.1)


def test_expand_terms_labels_and_weights():
    terms = expand_terms([_term("ce", 0.1), _term("forward_kl", 0.9)], ["a", "b"], [3, 1], "mixture")
    assert [(t.label, t.teacher) for t in terms] == [("ce", None), ("forward_kl@a", "a"), ("forward_kl@b", "b")]
    assert [round(t.weight, 6) for t in terms] == [0.1, 0.675, 0.225]
    routed = expand_terms([_term("forward_kl", 0.9)], ["a", "b"], [3, 1], "min_ce")
    assert [t.weight for t in routed] == [0.9, 0.9]  # one teacher per example: no dilution


@pytest.mark.parametrize("pooling,kind", [("mixture", "forward_kl"), ("geometric", "reverse_kl")])
def test_per_teacher_terms_have_the_gradient_of_the_divergence_to_the_pooled_target(pooling, kind):
    torch.manual_seed(0)
    teachers = torch.log_softmax(torch.randn(3, 5, 7, dtype=torch.float64), -1)
    weights = [0.5, 0.3, 0.2]
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    per_teacher = sum(w * per_position_divergence(logits, t, kind).sum() for w, t in zip(weights, teachers))
    g_terms, = torch.autograd.grad(per_teacher, logits)
    pooled = pooled_target(teachers, pooling, weights=weights)
    g_pooled, = torch.autograd.grad(per_position_divergence(logits, pooled, kind).sum(), logits)
    torch.testing.assert_close(g_terms, g_pooled)


def _recipe(**extra):
    base = {"teachers": [{"model": "a", "name": "math"}, {"model": "b", "name": "chat"}], "data": {"train": "x.jsonl"}}
    for key, value in extra.items():
        base.setdefault(key, {}).update(value) if isinstance(value, dict) else base.__setitem__(key, value)
    return from_dict(Recipe, base)


def test_recipe_takes_the_first_teacher_as_primary():
    recipe = _recipe()
    assert recipe.teacher.model == "a" and recipe.teacher_names() == ["math", "chat"]


@pytest.mark.parametrize("extra,message", [
    ({"loss": {"terms": [{"name": "forward_kl"}], "teacher_pooling": "geometric"}}, "use reverse_kl"),
    ({"loss": {"teacher_pooling": "domain"}}, "data.domain_field"),
    ({"loss": {"teacher_pooling": "domain"}, "data": {"domain_field": "d"}}, "teachers[0].domains"),
    ({"loss": {"terms": [{"name": "hint"}]}}, "not supported yet"),
    ({"source": {"kind": "student"}, "data": {"format": "prompt_completion"}}, "set source.kind: static"),
])
def test_multi_teacher_bad_combinations_are_one_line_errors(extra, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        _recipe(**extra)
    assert "\n" not in str(err.value)


def test_a_domain_may_belong_to_one_teacher_only():
    with pytest.raises(ConfigError, match="already belongs to math"):
        from_dict(Recipe, {"teachers": [{"model": "a", "name": "math", "domains": ["x"]},
                                        {"model": "b", "name": "chat", "domains": ["x"]}],
                           "data": {"train": "t.jsonl", "domain_field": "d"}, "loss": {"teacher_pooling": "domain"}})
