"""The cached signal in the objective, as the trainer will use it, against the live teacher."""

from __future__ import annotations

import pytest
import torch

from kdlm.cache import CachedTeacher, capture_teacher
from kdlm.data import Collator
from kdlm.losses.objective import lm_head_of, resolve_terms, term_sums
from kdlm.losses.sparse import sparse_term_sums, sparse_validation_figures
from kdlm.models.loading import load_model, resolve_source
from kdlm.training.step import Teacher, counted_positions, last_hidden, model_inputs

from .conftest import examples_of, tokenizer_of


@pytest.mark.parametrize("k", [448, 16])
def test_cached_signal_against_the_live_teacher(make_recipe, cache_teacher_dir, tiny_student_dir, k):
    recipe = make_recipe(f"teacher.cache_top_k={k}", "loss.temperature=2.0", "teacher.cache_temperature=2.0",
                         "loss.terms.0.name=reverse_kl", f"student.model={tiny_student_dir}")
    folder = capture_teacher(recipe, shard_rows=90, show_progress=False)
    cache = CachedTeacher(folder, recipe, tokenizer_of(recipe), vocab=448)
    cpu = torch.device("cpu")
    teacher = Teacher(load_model(resolve_source(str(cache_teacher_dir)), dtype=torch.float32, device=cpu, frozen=True), 448)
    student = load_model(resolve_source(str(tiny_student_dir)), dtype=torch.float32, device=cpu)
    terms = resolve_terms(recipe.loss)
    batch = Collator(0)(examples_of(recipe)[5:13])
    mask, targets = counted_positions(batch["labels"])
    student_logits = lm_head_of(student, 448).logits(last_hidden(student, model_inputs(batch))[:, :-1][mask])
    live = term_sums(student_logits, teacher.logits(model_inputs(batch), mask), targets, terms)
    signal = cache.signal(batch["sample_ids"], batch["labels"])
    cached = sparse_term_sums(student_logits, signal, targets, terms)
    assert cached["ce"].item() == pytest.approx(live["ce"].item())
    if k == 448:  # every id: the dense objective, up to the 2^-13-nat quantisation
        assert cached["reverse_kl"].item() == pytest.approx(live["reverse_kl"].item(), rel=2e-3)
    else:  # a lower bound (tail bucket); how tight depends on how much mass the student puts in the tail
        assert 0 < cached["reverse_kl"].item() <= live["reverse_kl"].item() * (1 + 1e-3)
    cached["reverse_kl"].backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    figures = sparse_validation_figures(student_logits.detach(), signal, targets)
    assert figures["tokens"].item() == mask.sum().item()
