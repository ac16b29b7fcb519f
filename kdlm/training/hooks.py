"""Schedule hooks: adaptive parts that move the objective or the data between steps.

    TaidHook   TAID (Shing et al. 2025): the `taid` terms' interpolation t, updated every step from the
               momentum of the relative change of their loss
    DdkHook    DDK (Liu et al. 2024): every K steps, per-domain validation CE of student and teacher set the
               domain sampling weights of the DomainStream

A hook has a `name`, `terms(terms) -> terms` (before a step), `after_step(step, term_totals, global_count,
terms) -> figures`, and `state_dict()` / `load_state_dict()`, which the trainer state (JSON) keeps, so a
resumed run continues with the same t and weights. The numbers they see are reduced over all processes,
so every rank holds the same schedule.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from kdlm.training.schedules import DomainWeights, TaidSchedule


class TaidHook:
    name = "taid"

    def __init__(self, cfg, *, total_steps: int, accelerator):
        self.schedule = TaidSchedule(t_start=cfg.taid_t_start, t_end=cfg.taid_t_end, alpha=cfg.taid_alpha,
                                     momentum=cfg.taid_momentum, total_steps=total_steps)
        self.accelerator = accelerator

    def terms(self, terms: list) -> list:
        """The taid terms carry t as their `beta` (the teacher's weight in the interpolated target)."""
        t = float(self.schedule.t)
        return [replace(term, beta=t) if term.name == "taid" else term for term in terms]

    def after_step(self, step: int, term_totals: dict, global_count: torch.Tensor, terms: list) -> dict:
        total = sum(term_totals[t.label] for t in terms if t.name == "taid")
        loss = self.accelerator.reduce(total.detach().double().reshape(1), reduction="sum") / global_count.double()
        t_used = float(self.schedule.t)
        self.schedule.update(float(loss.item()), step)  # one host sync per step, only when TAID runs
        return {"taid/t": t_used}

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)


class DdkHook:
    name = "ddk"

    def __init__(self, cfg, weights: DomainWeights, *, per_domain_validation: Callable[[str], dict]):
        self.every = cfg.ddk_every
        self.weights = weights
        self.per_domain_validation = per_domain_validation  # domain -> {"ce", "teacher_ce", ...}

    def terms(self, terms: list) -> list:
        return terms

    def after_step(self, step: int, term_totals: dict, global_count: torch.Tensor, terms: list) -> dict:
        if step % self.every:
            return {}
        figures = {d: self.per_domain_validation(d) for d in self.weights.domains}
        weights = self.weights.update({d: f["ce"] for d, f in figures.items()},
                                      {d: f["teacher_ce"] for d, f in figures.items()})
        out = {f"ddk/weight/{d}": w for d, w in zip(self.weights.domains, weights)}
        out.update({f"ddk/ce_ratio/{d}": f["ce"] / max(f["teacher_ce"], 1e-9) for d, f in figures.items()})
        return out

    def state_dict(self) -> dict:
        return self.weights.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.weights.load_state_dict(state)
