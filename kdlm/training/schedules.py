"""Adaptive schedules: small state machines the trainer feeds with already-reduced numbers.

    TaidSchedule   TAID's interpolation t (Shing et al. 2025), from the momentum of the loss's relative change
    FreshSchedule  DistiLLM's probability of fresh student samples (Ko et al. 2024), raised when validation CE worsens
    DomainWeights  DDK's domain sampling weights (Liu et al. 2024), from the student/teacher CE ratio per domain
    ReplayBuffer   a FIFO of earlier samples (DistiLLM's off-policy replay)

No torch.distributed inside: every process feeds the same reduced numbers and so holds the same state.
`state_dict()` of the first three is a plain JSON-able dict (Python floats, lists, None) for the trainer's
JSON state; ReplayBuffer's holds the items themselves and is torch.save'd (items must be picklable).
`load_state_dict(state_dict())` continues exactly as the original would have.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Iterable, Optional, Sequence

import torch


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class TaidSchedule:
    """TAID's interpolation coefficient t (Shing et al. 2025, "TAID: Temporally Adaptive Interpolated
    Distillation for Efficient Knowledge Transfer in Language Models", ICLR 2025, Algorithm 1).

    t is the teacher's weight in the target of the `taid` divergence. Starting at t = t_start, each
    `update(loss, step)` after an optimizer step does

        delta    = (prev_loss - loss) / (prev_loss + eps)                  # relative improvement
        m        = momentum * m + (1 - momentum) * delta
        t_linear = t_start + (t_end - t_start) * step / total_steps
        t        = min(t_end, max(t_linear, t + alpha * sigmoid(m) * (1 - t)))
        prev_loss = loss

    so t never falls behind the linear ramp and moves faster while the loss improves quickly.
    The first call has no previous loss: it records it (m stays 0) and applies only the linear floor,
    so t never falls behind the ramp, not even for one step. A non-finite loss is ignored (nothing changes), so one bad step
    cannot poison the momentum. `loss` is the taid terms' loss of the step (mean per counted token).
    """

    def __init__(self, *, total_steps: int, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4,
                 momentum: float = 0.99, eps: float = 1e-9):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= t_start <= t_end <= 1:
            raise ValueError(f"need 0 <= t_start <= t_end <= 1, got t_start={t_start}, t_end={t_end}")
        if alpha < 0 or not 0 <= momentum < 1:
            raise ValueError(f"need alpha >= 0 and 0 <= momentum < 1, got alpha={alpha}, momentum={momentum}")
        self.total_steps, self.t_start, self.t_end = int(total_steps), float(t_start), float(t_end)
        self.alpha, self.momentum, self.eps = float(alpha), float(momentum), float(eps)
        self.t: float = float(t_start)
        self.m: float = 0.0
        self.prev_loss: Optional[float] = None

    def update(self, loss: float, step: int) -> float:
        """Observe the loss of optimizer step `step`; returns the new t (used from the next step on)."""
        loss = float(loss)
        if not math.isfinite(loss):
            return self.t
        t_linear = self.t_start + (self.t_end - self.t_start) * step / self.total_steps
        if self.prev_loss is None:  # no relative change yet: only the linear floor moves t
            self.prev_loss = loss
            self.t = min(self.t_end, max(t_linear, self.t))
            return self.t
        delta = (self.prev_loss - loss) / (self.prev_loss + self.eps)
        self.m = self.momentum * self.m + (1 - self.momentum) * delta
        self.t = min(self.t_end, max(t_linear, self.t + self.alpha * _sigmoid(self.m) * (1 - self.t)))
        self.prev_loss = loss
        return self.t

    def state_dict(self) -> dict:
        return {"t": self.t, "m": self.m, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.m = float(state["t"]), float(state["m"])
        self.prev_loss = None if state.get("prev_loss") is None else float(state["prev_loss"])


class FreshSchedule:
    """DistiLLM's adaptive off-policy schedule (Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation
    for Large Language Models"): the probability p that a step uses FRESH student generations (else
    replayed ones).

    p starts at `start` (0). `observe(val_ce)` after each validation: if there is a previous value and
    val_ce - previous > tolerance (the student got worse on validation), p <- min(1, p + step); the
    previous value becomes val_ce either way. Defaults: step 0.1, tolerance 0.1 (nats).
    """

    def __init__(self, *, start: float = 0.0, step: float = 0.1, tolerance: float = 0.1):
        if not 0 <= start <= 1 or not 0 <= step <= 1 or tolerance < 0:
            raise ValueError(f"need start, step in [0, 1] and tolerance >= 0, got {start}, {step}, {tolerance}")
        self.step, self.tolerance = float(step), float(tolerance)
        self.p: float = float(start)
        self.previous: Optional[float] = None

    def observe(self, val_ce: float) -> float:
        """Observe a validation CE; returns the (possibly raised) probability of fresh samples."""
        val_ce = float(val_ce)
        if self.previous is not None and val_ce - self.previous > self.tolerance:
            self.p = min(1.0, self.p + self.step)
        self.previous = val_ce
        return self.p

    def state_dict(self) -> dict:
        return {"p": self.p, "previous": self.previous}

    def load_state_dict(self, state: dict) -> None:
        self.p = float(state["p"])
        self.previous = None if state.get("previous") is None else float(state["previous"])


class DomainWeights:
    """DDK's domain sampling weights (Liu et al. 2024, "DDK: Distilling Domain Knowledge for Efficient
    LLMs"): sample more from the domains where the student trails the teacher most.

    D domains, weights w (a distribution, uniform at the start). `update(student_ce, teacher_ce)`:

        ratio_d = student_ce_d / teacher_ce_d                     # the domain discrepancy (teacher_ce floored at 1e-9)
        new     = softmax(ratio)                                  # over the D domains
        w       = (1 - u) * (gamma * w_prev + (1 - gamma) * new) + u / D

    gamma = `smoothing` (share of the previous weights kept: DDK's factor smooth updating), u = `uniform`
    (share of the uniform distribution, so no domain is starved). Defaults gamma = 0.5, u = 0.1: our
    choice (the same as the config's ddk_smoothing / ddk_uniform), not values checked against the paper.
    The weights stay a distribution: both mixtures are convex.
    """

    def __init__(self, domains: Sequence[str], *, smoothing: float = 0.5, uniform: float = 0.1):
        domains = [str(d) for d in domains]
        if not domains or len(set(domains)) != len(domains):
            raise ValueError(f"domains must be non-empty and unique, got {domains}")
        if not 0 <= smoothing < 1 or not 0 <= uniform <= 1:
            raise ValueError(f"need 0 <= smoothing < 1 and 0 <= uniform <= 1, got {smoothing}, {uniform}")
        self.domains = domains
        self.smoothing, self.uniform = float(smoothing), float(uniform)
        self.weights: list[float] = [1.0 / len(domains)] * len(domains)

    def update(self, student_ce: dict[str, float], teacher_ce: dict[str, float]) -> list[float]:
        """New weights (in `domains` order) from each domain's student and teacher validation CE."""
        missing = [d for d in self.domains if d not in student_ce or d not in teacher_ce]
        if missing:
            raise ValueError(f"no student/teacher CE for domain(s) {', '.join(missing)}")
        ratio = [float(student_ce[d]) / max(float(teacher_ce[d]), 1e-9) for d in self.domains]
        top = max(ratio)
        exp = [math.exp(r - top) for r in ratio]
        new = [e / sum(exp) for e in exp]  # softmax(ratio)
        g, u, n = self.smoothing, self.uniform, len(self.domains)
        self.weights = [(1 - u) * (g * w + (1 - g) * x) + u / n for w, x in zip(self.weights, new)]
        return list(self.weights)

    def state_dict(self) -> dict:
        return {"domains": list(self.domains), "weights": list(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["domains"]) != self.domains:
            raise ValueError(f"saved domains {state['domains']} differ from this run's {self.domains}")
        self.weights = [float(w) for w in state["weights"]]


class ReplayBuffer:
    """A FIFO of opaque items (sampled examples), at most `capacity`; the oldest are dropped first.

    `sample(n, generator)`: n <= len: n DISTINCT items, uniformly without replacement (like DistiLLM's
    random.sample); n > len: n items uniformly WITH replacement (a small buffer still fills a batch).
    Deterministic given the generator's state. Items are returned as stored (not copied).
    """

    def __init__(self, capacity: int = 1000):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._items: deque = deque(maxlen=self.capacity)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, items: Iterable[Any]) -> None:
        """Append items in order; beyond capacity the oldest are evicted."""
        self._items.extend(items)

    def sample(self, n: int, generator: torch.Generator) -> list:
        if n <= 0:
            return []
        size = len(self._items)
        if size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        if n <= size:
            picks = torch.randperm(size, generator=generator)[:n]
        else:
            picks = torch.randint(size, (n,), generator=generator)
        items = list(self._items)  # (deque indexing is O(n) away from the ends)
        return [items[i] for i in picks.tolist()]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "items": list(self._items)}

    def load_state_dict(self, state: dict) -> None:
        self._items = deque(state["items"], maxlen=self.capacity)
