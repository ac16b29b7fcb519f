"""One optimizer step: counted positions, token normalisation under gradient accumulation, the teacher stays frozen."""

from __future__ import annotations

import pytest
import torch

from kdlm.config import LossConfig, LossTerm
from kdlm.data import Collator, Example
from kdlm.losses.fused import TOTAL_KEY
from kdlm.losses.objective import resolve_terms
from kdlm.models.loading import load_model, resolve_source
from kdlm.training.step import DistillationModule, Teacher, counted_positions, model_inputs
from kdlm.training.trainer import accumulate_gradients


def test_counted_positions_shift_labels_by_one():
    labels = torch.tensor([[-100, -100, 5, 6, -100]])
    mask, targets = counted_positions(labels)
    # output position i predicts token i+1: positions 1 and 2 predict tokens 5 and 6
    assert mask.tolist() == [[False, True, True, False]]
    assert targets.tolist() == [5, 6]


def _examples() -> list[Example]:
    # deliberately unequal numbers of counted tokens per example
    lengths = [(3, 9), (5, 2), (2, 12), (4, 1)]
    out = []
    for i, (prompt, answer) in enumerate(lengths):
        ids = [(7 * i + j) % 50 + 3 for j in range(prompt + answer)]
        out.append(Example(f"ex{i}", ids, [-100] * prompt + ids[prompt:]))
    return out


@pytest.fixture
def parts(tiny_model_dir):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    src = resolve_source(str(tiny_model_dir))
    teacher_model = load_model(src, dtype=torch.float32, device=torch.device("cpu"), frozen=True)
    torch.manual_seed(0)
    student = load_model(src, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a student that differs from the teacher
    vocab = teacher_model.get_output_embeddings().weight.shape[0]
    terms = resolve_terms(LossConfig(terms=[LossTerm(name="forward_kl", weight=0.6, temperature=2.0),
                                            LossTerm(name="ce", weight=0.4)]))
    module = DistillationModule(student, terms, vocab)
    # a fresh fp32 accelerator: an earlier test's run may have left accelerate's singleton in bf16
    AcceleratorState._reset_state()
    return module, Teacher(teacher_model, vocab), terms, Accelerator(cpu=True, mixed_precision="no")


def _grads(module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]).clone()


def test_accumulation_normalises_by_the_global_token_count(parts):
    module, teacher, terms, accelerator = parts
    collate = Collator(pad_token_id=0)
    examples = _examples()

    module.zero_grad()
    accumulate_gradients(module, teacher, [collate(examples)], terms, accelerator)
    one_batch = _grads(module)

    module.zero_grad()
    _, global_count, _ = accumulate_gradients(module, teacher, [collate(examples[:2]), collate(examples[2:])], terms,
                                              accelerator)
    accumulated = _grads(module)
    assert global_count.item() == sum(sum(l != -100 for l in ex.labels[1:]) for ex in examples)
    torch.testing.assert_close(accumulated, one_batch, rtol=1e-5, atol=1e-7)

    # the peers' bug (per-micro-batch mean, then averaged) gives a different gradient on the same data
    module.zero_grad()
    for half in (examples[:2], examples[2:]):
        batch = collate(half)
        mask, _ = counted_positions(batch["labels"])
        sums = module(labels=batch["labels"], teacher=teacher.rows(model_inputs(batch), mask),
                      **model_inputs(batch))
        (sums[TOTAL_KEY] / mask.sum() / 2).backward()
    assert not torch.allclose(_grads(module), one_batch, rtol=1e-3, atol=0)


def test_teacher_gets_no_gradient_and_stays_in_eval(parts):
    module, teacher, terms, accelerator = parts
    accumulate_gradients(module, teacher, [Collator(0)(_examples())], terms, accelerator)
    assert not teacher.model.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert any(p.grad is not None for p in module.parameters())


def test_fused_and_unfused_paths_agree(parts):
    module, teacher, terms, accelerator = parts
    batch = Collator(0)(_examples())
    mask, _ = counted_positions(batch["labels"])
    results = []
    for fused in (True, False):
        module.fused = fused
        module.chunk_bytes = 64 * 1024  # force several chunks on the fused path
        module.zero_grad()
        sums = module(labels=batch["labels"], teacher=teacher.rows(model_inputs(batch), mask), **model_inputs(batch))
        sums[TOTAL_KEY].backward()
        results.append(({k: v.detach() for k, v in sums.items()}, _grads(module)))
    (fused_sums, fused_grads), (plain_sums, plain_grads) = results
    for k in plain_sums:
        torch.testing.assert_close(fused_sums[k], plain_sums[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grads, plain_grads, rtol=1e-4, atol=2e-6)  # fp32 summation order differs
