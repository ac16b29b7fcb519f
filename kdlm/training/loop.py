"""The training loop: one loop for every method. It knows a batch source, a teacher, an objective module and
schedules, never which method they make up.

Per optimizer step:
    schedules set the objective's moving parameters (TAID's t)
    the batch source gives grad_accum micro-batches (dataset rows, or completions sampled once for all of them)
    count their scored tokens across all processes (one reduce)
    for each micro-batch: teacher forward (no grad) -> student forward + objective -> backward
    clip, optimizer step, LR schedule; schedules observe the step; log; validate / checkpoint every N steps
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from kdlm.losses.fused import TOTAL_KEY
from kdlm.training.checkpoint import save_checkpoint
from kdlm.training.metrics import MetricsLog
from kdlm.training.sources import STEP_KINDS
from kdlm.training.step import counted_positions, loss_inputs, model_inputs, teacher_autocast, teacher_signal


# Per-step figures of a sampled source that add up over a logging window and over processes.
SUMMED = tuple(f"source/{kind}_steps" for kind in STEP_KINDS) + ("gen/seconds", "gen/new_tokens", "gen/completions",
                                                                  "gen/truncated")


@dataclass
class Loop:
    """Everything the loop touches, assembled by kdlm.training.trainer's stages."""

    accelerator: Any
    module: Any  # DistillationModule, possibly wrapped by DDP / FSDP / DeepSpeed
    teacher: Any  # Teacher, CachedTeacher or None
    optimizer: Any
    scheduler: Any
    source: Any  # kdlm.training.sources.StaticSource / SampledSource
    schedules: list  # kdlm.training.trainer schedule hooks (TAID, DDK)
    validate: Callable[[], dict]
    metrics: MetricsLog
    cfg: Any  # the recipe's train section
    ckpt_root: Path
    has_validation: bool
    history: list[dict] = field(default_factory=list)


def run_loop(loop: Loop, state: dict, *, on_step: Optional[Callable[[int], None]] = None, show_progress: bool = True) -> None:
    """Train from state["step"] to cfg.max_steps; `state` is updated in place and checkpointed."""
    acc, cfg = loop.accelerator, loop.cfg
    unwrapped = acc.unwrap_model(loop.module)
    bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=not (acc.is_main_process and show_progress),
               desc="distill", unit="step", dynamic_ncols=True)
    loop.module.train()
    window = _Window(len(unwrapped.terms), acc.device)
    started = time.perf_counter()
    while state["step"] < cfg.max_steps:
        if cfg.max_tokens is not None and state.get("budget_tokens", 0) >= cfg.max_tokens:
            break  # resumed from the checkpoint of a run whose token budget was already spent
        for hook in loop.schedules:
            unwrapped.terms = hook.terms(unwrapped.terms)
        terms = unwrapped.terms
        rows = loop.source.next_step(state["step"])
        term_totals, global_count, _ = accumulate_gradients(loop.module, loop.teacher, rows.micro, terms, acc)
        grad_norm = acc.clip_grad_norm_(loop.module.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        loop.optimizer.step()
        loop.scheduler.step()
        loop.optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        extra = dict(rows.metrics)
        for hook in loop.schedules:
            extra.update(hook.after_step(state["step"], term_totals, global_count, terms))
        window.add(torch.stack([term_totals[t.label] for t in terms]).double(), global_count, extra)

        # a wall-clock budget ends the run like max_steps does; the clock is the main process's, broadcast
        out_of_budget = cfg.max_seconds is not None and _budget_spent(acc, started, cfg.max_seconds)
        if cfg.max_tokens is not None:  # global_count is already summed over processes: every rank agrees
            state["budget_tokens"] = state.get("budget_tokens", 0) + int(global_count.item())
            out_of_budget = out_of_budget or state["budget_tokens"] >= cfg.max_tokens
        last = state["step"] == cfg.max_steps or out_of_budget
        if state["step"] % cfg.log_every == 0 or last:
            record = window.record(acc, terms, lr=loop.scheduler.get_last_lr()[0])
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            state["tokens"] += record["counted_tokens"]
            loop.metrics.log(record, step=state["step"])
            loop.history.append({"step": state["step"], **record})
            bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in record.items() if k.startswith("loss/")}
                            | {"tok/s": f"{record['tokens_per_s']:.0f}"})
        bar.update(1)
        if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < cfg.max_steps and loop.has_validation:
            figures = loop.validate()
            record = {f"val/{k}": v for k, v in figures.items()}
            record.update(loop.source.observe_validation(figures))
            loop.metrics.log(record, step=state["step"])
        if (cfg.save_every and state["step"] % cfg.save_every == 0) or last:
            state["source"] = loop.source.state_dict()
            state["schedules"] = {hook.name: hook.state_dict() for hook in loop.schedules}
            save_checkpoint(acc, loop.ckpt_root, state["step"], state, cfg.keep_checkpoints,
                            rank_state=loop.source.rank_state())
        if on_step is not None:
            on_step(state["step"])
        if out_of_budget:
            break
    bar.close()


def _budget_spent(accelerator, started: float, budget: float) -> bool:
    """Whether the loop has run `budget` seconds, decided on the main process so that every rank stops together."""
    flag = torch.tensor([float(time.perf_counter() - started >= budget)], device=accelerator.device)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        flag = broadcast(flag, from_process=0)
    return bool(flag.item())


def accumulate_gradients(module, teacher, micro: list[dict], terms, accelerator):
    """Forward and backward over one optimizer step's micro-batches; gradients are left in the parameters.

    The loss of every micro-batch is divided by the GLOBAL count of scored tokens in the step (all
    micro-batches, all processes), so accumulation and data parallelism give the gradient of
    sum(weighted term sums) / global count, exactly as one big batch would. With a sampled source the
    counts are those of the sampled completions. Returns (per-term sums on this process, global count,
    local count), the counts as tensors (no host sync).
    """
    local = torch.stack([counted_positions(mb["labels"])[0].sum() for mb in micro]).sum()
    global_count = accelerator.reduce(local.clone(), reduction="sum").clamp(min=1)  # one collective per step
    term_totals: dict[str, torch.Tensor] = {}
    for i, mb in enumerate(micro):
        # skip DDP's gradient all-reduce until the last micro-batch
        sync = contextlib.nullcontext() if i == len(micro) - 1 else accelerator.no_sync(module)
        with sync:
            with teacher_autocast(accelerator):
                signal = teacher_signal(teacher, mb) if teacher is not None else None
            with accelerator.autocast():
                sums = module(labels=mb["labels"], teacher=signal, **model_inputs(mb), **loss_inputs(mb))
            # DDP averages gradients over processes, so scale by world size: the result is sum / global count
            loss = sums[TOTAL_KEY] * accelerator.num_processes / global_count
            accelerator.backward(loss)
        for term in terms:
            term_totals[term.label] = term_totals.get(term.label, 0) + sums[term.label]
    return term_totals, global_count, local


class _Window:
    """Metrics averaged over the logging window; kept as tensors so a step never waits on the host."""

    def __init__(self, n_terms: int, device):
        self.sums = torch.zeros(n_terms, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.extra: dict[str, float] = {}
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, term_sums: torch.Tensor, count: torch.Tensor, extra: dict[str, float]) -> None:
        self.sums += term_sums
        self.count += count
        self.steps += 1
        for key, value in extra.items():
            if key in SUMMED:
                self.extra[key] = self.extra.get(key, 0.0) + value  # summed over the window (and processes)
            else:
                self.extra[key] = value  # a level (TAID's t, DDK's weights, DistiLLM's p): the latest

    def record(self, accelerator, terms, *, lr: float) -> dict:
        sums = accelerator.reduce(self.sums, reduction="sum").tolist()  # this process's sums -> all processes'
        count = max(self.count.item(), 1.0)
        elapsed = time.perf_counter() - self.start
        record = {f"loss/{t.label}": sums[k] / count for k, t in enumerate(terms)}
        record["loss/total"] = sum(t.weight * record[f"loss/{t.label}"] for t in terms)
        record.update({"lr": lr, "tokens_per_s": count / max(elapsed, 1e-9), "counted_tokens": int(count),
                       "time/step_s": elapsed / max(self.steps, 1)})
        extra = dict(self.extra)
        if any(key in SUMMED for key in extra):  # a sampled source: every process has every SUMMED key
            totals = torch.tensor([extra.get(key, 0.0) for key in SUMMED], dtype=torch.float64, device=self.sums.device)
            totals = accelerator.reduce(totals, reduction="sum").tolist()
            extra.update({key: value / (accelerator.num_processes if key == "gen/seconds" else 1)
                          for key, value in zip(SUMMED, totals)})
        record.update(_generation_figures(extra, elapsed, self.steps * accelerator.num_processes))
        self.sums.zero_()
        self.count.zero_()
        self.extra, self.steps, self.start = {}, 0, time.perf_counter()
        return record


def _generation_figures(extra: dict[str, float], elapsed: float, steps: int) -> dict[str, float]:
    """The window's sampling figures over all processes: the share of (process-)steps of each kind (1.0 or 0.0
    per step when the ranks agree, as they must), tokens and lengths summed, generation time per process
    against the training time."""
    out = {k: v for k, v in extra.items() if k not in SUMMED}
    for kind in STEP_KINDS:
        if extra.get(f"source/{kind}_steps"):
            out[f"source/{kind}_fraction"] = extra[f"source/{kind}_steps"] / max(steps, 1)
    if extra.get("gen/completions"):
        seconds, tokens, n = extra["gen/seconds"], extra["gen/new_tokens"], extra["gen/completions"]
        out.update({"gen/seconds": seconds, "gen/new_tokens": tokens, "gen/tokens_per_s": tokens / max(seconds, 1e-9),
                    "gen/mean_length": tokens / n, "gen/truncated_fraction": extra["gen/truncated"] / n,
                    "gen/share_of_step": seconds / max(elapsed, 1e-9)})
    return out
