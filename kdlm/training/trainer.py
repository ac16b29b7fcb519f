"""`kdlm distill`: the training loop, on accelerate (DDP / FSDP / DeepSpeed under `accelerate launch`).

The loop, per optimizer step:
    draw grad_accum micro-batches; count their scored tokens across all processes (one reduce)
    for each micro-batch: teacher forward (no grad; none when no term needs it) -> student forward + objective -> backward
    clip, optimizer step, LR schedule; log; validate / checkpoint every N steps
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kdlm.cache import CachedTeacher, cache_dir_for
from kdlm.config import Recipe, dump_yaml, to_dict
from kdlm.data import Collator, DataReport, prepare_data
from kdlm.data.packing import pack_examples
from kdlm.errors import ConfigError, ModelError, OutputError
from kdlm.losses.fused import TOTAL_KEY
from kdlm.losses.objective import resolve_terms
from kdlm.models.compat import shared_vocab_size
from kdlm.models.generate import cpu_has_fast_bf16
from kdlm.models.init_student import keep_layers, parameter_count
from kdlm.models.loading import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_source
from kdlm.training.checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint, save_checkpoint
from kdlm.training.export import model_card, save_student_folder
from kdlm.training.metrics import MetricsLog, peak_memory_mb
from kdlm.training.step import (DistillationModule, Teacher, counted_positions, loss_inputs, model_inputs, teacher_autocast,
                                teacher_signal)
from kdlm.training.validate import validate

log = logging.getLogger(__name__)

# Changing these between a run and its resume is fine; anything else must match the checkpointed recipe.
RESUMABLE_CHANGES = {"train.max_steps", "train.save_every", "train.eval_every", "train.log_every", "train.eval_batches",
                     "train.report_to", "train.wandb_project", "train.num_workers"}


@dataclass
class RunResult:
    """What `distill` returns: where the student is and the validation figures before and after."""

    output_dir: Path
    model_dir: Path
    steps: int
    before: dict
    after: dict
    data: DataReport
    history: list[dict] = field(default_factory=list)


def distill(recipe: Recipe, *, resume: bool = False, on_step: Optional[Callable[[int], None]] = None,
            show_progress: bool = True) -> RunResult:
    """Run a distillation described by `recipe`. `on_step(step)` is called after every optimizer step."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed

    from accelerate.state import AcceleratorState, GradientState

    out = Path(recipe.output.dir)
    cfg = recipe.train
    # accelerate keeps process-wide singletons; a second run in the same Python process (the API, tests,
    # notebooks) may want another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(cfg.mixed_precision),
        log_with=list(cfg.report_to) or None,
        project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    wipe = _check_output_dir(out, recipe, resume)  # read-only, every rank: never clobber a finished run
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    main = accelerator.is_main_process

    # 1. tokenizers first (cheap): refuse incompatible vocabularies before loading weights. An objective of
    # ce / redi terms only (SFT, sequence-level KD on teacher-written text) never touches the teacher.
    terms = resolve_terms(recipe.loss)
    needs_teacher = any(t.needs_teacher for t in terms)
    student_src = resolve_source(recipe.student.model, recipe.student.gguf_file, recipe.student.revision)
    tokenizer = load_tokenizer(student_src, trust_remote_code=recipe.student.trust_remote_code)
    teacher_src = teacher_tok = None
    if needs_teacher:
        teacher_src = resolve_source(recipe.teacher.model, recipe.teacher.gguf_file, recipe.teacher.revision)
        teacher_tok = load_tokenizer(teacher_src, trust_remote_code=recipe.teacher.trust_remote_code)
        if teacher_tok.get_vocab() != tokenizer.get_vocab():
            shared_vocab_size(teacher_tok, tokenizer, 0, 0)  # raises with the differing tokens named

    # 2. data
    train_set, val_set, report = prepare_data(recipe.data, tokenizer, seed=cfg.seed)
    if report.negative_examples and not any(t.name == "redi" for t in terms):
        raise ConfigError(f"data.negative_field marks {report.negative_examples} negative rows but no loss term "
                          f"uses them; add {{name: redi}} to loss.terms")
    if main:
        print(f"kdlm: data: {report.summary()}", flush=True)

    # 3. models (with an offline cache, or no term that needs it, the teacher is not loaded at all)
    student_device = resolve_device(recipe.student.device, accelerator.device)
    student = load_model(student_src, dtype=resolve_dtype(recipe.student.dtype, student_device, trainable=True),
                         device=student_device, trust_remote_code=recipe.student.trust_remote_code)
    student_init = f"`{recipe.student.model}` ({parameter_count(student) / 1e6:.1f}M parameters)"
    if recipe.student.keep_layers is not None:
        kept = keep_layers(student, recipe.student.keep_layers)
        student_init = f"layers {kept} of `{recipe.student.model}` ({parameter_count(student) / 1e6:.1f}M parameters)"
    student_rows = student.get_output_embeddings().weight.shape[0]
    teacher, vocab = _load_teacher(recipe, teacher_src, teacher_tok, tokenizer, student_rows=student_rows,
                                   examples=train_set + val_set, default_device=accelerator.device)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.config.use_cache = False

    # every input is checked: only now is the output folder touched (a failed start leaves it as it was)
    if main:
        for old in _run_entries(out, recipe) if wipe else []:  # replace the old run, keep the teacher cache
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "resolved_config.yaml", dump_yaml(recipe))
        atomic_write_text(out / "data_report.json", _json(report.__dict__))
    accelerator.wait_for_everyone()

    # 4. optimisation
    module = DistillationModule(student, terms, vocab, fused=recipe.loss.fused, chunk_bytes=recipe.loss.chunk_mb * 2**20)
    optimizer = torch.optim.AdamW(_param_groups(student, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2))
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    collator = Collator(tokenizer.pad_token_id)
    if recipe.data.packing:
        pack_length = recipe.data.pack_length or recipe.data.max_length
        train_set, val_set = pack_examples(train_set, pack_length), pack_examples(val_set, pack_length)
        if main:
            print(f"kdlm: packed into {len(train_set)} train / {len(val_set)} validation rows of <= {pack_length} tokens")
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, collate_fn=collator,
                        num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    module, optimizer, loader, scheduler = accelerator.prepare(module, optimizer, loader, scheduler)

    # 5. resume
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "tokens": 0}
    ckpt_root = out / "checkpoints"
    if resume:
        ckpt = latest_checkpoint(ckpt_root)
        if ckpt is None:
            raise OutputError(f"{out}: --resume given but there is no complete checkpoint in {ckpt_root}")
        state = load_checkpoint(accelerator, ckpt)
        if main:
            print(f"kdlm: resumed from {ckpt} at step {state['step']}", flush=True)
    if cfg.report_to:
        accelerator.init_trackers("tensorboard" if "tensorboard" in cfg.report_to else "kdlm",
                                  config=_flat(to_dict(recipe)),
                                  init_kwargs={"wandb": {"project": cfg.wandb_project}} if cfg.wandb_project else {})
    metrics = MetricsLog(accelerator, out / "metrics.jsonl")

    def run_validation() -> dict:
        return validate(accelerator.unwrap_model(module).student, teacher, val_set, collator=collator,
                        batch_size=cfg.batch_size, vocab=vocab, accelerator=accelerator, max_batches=cfg.eval_batches,
                        chunk_bytes=recipe.loss.chunk_mb * 2**20)

    before = state.get("before") or (run_validation() if val_set else {})
    state["before"] = before
    if main and before and state["step"] == 0:
        metrics.log({f"val/{k}": v for k, v in before.items()}, step=0)
    history: list[dict] = []

    # 6. the loop
    batches = _batches(loader, state)
    bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=not (main and show_progress), desc="distill",
               unit="step", dynamic_ncols=True)
    module.train()
    # metrics are averaged over the logging window; kept as tensors so a step never waits on the host
    window_sums = torch.zeros(len(terms), dtype=torch.float64, device=accelerator.device)
    window_count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    window_start = time.perf_counter()
    while state["step"] < cfg.max_steps:
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        term_totals, global_count, _ = accumulate_gradients(module, teacher, micro, terms, accelerator)
        grad_norm = accelerator.clip_grad_norm_(module.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        window_sums += torch.stack([term_totals[t.label] for t in terms]).double()
        window_count += global_count

        if state["step"] % cfg.log_every == 0 or state["step"] == cfg.max_steps:
            sums = accelerator.reduce(window_sums, reduction="sum").tolist()  # this process's sums -> all processes'
            count = max(window_count.item(), 1.0)
            record = {f"loss/{t.label}": sums[k] / count for k, t in enumerate(terms)}
            record["loss/total"] = sum(t.weight * record[f"loss/{t.label}"] for t in terms)
            elapsed = time.perf_counter() - window_start
            record.update({"lr": scheduler.get_last_lr()[0], "tokens_per_s": count / max(elapsed, 1e-9),
                           "counted_tokens": int(count)})
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            state["tokens"] += int(count)
            window_sums.zero_()
            window_count.zero_()
            window_start = time.perf_counter()
            metrics.log(record, step=state["step"])
            history.append({"step": state["step"], **record})
            bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in record.items() if k.startswith("loss/")}
                            | {"tok/s": f"{record['tokens_per_s']:.0f}"})
        bar.update(1)
        if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < cfg.max_steps and val_set:
            figures = run_validation()
            metrics.log({f"val/{k}": v for k, v in figures.items()}, step=state["step"])
        if (cfg.save_every and state["step"] % cfg.save_every == 0) or state["step"] == cfg.max_steps:
            save_checkpoint(accelerator, ckpt_root, state["step"], state, cfg.keep_checkpoints)
        if on_step is not None:
            on_step(state["step"])
    bar.close()

    # 7. final validation and export
    after = run_validation() if val_set else {}
    model_dir = out / "model"
    if after:
        metrics.log({f"val/{k}": v for k, v in after.items()}, step=state["step"])
    if main:
        card = model_card(recipe, steps=state["step"], student_init=student_init, data_summary=report.summary(),
                          before=before, after=after) if after else f"# Distilled student\n\nTeacher: {recipe.teacher.model}\n"
        save_student_folder(accelerator.unwrap_model(module).student, tokenizer, model_dir, card)
        atomic_write_text(out / "final_metrics.json", _json({"steps": state["step"], "before": before, "after": after,
                                                             "memory": peak_memory_mb()}))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunResult(out, model_dir, state["step"], before, after, report, history)


def accumulate_gradients(module, teacher: Optional[Union[Teacher, CachedTeacher]], micro: list[dict], terms, accelerator):
    """Forward and backward over one optimizer step's micro-batches; gradients are left in the parameters.

    The loss of every micro-batch is divided by the GLOBAL count of scored tokens in the step (all
    micro-batches, all processes), so accumulation and data parallelism give the gradient of
    sum(weighted term sums) / global count, exactly as one big batch would. Returns
    (per-term sums on this process, global count, local count), the counts as tensors (no host sync).
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


def _load_teacher(recipe: Recipe, source, teacher_tokenizer, tokenizer, *, student_rows: int, examples: list,
                  default_device) -> tuple[Optional[Union[Teacher, CachedTeacher]], int]:
    """The teacher (a live model, an offline cache, or None when `source` is None: no term needs one) and the
    vocabulary size the objective compares over."""
    if source is None:  # ce / redi only: the student's own rows, still checked against its tokenizer
        return None, shared_vocab_size(tokenizer, tokenizer, student_rows, student_rows)
    if recipe.teacher.source == "cache":
        teacher = CachedTeacher(cache_dir_for(recipe), recipe, tokenizer)
        vocab = shared_vocab_size(teacher_tokenizer, tokenizer, teacher.vocab, student_rows)
        teacher.verify(examples)  # every example cached, same tokens: fail now, not mid-run
        return teacher, vocab
    device = resolve_device(recipe.teacher.device, default_device)
    model = load_model(source, dtype=resolve_dtype(recipe.teacher.dtype, device, trainable=False), device=device,
                       trust_remote_code=recipe.teacher.trust_remote_code, frozen=True)
    vocab = shared_vocab_size(teacher_tokenizer, tokenizer, model.get_output_embeddings().weight.shape[0], student_rows)
    return Teacher(model, vocab), vocab


def _batches(loader: DataLoader, state: dict) -> Iterator[dict]:
    """Endless batches; `state` records (epoch, batches_in_epoch) so a resume restarts at the same batch."""
    from accelerate import skip_first_batches

    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(state["epoch"])
        it = skip_first_batches(loader, state["batches_in_epoch"]) if state["batches_in_epoch"] else loader
        for batch in it:
            state["batches_in_epoch"] += 1
            yield batch
        state["epoch"] += 1
        state["batches_in_epoch"] = 0


def _check_output_dir(out: Path, recipe: Recipe, resume: bool) -> bool:
    """Refuse to overwrite a finished run; on resume, refuse a recipe that changed beyond the harmless fields.

    Returns True when the folder holds an old run that `output.overwrite` allows replacing."""
    import yaml

    from kdlm.config import from_dict

    existing = out / "resolved_config.yaml"
    if resume:
        if not existing.is_file():
            raise OutputError(f"{out}: --resume given but this folder holds no run")
        old = _flat(to_dict(from_dict(Recipe, yaml.safe_load(existing.read_text()))))
        new = _flat(to_dict(recipe))
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            raise OutputError(f"{out}: cannot resume: the recipe changed in {', '.join(changed)} since the checkpoint")
        return False
    if _run_entries(out, recipe):
        if not recipe.output.overwrite:
            raise OutputError(f"{out}: output folder is not empty; pass --resume to continue it, "
                              f"--set output.overwrite=true to replace it, or choose another output.dir")
        return True
    return False


def _run_entries(out: Path, recipe: Recipe) -> list[Path]:
    """What a previous run left in `out`: everything but the teacher cache, which `kdlm cache-teacher` writes
    into <output.dir>/teacher_cache by default and which a new run of the same recipe is meant to read."""
    if not out.is_dir():
        return []
    cache = cache_dir_for(recipe).resolve()
    return [p for p in out.iterdir() if p.resolve() != cache]


def _mixed_precision(setting: str) -> str:
    """`auto`: bf16 autocast on a GPU that supports it, and on CPUs with native bf16 (AVX512-BF16 / AMX), where
    bf16 matmuls are several times faster; otherwise none. LM-head logits and losses stay fp32 either way."""
    if setting != "auto":
        if setting == "fp16" and not torch.cuda.is_available():
            raise ModelError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU")
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_fast_bf16() else "no"


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=2, default=str)
