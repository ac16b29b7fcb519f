"""One distillation forward: where the teacher runs and where the objective meets the student.

Teacher: frozen, no grad, returns its last hidden state at the counted positions only.
Student: wrapped together with the objective in one nn.Module (`DistillationModule`) so
that DDP, FSDP and DeepSpeed see the whole computation, including the LM head whose
weights a sharded run only materialises inside forward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from kdlm.data.encode import IGNORE
from kdlm.losses.objective import LMHead, Term, lm_head_of, term_sums


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


class Teacher:
    """A frozen teacher: eval mode, no gradients, never saved, never wrapped by DDP."""

    def __init__(self, model: nn.Module, vocab: int):
        self.model = model
        self.head = lm_head_of(model, vocab)

    @torch.no_grad()
    def logits(self, inputs: dict[str, Tensor], mask: Tensor) -> Tensor:
        """Teacher logits at the counted positions (`mask` [B, L-1]): [N, V] fp32."""
        hidden = last_hidden(self.model, inputs)[:, :-1][mask]  # [N, H_teacher]
        return self.head.logits(hidden)


class DistillationModule(nn.Module):
    """The student and the objective in one forward. Returns per-term sums over counted tokens."""

    def __init__(self, student: nn.Module, terms: list[Term], vocab: int):
        super().__init__()
        self.student = student
        self.terms = terms
        self.vocab = vocab

    @property
    def head(self) -> LMHead:
        return lm_head_of(self.student, self.vocab)

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        teacher_logits: Optional[Tensor] = None,
    ) -> dict[str, Tensor]:
        mask, targets = counted_positions(labels)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        hidden = last_hidden(self.student, inputs)[:, :-1][mask]  # [N, H] (autocast dtype)
        student_logits = self.head.logits(hidden)  # [N, V] fp32
        return term_sums(student_logits, teacher_logits, targets, self.terms)
