"""Packing: rows respect the length budget, and the packed computation equals the unpacked one."""

from __future__ import annotations

import torch

from kdlm.config import LossConfig, LossTerm
from kdlm.data import Collator, Example
from kdlm.data.packing import pack_examples
from kdlm.losses.fused import TOTAL_KEY
from kdlm.losses.objective import resolve_terms
from kdlm.models.loading import load_model, resolve_source
from kdlm.training.step import DistillationModule, Teacher, counted_positions, model_inputs


def _examples() -> list[Example]:
    out = []
    for i, (prompt, answer) in enumerate([(3, 9), (5, 2), (2, 12), (4, 1), (6, 6), (1, 3)]):
        ids = [(11 * i + 5 * j) % 300 + 4 for j in range(prompt + answer)]
        out.append(Example(f"ex{i}", ids, [-100] * prompt + ids[prompt:]))
    return out


def test_rows_fit_and_keep_every_example_once():
    rows = pack_examples(_examples(), pack_length=20)
    assert all(len(r.input_ids) <= 20 for r in rows)
    assert sorted(s for r in rows for s in r.members) == sorted(e.sample_id for e in _examples())
    assert len(rows) < len(_examples())
    for row in rows:  # positions restart at 0 at each member; the member's first token is not scored
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert len(starts) == len(row.members)
        assert all(row.labels[i] == -100 for i in starts)


def test_packed_batch_has_positions_not_mask():
    batch = Collator(pad_token_id=0)(pack_examples(_examples(), pack_length=20))
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    # padding forms its own block: positions restart at 0 after the last member
    row = 0
    n = int((batch["labels"][row] != -100).nonzero().max()) + 1
    assert batch["position_ids"][row, n:].tolist()[:2] in ([0, 1], [])


def test_packed_loss_and_gradients_equal_unpacked(tiny_model_dir):
    src = resolve_source(str(tiny_model_dir))
    teacher_model = load_model(src, dtype=torch.float32, device=torch.device("cpu"), frozen=True)
    torch.manual_seed(0)
    student = load_model(src, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vocab = teacher_model.get_output_embeddings().weight.shape[0]
    terms = resolve_terms(LossConfig(terms=[LossTerm(name="forward_kl", weight=0.5), LossTerm(name="ce", weight=0.5)]))
    module, teacher = DistillationModule(student, terms, vocab), Teacher(teacher_model, vocab)

    def run(batch):
        module.zero_grad()
        mask, _ = counted_positions(batch["labels"])
        sums = module(labels=batch["labels"], teacher=teacher.rows(model_inputs(batch), mask), **model_inputs(batch))
        sums[TOTAL_KEY].backward()
        grads = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
        return {k: v.detach() for k, v in sums.items() if k != TOTAL_KEY}, grads, int(mask.sum())

    collate = Collator(pad_token_id=0)
    padded_sums, padded_grads, padded_count = run(collate(_examples()))
    packed_sums, packed_grads, packed_count = run(collate(pack_examples(_examples(), pack_length=20)))
    assert packed_count == padded_count
    for k in padded_sums:
        torch.testing.assert_close(packed_sums[k], padded_sums[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_grads, padded_grads, rtol=1e-4, atol=1e-6)

    # control: the same packed rows with plain causal attention across members give other values
    leaky = collate(pack_examples(_examples(), pack_length=20))
    leaky["attention_mask"] = torch.ones_like(leaky.pop("position_ids"))
    leaky_sums, _, _ = run(leaky)
    assert not torch.allclose(leaky_sums["forward_kl"], padded_sums["forward_kl"], rtol=1e-3)
