"""The objective: a weighted sum of named terms over the counted tokens.

Each term returns a SUM over counted tokens; the trainer divides the weighted sum once
by the global number of counted tokens in the optimizer step (all micro-batches, all
processes). Dividing per micro-batch, or twice, is a known peer bug (PEERS.md #8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlm.losses.divergences import per_position_divergence


@dataclass(frozen=True)
class Term:
    """A resolved objective term: every default filled in."""

    label: str  # unique name used in logs (`forward_kl`, or `forward_kl_1` for a second one)
    name: str  # ce or a divergence kind
    weight: float
    temperature: float
    beta: float
    skew: float

    @property
    def needs_teacher(self) -> bool:
        return self.name != "ce"


def resolve_terms(loss_cfg) -> list[Term]:
    """Fill each term's temperature/beta/skew from the loss section's defaults; give duplicates unique labels."""
    terms, seen = [], {}
    for t in loss_cfg.terms:
        count = seen.get(t.name, 0)
        seen[t.name] = count + 1
        terms.append(Term(
            label=t.name if count == 0 else f"{t.name}_{count}",
            name=t.name,
            weight=t.weight,
            temperature=t.temperature if t.temperature is not None else loss_cfg.temperature,
            beta=t.beta if t.beta is not None else loss_cfg.beta,
            skew=t.skew if t.skew is not None else loss_cfg.skew,
        ))
    return terms


@dataclass(frozen=True)
class LMHead:
    """What turns a model's last hidden state into logits, including the quirks fused paths forget.

    logits = softcap * tanh((h @ W.T + b) * scale / softcap), cut to the first `vocab` columns
    (the real vocabulary shared with the other model; padding rows are never compared).
    """

    weight: Tensor  # [V_rows, H]
    bias: Optional[Tensor]
    vocab: int
    scale: float = 1.0  # Cohere's logit_scale
    softcap: Optional[float] = None  # Gemma-2's final_logit_softcapping

    def logits(self, hidden: Tensor) -> Tensor:
        """[N, H] any dtype -> [N, vocab] fp32. Upcast BEFORE the matmul: bf16 logits give
        several-percent gradient errors (PEERS.md #4), and autocast is switched off here."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            weight = self.weight[: self.vocab].float()
            bias = self.bias[: self.vocab].float() if self.bias is not None else None
            out = F.linear(hidden.float(), weight, bias)  # [N, vocab] fp32
            if self.scale != 1.0:
                out = out * self.scale
            if self.softcap:
                out = self.softcap * torch.tanh(out / self.softcap)
        return out


def lm_head_of(model, vocab: int) -> LMHead:
    """The LMHead of an HF causal LM, with its logit scale and soft-capping read from the config."""
    head = model.get_output_embeddings()
    config = model.config
    text_config = getattr(config, "text_config", None) or config
    return LMHead(
        weight=head.weight,
        bias=getattr(head, "bias", None),
        vocab=vocab,
        scale=float(getattr(text_config, "logit_scale", None) or 1.0),
        softcap=getattr(text_config, "final_logit_softcapping", None),
    )


def term_sums(
    student_logits: Tensor,
    teacher_logits: Optional[Tensor],
    targets: Tensor,
    terms: list[Term],
) -> dict[str, Tensor]:
    """Per-term sums over counted tokens (no normalisation, no weights).

    student_logits: [N, V] fp32, one row per counted position; teacher_logits: [N, V] fp32 or None
    when no term needs the teacher; targets: [N] token ids for the ce term.
    A divergence term is T^2 * sum_n D(p_teacher_n, p_student_n) at its temperature T (Hinton's T^2
    keeps gradient magnitudes comparable across temperatures).
    """
    sums = {}
    for term in terms:
        if term.name == "ce":
            sums[term.label] = F.cross_entropy(student_logits, targets, reduction="sum")
        else:
            per_pos = per_position_divergence(
                student_logits, teacher_logits, term.name,
                temperature=term.temperature, beta=term.beta, skew=term.skew,
            )  # [N]
            sums[term.label] = per_pos.sum() * term.temperature**2
    return sums


def weighted_total(sums: dict[str, Tensor], terms: list[Term]) -> Tensor:
    """sum_k weight_k * sums[k] (still a sum over tokens; divide by the global count once)."""
    return sum(term.weight * sums[term.label] for term in terms)
