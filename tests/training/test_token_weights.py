"""Per-example loss weights and REDI in the training step, against hand computations in float64.

The hand side runs float64 copies of the models through their ordinary HF forward (full [B, L, V]
logits), takes per-token losses and writes the objective out: sum_i w_i * l_i / N with N the plain
count of counted tokens of the whole optimizer step. The step under test runs the same float64 models
through the fused (several chunks) and unfused paths, with two micro-batches of gradient accumulation,
so the two agree to ~1e-12 and any weighting or normalisation slip shows. (Batches carry weights in
float32, so the hand side uses the float32-rounded weights.) One float32 run checks the training dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kdlm.config import LossConfig, LossTerm
from kdlm.data import Collator, Example
from kdlm.data.packing import pack_examples
from kdlm.losses.fused import TOTAL_KEY
from kdlm.losses.objective import resolve_terms
from kdlm.models.loading import load_model, resolve_source
from kdlm.training.step import DistillationModule, Teacher
from kdlm.training.trainer import accumulate_gradients

T = 2.0


def _examples(weights, negatives=None) -> list[Example]:
    lengths = [(3, 9), (5, 4), (2, 12), (4, 6)]  # unequal answers
    out = []
    for i, ((prompt, answer), w) in enumerate(zip(lengths, weights)):
        ids = [(7 * i + 5 * j) % 300 + 4 for j in range(prompt + answer)]
        out.append(Example(f"ex{i}", ids, [-100] * prompt + ids[prompt:], weight=w,
                           negative=bool(negatives and negatives[i])))
    return out


@pytest.fixture
def models(tiny_model_dir):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    src = resolve_source(str(tiny_model_dir))
    teacher = load_model(src, dtype=torch.float32, device=torch.device("cpu"), frozen=True)
    torch.manual_seed(0)
    student = load_model(src, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    AcceleratorState._reset_state()
    return student, teacher, Accelerator(cpu=True, mixed_precision="no")


def _step(models, terms, micro_batches, *, fused: bool, dtype=torch.float64):
    """Gradients and per-term sums of one optimizer step through accumulate_gradients."""
    student, teacher, accelerator = models
    student, teacher = copy.deepcopy(student).to(dtype), copy.deepcopy(teacher).to(dtype)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    module = DistillationModule(student, terms, vocab, fused=fused, chunk_bytes=64 * 1024)
    module.zero_grad()
    sums, count, _ = accumulate_gradients(module, Teacher(teacher, vocab), micro_batches, terms, accelerator)
    grads = torch.cat([p.grad.flatten() for p in module.parameters()]).double()
    return {k: v.double() for k, v in sums.items()}, count.item(), grads


def _per_token(student, teacher, examples):
    """Per counted token, in float64 from full logits: (ce, KL(teacher || student) at T, example index)."""
    batch = Collator(0)(examples)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    mask = batch["labels"][:, 1:] != -100
    targets = batch["labels"][:, 1:][mask]
    student_logits = student(**inputs).logits[:, :-1][mask]  # [N, V] fp64
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits[:, :-1][mask]
    ce = torch.nn.functional.cross_entropy(student_logits, targets, reduction="none")
    t_logp, s_logp = torch.log_softmax(teacher_logits / T, -1), torch.log_softmax(student_logits / T, -1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    example = torch.arange(len(examples)).unsqueeze(1).expand_as(mask)[mask]
    return ce, kl, example


def _hand(models, examples, objective):
    """objective(ce, kl, example) -> (total SUM, {label: sum}); returns the sums / N and the fp64 gradient."""
    student, teacher, _ = models
    student, teacher = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    ce, kl, example = _per_token(student, teacher, examples)
    total, sums = objective(ce, kl, example)
    count = ce.shape[0]
    (total / count).backward()
    grads = torch.cat([p.grad.flatten() for p in student.parameters()]).double()
    return {k: v.detach() for k, v in sums.items()}, count, grads


def _close(got, grads, want, want_grads, *, exact: bool) -> None:
    """float64 all through (the fused path keeps fp64) agrees to rounding; the unfused head computes fp32
    logits whatever the model dtype, so it and a float32 step agree to float32's error of small sums."""
    rtol, grad_rtol, grad_atol = (1e-11, 1e-9, 1e-13) if exact else (3e-5, 1e-3, 1e-6)
    for label in want:
        torch.testing.assert_close(got[label], want[label], rtol=rtol, atol=0)
    torch.testing.assert_close(grads, want_grads, rtol=grad_rtol, atol=grad_atol)


def _rounded(weights) -> torch.Tensor:
    """The weights as a batch carries them: float32 (0.3 is not a float32 number)."""
    return torch.tensor(weights, dtype=torch.float32).double()


@pytest.mark.parametrize("fused", [True, False])
def test_weights_scale_each_tokens_loss_exactly(models, fused):
    weights = [0.5, 0.5, 0.3, 0.7]
    examples = _examples(weights)
    terms = resolve_terms(LossConfig(terms=[LossTerm(name="forward_kl", weight=0.6, temperature=T),
                                            LossTerm(name="ce", weight=0.4)]))

    def objective(ce, kl, example):
        w = _rounded(weights)[example]  # [N]: each token's example weight
        sums = {"forward_kl": T**2 * (w * kl).sum(), "ce": (w * ce).sum()}
        return 0.6 * sums["forward_kl"] + 0.4 * sums["ce"], sums

    want, want_count, want_grads = _hand(models, examples, objective)
    collate = Collator(0)
    got, count, grads = _step(models, terms, [collate(examples[:2]), collate(examples[2:])], fused=fused)
    assert count == want_count
    _close(got, grads, want, want_grads, exact=fused)

    # the training dtype: the same step in float32, within float32's error of small KL sums
    got32, _, grads32 = _step(models, terms, [collate(examples[:2]), collate(examples[2:])], fused=fused,
                              dtype=torch.float32)
    _close(got32, grads32, want, want_grads, exact=False)

    # control: the unweighted step is a different gradient on the same tokens
    _, _, plain = _step(models, terms, [collate(_examples([1.0] * 4)[:2]), collate(_examples([1.0] * 4)[2:])],
                        fused=fused)
    assert not torch.allclose(plain, grads, rtol=1e-2, atol=0)


def test_packed_rows_weigh_each_member_as_unpacked(models):
    """Each packed member keeps its weight, its negative flag and its own |y| for redi (members found from the
    position ids restarting at 0)."""
    examples = _examples([0.5, 0.5, 0.3, 0.7], [False, True, False, False])
    terms = resolve_terms(LossConfig(terms=[LossTerm(name="forward_kl", weight=0.6, temperature=T),
                                            LossTerm(name="ce", weight=0.4), LossTerm(name="redi", weight=0.2)]))
    collate = Collator(0)
    padded, _, padded_grads = _step(models, terms, [collate(examples)], fused=True)
    rows = pack_examples(examples, pack_length=24)
    assert len(rows) < len(examples) and max(len(r.members) for r in rows) > 1
    packed, _, packed_grads = _step(models, terms, [collate(rows)], fused=True)
    for label in padded:
        torch.testing.assert_close(packed[label], padded[label], rtol=1e-11, atol=0)
    torch.testing.assert_close(packed_grads, padded_grads, rtol=1e-9, atol=1e-13)


def test_unit_weights_are_bit_identical_to_no_weights(models):
    terms = resolve_terms(LossConfig(terms=[LossTerm(name="forward_kl", weight=0.6), LossTerm(name="ce", weight=0.4)]))
    collate = Collator(0)
    ones = [Example(ex.sample_id, ex.input_ids, ex.labels, weight=1.0) for ex in _examples([1.0] * 4)]
    plain = [Example(ex.sample_id, ex.input_ids, ex.labels) for ex in ones]
    a_sums, _, a_grads = _step(models, terms, [collate(ones)], fused=True)
    b_sums, _, b_grads = _step(models, terms, [collate(plain)], fused=True)
    assert torch.equal(a_grads, b_grads) and all(torch.equal(a_sums[k], b_sums[k]) for k in a_sums)


@pytest.mark.parametrize("fused", [True, False])
def test_redi_value_and_gradient_match_the_formula(models, fused):
    """Xu et al. 2025: -(1/|y+|) log p(y+) + alpha (1/|y-|) log p(y-), here with a ce term beside it and example
    weights: negatives are left out of ce, the whole divided by the step's count of counted tokens."""
    weights, negatives, alpha = [1.0, 0.5, 1.0, 2.0], [False, True, False, True], 0.8  # exact in float32
    examples = _examples(weights, negatives)
    terms = resolve_terms(LossConfig(terms=[LossTerm(name="redi", weight=1.0), LossTerm(name="ce", weight=0.5)],
                                     redi_alpha=alpha))
    assert terms[0].alpha == alpha

    def objective(ce, kl, example):
        redi = ce.new_zeros(())
        for i, (w, negative) in enumerate(zip(weights, negatives)):
            length = (example == i).sum()
            mean_nll = ce[example == i].sum() / length  # (1/|y|) * -log p(y|x)
            redi = redi + float(w) * (-alpha * mean_nll if negative else mean_nll)
        positive = ~torch.tensor(negatives)[example]
        w = _rounded(weights)[example]
        sums = {"redi": redi, "ce": (w * ce * positive).sum()}  # negatives count in redi only
        return sums["redi"] + 0.5 * sums["ce"], sums

    want, want_count, want_grads = _hand(models, examples, objective)
    collate = Collator(0)
    got, count, grads = _step(models, terms, [collate(examples[:2]), collate(examples[2:])], fused=fused)
    assert count == want_count  # negatives' tokens stay in the denominator
    _close(got, grads, want, want_grads, exact=fused)


def test_negative_rows_do_not_reach_ce(models):
    terms = resolve_terms(LossConfig(terms=[LossTerm(name="ce")]))
    collate = Collator(0)
    examples = _examples([1.0] * 4, [False, True, False, True])
    got, _, _ = _step(models, terms, [collate(examples)], fused=True)
    positives, _, _ = _step(models, terms, [collate([examples[0], examples[2]])], fused=True)
    torch.testing.assert_close(got["ce"], positives["ce"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_an_offline_cache_signal_gets_the_same_coefficients(models, fused):
    """The sparse (teacher cache) path: with every id kept (k = V) its tail-bucket divergence is the dense one, so
    the weighted, REDI-carrying step equals the live-teacher step."""
    from kdlm.losses.sparse import SparseTeacher
    from kdlm.training.step import counted_positions, model_inputs

    student, teacher, _ = models
    student, teacher = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    vocab = teacher.get_output_embeddings().weight.shape[0]
    terms = resolve_terms(LossConfig(terms=[LossTerm(name="forward_kl", weight=0.6), LossTerm(name="redi", weight=0.3),
                                            LossTerm(name="ce", weight=0.1)]))
    batch = Collator(0)(_examples([0.5, 0.5, 0.3, 0.7], [False, True, False, False]))
    module = DistillationModule(student, terms, vocab, fused=fused, chunk_bytes=64 * 1024)
    live = Teacher(teacher, vocab).rows(model_inputs(batch), counted_positions(batch["labels"])[0])
    # the teacher logits each path computes: the fused loop keeps fp64, the unfused LMHead.logits gives fp32
    logits = live.hidden @ live.head.weight[:vocab].T if fused else live.head.logits(live.hidden)
    cached = SparseTeacher.from_logits(logits, k=vocab, temperature=1.0)
    results = []
    for signal in (live, cached):
        module.zero_grad()
        sums = module(labels=batch["labels"], teacher=signal, **model_inputs(batch), token_weights=batch["token_weights"],
                      negative=batch["negative"])
        sums[TOTAL_KEY].backward()
        results.append((sums, torch.cat([p.grad.flatten() for p in module.parameters()])))
    (live_sums, live_grads), (cached_sums, cached_grads) = results
    rtol, grad_rtol, grad_atol = (1e-11, 1e-9, 1e-13) if fused else (1e-6, 1e-4, 1e-9)  # fp64 / fp32 logits
    for term in terms:
        torch.testing.assert_close(cached_sums[term.label], live_sums[term.label], rtol=rtol, atol=0)
    torch.testing.assert_close(cached_grads, live_grads, rtol=grad_rtol, atol=grad_atol)
