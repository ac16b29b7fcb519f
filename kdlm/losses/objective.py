"""The objective: a weighted sum of named terms over the counted tokens.

Each term returns a SUM over counted tokens; the trainer divides the weighted sum once
by the global number of counted tokens in the optimizer step (all micro-batches, all
processes). Dividing per micro-batch, or twice, is a known peer bug (PEERS.md #8).

Token coefficients. A term may weigh its per-token values: sum_n c_kn * l_kn, with one
coefficient per term k and counted token n (`token_coefficients`, a [K, N] tensor; None means
every c_kn = 1 and the plain sum is taken). They carry, in one mechanism:
- per-example loss weights w (data.weight_field): c_kn = w_n for every term;
- negative rows (data.negative_field): c_kn = 0 for every term but redi;
- REDI (Xu et al. 2025, "Harnessing negative signals: reinforcement distillation from teacher
  data"): l_n = -log p_student(y_n) and c_n = w_n / |y| on a positive row, -alpha * w_n / |y| on a
  negative one, |y| = that example's counted tokens. Per pair this is REDI's
  L = -(1/|y+|) log p(y+|x) + alpha (1/|y-|) log p(y-|x).
- pg (MiniLLM, Gu et al. 2024): l_n = -log q(y_n) on sampled tokens, c_n = A_n * w_n from
  `kdlm.losses.policy.pg_coefficients` (future reward times importance weight, detached), so that the
  gradient is -sum_n A_n w_n grad log q(y_n).
The denominator stays the plain count N of counted tokens, so loss = sum_k weight_k sum_n c_kn l_kn / N;
for redi this rescales REDI's per-pair mean by (pairs / tokens) of the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlm.losses.divergences import per_position_divergence


# Terms computed from the student's cross-entropy on the data's tokens alone: no teacher needed.
# pg: MiniLLM's long-term policy-gradient part, -log q(y_t) with coefficient A_t * w_t (kdlm.losses.policy).
STUDENT_TERMS = ("ce", "redi", "pg")
# Terms on a live teacher's internals (kdlm.losses.features, kdlm.losses.attention), outside the LM-head losses.
FEATURE_TERMS = ("hint", "attention_relation", "attention_score")
# Terms over byte-aligned chunks of two tokenisations of the same text (kdlm.losses.cross_tokenizer).
CROSS_TOKENIZER_TERMS = ("alm", "uld")


@dataclass(frozen=True)
class Term:
    """A resolved objective term: every default filled in."""

    label: str  # unique name used in logs (`forward_kl`, or `forward_kl_1` for a second one)
    name: str  # ce, redi or a divergence kind
    weight: float
    temperature: float
    beta: float
    skew: float
    alpha: float = 0.8  # redi: weight of the negative rows
    rows: str = "all"  # which rows of a step it counts: all, samples (drawn during training) or data
    # feature terms: the layer map as given (layer_spec) and resolved against both models (layers: pairs of refs)
    layer_spec: object = None
    layers: tuple = ()
    metric: str = "mse"  # hint: mse, normalised_mse or cosine
    projection: str = "identity"  # hint: init of the learned projections
    relations: tuple = ("qq", "kk", "vv")  # attention_relation
    relation_heads: Optional[int] = None  # attention_relation (resolved against both models' widths)
    chunk_rows: int = 128  # attention terms: query rows per chunk
    teacher: Optional[str] = None  # multi-teacher: the teacher this term compares with (kdlm.losses.multi_teacher)
    tau: float = 100.0  # alm: temperature of the binarised chunk likelihoods
    divergence: str = "kl"  # alm: the binarised f-divergence

    @property
    def needs_teacher(self) -> bool:
        return self.name not in STUDENT_TERMS

    @property
    def is_cross_tokenizer(self) -> bool:
        """Compared over byte-aligned chunks of two tokenisations (kdlm.losses.cross_tokenizer)."""
        return self.name in CROSS_TOKENIZER_TERMS

    @property
    def is_feature(self) -> bool:
        """Computed from captured internals, not from the LM head's logits."""
        return self.name in FEATURE_TERMS


def resolve_terms(loss_cfg) -> list[Term]:
    """Fill each term's temperature/beta/skew/alpha from the loss section's defaults; give duplicates unique labels."""
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
            alpha=t.alpha if t.alpha is not None else loss_cfg.redi_alpha,
            rows=getattr(t, "rows", "all"),
            layer_spec=_frozen(getattr(t, "layers", None)),
            metric=getattr(t, "metric", "mse"),
            projection=getattr(t, "projection", "identity"),
            relations=tuple(getattr(t, "relations", ("qq", "kk", "vv"))),
            relation_heads=getattr(t, "relation_heads", None),
            chunk_rows=getattr(loss_cfg, "feature_chunk_rows", 128),
            tau=getattr(t, "tau", 100.0),
            divergence=getattr(t, "divergence", "kl"),
        ))
    return terms


def _frozen(spec):
    """A layer map as given, hashable (lists of pairs -> tuples)."""
    if isinstance(spec, list):
        return tuple(tuple(p) if isinstance(p, list) else p for p in spec)
    return spec


def token_coefficients(
    terms: list[Term],
    *,
    weights: Optional[Tensor] = None,
    negative: Optional[Tensor] = None,
    example: Optional[Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> Optional[Tensor]:
    """Per-term coefficients c [K, N] of the N counted tokens (see the module docstring), or None when every
    coefficient is 1 (no weights, no negatives, no redi term): the terms then take plain sums.

    weights: [N] fp32 per-token example weight w_n (None: all 1); negative: [N] bool (None: none);
    example: [N] long, which example each token belongs to (needed by redi for |y|, ids need not be dense);
    dtype: of the result (the losses cast it to their compute dtype).
    Ordinary terms: c_n = w_n * [not negative_n]. redi: c_n = w_n * (-alpha if negative_n else 1) / |y(n)|.
    """
    redi = any(term.name == "redi" for term in terms)
    if weights is None and negative is None and not redi:
        return None
    if redi and example is None:
        raise ValueError("the redi term needs `example` (which example each counted token belongs to)")
    n = next(t.shape[0] for t in (weights, negative, example) if t is not None)
    device = next(t.device for t in (weights, negative, example) if t is not None)
    weight = weights.to(dtype) if weights is not None else torch.ones(n, dtype=dtype, device=device)  # [N]
    plain = weight * ~negative if negative is not None else weight  # [N]: negatives count in redi only
    rows = []
    for term in terms:
        if term.name != "redi":
            rows.append(plain)
            continue
        _, inverse, lengths = torch.unique(example, return_inverse=True, return_counts=True)
        per_token = weight / lengths[inverse].to(dtype)  # [N]: w / |y|
        rows.append(torch.where(negative, -term.alpha * per_token, per_token) if negative is not None else per_token)
    return torch.stack(rows)  # [K, N]


def check_coefficients(coefficients: Optional[Tensor], terms, rows: int) -> None:
    """redi and pg terms need coefficients (redi's 1/|y|, pg's A_t w_t), and they must be one row per term, one
    column per token. Without them a pg term would silently be plain cross-entropy on the samples."""
    if coefficients is None:
        for name in ("redi", "pg"):
            if any(term.name == name for term in terms):
                raise ValueError(f"the {name} term needs token coefficients (objective.token_coefficients / "
                                 f"kdlm.losses.policy.pg_coefficients)")
        return
    if tuple(coefficients.shape) != (len(terms), rows):
        raise ValueError(f"coefficients must be [{len(terms)} terms, {rows} tokens], got {tuple(coefficients.shape)}")


def coefficient_sum(per_position: Tensor, coefficient: Optional[Tensor]) -> Tensor:
    """sum_n c_n * values_n (0-dim); the plain sum when `coefficient` is None (bit-identical to before)."""
    if coefficient is None:
        return per_position.sum()
    return (per_position * coefficient.to(per_position.dtype)).sum()


def ce_sum(student_logits: Tensor, targets: Tensor, coefficient: Optional[Tensor] = None) -> Tensor:
    """sum_n c_n * -log p_student(target_n): the ce and redi terms' value (0-dim)."""
    if coefficient is None:
        return F.cross_entropy(student_logits, targets, reduction="sum")
    return coefficient_sum(F.cross_entropy(student_logits, targets, reduction="none"), coefficient)


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
    *,
    coefficients: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """Per-term sums over counted tokens (no normalisation, no term weights).

    student_logits: [N, V] fp32, one row per counted position; teacher_logits: [N, V] fp32 or None
    when no term needs the teacher; targets: [N] token ids for the ce and redi terms; coefficients:
    [K, N] per-term token coefficients c_kn (`token_coefficients`; None: all 1).
    ce and redi are sum_n c_n * -log p_student(target_n). A divergence term is
    T^2 * sum_n c_n * D(p_teacher_n, p_student_n) at its temperature T (Hinton's T^2 keeps gradient
    magnitudes comparable across temperatures).
    """
    check_coefficients(coefficients, terms, student_logits.shape[0])
    sums = {}
    for k, term in enumerate(terms):
        coefficient = coefficients[k] if coefficients is not None else None  # [N] or None
        if term.name in STUDENT_TERMS:
            sums[term.label] = ce_sum(student_logits, targets, coefficient)
        else:
            per_pos = per_position_divergence(
                student_logits, teacher_logits, term.name,
                temperature=term.temperature, beta=term.beta, skew=term.skew,
            )  # [N]
            sums[term.label] = coefficient_sum(per_pos, coefficient) * term.temperature**2
    return sums


def weighted_total(sums: dict[str, Tensor], terms: list[Term]) -> Tensor:
    """sum_k weight_k * sums[k] (still a sum over tokens; divide by the global count once)."""
    return sum(term.weight * sums[term.label] for term in terms)
