"""Distillation losses: divergences between student and teacher token distributions.

- `divergence` / `per_position_divergence`: on logits (kdlm.losses.divergences)
- `fused_divergence` / `fused_sums`: from hidden states and LM heads, chunk by chunk (kdlm.losses.fused)
- `sparse_term_sums` / `SparseTeacher`: against a cached top-k teacher (kdlm.losses.sparse)
- the objective's named, weighted terms (kdlm.losses.objective)
- `alm_sum` / `uld_sum`: cross-tokenizer objectives over byte-aligned chunks (kdlm.losses.cross_tokenizer)
"""

from .cross_tokenizer import (
    ALM_DIVERGENCES,
    alm_sum,
    chunk_logprobs,
    token_logprobs,
    uld_sum,
    uld_sum_from_hidden,
)
from .divergences import DIVERGENCE_KINDS, divergence, get_divergence, per_position_divergence, register_divergence
from .fused import TOTAL_KEY, fused_divergence, fused_sums
from .objective import LMHead, Term, resolve_terms, term_sums, weighted_total
from .sparse import SparseTeacher, sparse_term_sums

__all__ = [
    "DIVERGENCE_KINDS",
    "LMHead",
    "SparseTeacher",
    "TOTAL_KEY",
    "Term",
    "divergence",
    "fused_divergence",
    "fused_sums",
    "get_divergence",
    "per_position_divergence",
    "register_divergence",
    "resolve_terms",
    "sparse_term_sums",
    "term_sums",
    "weighted_total",
    "ALM_DIVERGENCES",
    "alm_sum",
    "chunk_logprobs",
    "token_logprobs",
    "uld_sum",
    "uld_sum_from_hidden",
]
