"""Distillation losses: divergences between student and teacher token distributions."""

from .divergences import DIVERGENCE_KINDS, divergence, get_divergence, per_position_divergence, register_divergence

__all__ = [
    "DIVERGENCE_KINDS",
    "divergence",
    "get_divergence",
    "per_position_divergence",
    "register_divergence",
]
