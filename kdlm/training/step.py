"""One distillation forward: where the teacher runs and where the objective meets the student.

Teacher: frozen, no grad, returns its last hidden state at the counted positions only.
Student: wrapped together with the objective in one nn.Module (`DistillationModule`) so
that DDP, FSDP and DeepSpeed see the whole computation, including the LM head whose
weights a sharded run only materialises inside forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from kdlm.data.encode import IGNORE
from kdlm.losses.fused import DEFAULT_CHUNK_BYTES, TOTAL_KEY, fused_sums
from kdlm.losses.sparse import SparseTeacher, sparse_term_sums
from kdlm.losses.objective import LMHead, Term, lm_head_of, term_sums, weighted_total


def counted_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Which output positions are scored, and their targets.

    Output position i predicts token i+1, so the mask is over [B, L-1]: `labels[:, 1:] != -100`.
    Returns (mask [B, L-1] bool, targets [N] long).
    """
    shifted = labels[:, 1:]
    mask = shifted != IGNORE
    return mask, shifted[mask]


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict) -> dict[str, Tensor]:
    """What the model's forward takes from a batch: ids, and an attention mask (padded) or position ids (packed)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def last_hidden(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """The decoder's final hidden states [B, L, H], without computing the [B, L, V] logits."""
    out = model.base_model(**inputs, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@dataclass
class TeacherRows:
    """The teacher's signal for a batch, at the counted positions: its last hidden states and LM head.
    Logits are computed from them inside the loss, chunk by chunk on the fused path."""

    hidden: Tensor  # [N, H_teacher], no grad
    head: LMHead


class Teacher:
    """A frozen teacher: eval mode, no gradients, never saved, never wrapped by DDP."""

    def __init__(self, model: nn.Module, vocab: int):
        self.model = model
        self.head = lm_head_of(model, vocab)

    @torch.no_grad()
    def rows(self, inputs: dict[str, Tensor], mask: Tensor) -> TeacherRows:
        """The teacher's hidden states at the counted positions (`mask` [B, L-1])."""
        return TeacherRows(last_hidden(self.model, inputs)[:, :-1][mask], self.head)  # [N, H_teacher]

    @torch.no_grad()
    def logits(self, inputs: dict[str, Tensor], mask: Tensor) -> Tensor:
        """Teacher logits at the counted positions: [N, V] fp32 (the unfused path)."""
        rows = self.rows(inputs, mask)
        return rows.head.logits(rows.hidden)


def teacher_signal(teacher, batch: dict) -> Union[TeacherRows, SparseTeacher]:
    """The teacher's signal for `batch` at its counted positions: a live teacher's hidden states,
    or an offline cache's top-k log-probs looked up by sample id."""
    mask, _ = counted_positions(batch["labels"])
    if isinstance(teacher, Teacher):
        return teacher.rows(model_inputs(batch), mask)
    return teacher.signal(batch["sample_ids"], batch["labels"], device=batch["labels"].device)


def teacher_autocast(accelerator):
    """Autocast for the teacher's forward, without autocast's weight-cast cache: every teacher weight is
    used once per forward, so caching its low-precision copy only holds a second copy of the teacher
    (about half its fp32 size) in memory until the step ends."""
    from accelerate.utils import AutocastKwargs

    return accelerator.autocast(autocast_handler=AutocastKwargs(cache_enabled=False))


class DistillationModule(nn.Module):
    """The student and the objective in one forward.

    Returns the per-term sums over counted tokens (detached, for logging) and, under TOTAL_KEY,
    the weighted total that carries the gradient. With `fused`, the LM head and the losses run
    chunk by chunk (kdlm.losses.fused) and no [N, V] logits exist at once.
    """

    def __init__(self, student: nn.Module, terms: list[Term], vocab: int, *, fused: bool = True,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__()
        self.student = student
        self.terms = terms
        self.vocab = vocab
        self.fused = fused
        self.chunk_bytes = chunk_bytes

    @property
    def head(self) -> LMHead:
        return lm_head_of(self.student, self.vocab)

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        teacher: Optional[Union[TeacherRows, SparseTeacher]] = None,
    ) -> dict[str, Tensor]:
        mask, targets = counted_positions(labels)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        hidden = last_hidden(self.student, inputs)[:, :-1][mask]  # [N, H] (autocast dtype)
        sparse = isinstance(teacher, SparseTeacher)  # an offline cache: top-k log-probs instead of hidden states
        if self.fused:
            teacher_hidden = teacher if sparse else (teacher.hidden if teacher else None)
            teacher_head = None if sparse or teacher is None else teacher.head
            return fused_sums(hidden, self.head, teacher_hidden, teacher_head, targets, self.terms,
                              chunk_bytes=self.chunk_bytes)
        student_logits = self.head.logits(hidden)  # [N, V] fp32
        if sparse:
            sums = sparse_term_sums(student_logits, teacher, targets, self.terms)
        else:
            teacher_logits = teacher.head.logits(teacher.hidden) if teacher is not None else None
            sums = term_sums(student_logits, teacher_logits, targets, self.terms)
        return {**{k: v.detach() for k, v in sums.items()}, TOTAL_KEY: weighted_total(sums, self.terms)}
