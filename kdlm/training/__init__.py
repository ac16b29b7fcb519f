"""Training: the distillation loop, checkpoints, validation, metrics and export."""

from kdlm.training.trainer import RunResult, distill

__all__ = ["RunResult", "distill"]
