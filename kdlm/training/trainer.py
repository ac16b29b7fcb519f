"""`kdlm distill`: a run assembled in stages, then the one training loop (kdlm.training.loop), on accelerate
(DDP / FSDP / DeepSpeed under `accelerate launch`).

A method is a (batch source, teacher signal, objective) triple; the recipe names the parts and the stages
below build them, one concern each, in the order a run's data flows:

    tokenizers_stage   student / teacher tokenizers; incompatible vocabularies refused before any weights load
    data_stage         encoded train / validation examples (and the prompts a sampled source continues)
    models_stage       the student, and the teacher signal: a live teacher, an offline cache, or none
    objective_stage    the objective module (terms), optimizer and LR schedule
    source_stage       the batch source (static, student / teacher / mixed / replay samples; DDK's domain draw)
    schedules_stage    adaptive schedules (TAID's t, DDK's weights)
Then: resume (model, optimizer, data position, source and schedule state), run_loop, export.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch.utils.data import DataLoader

from kdlm.cache import CachedTeacher, cache_dir_for
from kdlm.config import Recipe, dump_yaml, to_dict
from kdlm.config.schema import CROSS_TOKENIZER_TERM_NAMES, SAMPLED_SOURCES
from kdlm.data import Collator, DataReport, prepare_data
from kdlm.data.packing import pack_examples
from kdlm.errors import ConfigError, DataError, ModelError, OutputError
from kdlm.losses.features import FeatureProjections, ModelDims, feature_layers, resolve_feature_terms
from kdlm.losses.multi_teacher import expand_terms
from kdlm.losses.objective import Term, resolve_terms
from kdlm.models.compat import shared_vocab_size
from kdlm.models.generate import cpu_has_fast_bf16
from kdlm.models.init_student import parameter_count
from kdlm.models.loading import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_source
from kdlm.training.checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint, load_rank_state
from kdlm.training.export import model_card, save_student_folder
from kdlm.training.hooks import DdkHook, TaidHook
from kdlm.training.loop import Loop, accumulate_gradients, run_loop  # noqa: F401  (accumulate_gradients: public)
from kdlm.training.metrics import MetricsLog, peak_memory_mb
from kdlm.training.schedules import DomainWeights
from kdlm.training.sources import (DomainStream, LoaderStream, SampledSource, SamplerModels, StaticSource,
                                   check_prompts, stop_ids_of)
from kdlm.training.step import DistillationModule, Teacher, TeacherEnsemble, teacher_autocast
from kdlm.training.validate import validate

log = logging.getLogger(__name__)

# Changing these between a run and its resume is fine; anything else must match the checkpointed recipe.
RESUMABLE_CHANGES = {"train.max_steps", "train.max_seconds", "train.save_every", "train.eval_every", "train.log_every", "train.eval_batches",
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
    kept_layers: Optional[list[int]] = None  # the teacher layers the student was cut from (student.keep_layers)


@dataclass
class Tokenizers:
    student_src: object
    student: object
    teacher_src: Optional[object]  # None: no part of the run needs the teacher
    teacher: Optional[object]
    others: list = field(default_factory=list)  # multi-teacher: (source, tokenizer) of teachers[1:]


@dataclass
class Models:
    student: torch.nn.Module
    student_init: str  # for the model card
    teacher: Optional[Union[Teacher, CachedTeacher]]
    vocab: int  # the vocabulary the objective compares over
    terms: list = field(default_factory=list)  # the objective's terms, feature terms resolved against both models
    kept_layers: Optional[list[int]] = None
    prune_report: Optional[dict] = None  # kdlm.models.prune.PruneReport.to_dict(), plus its wall time


def distill(recipe: Recipe, *, resume: bool = False, on_step: Optional[Callable[[int], None]] = None,
            show_progress: bool = True) -> RunResult:
    """Run a distillation described by `recipe`. `on_step(step)` is called after every optimizer step."""
    from accelerate.utils import set_seed

    out = Path(recipe.output.dir)
    cfg = recipe.train
    from kdlm.training.sharding import check_distributed_setup

    check_distributed_setup(None)  # ZeRO-3 without deepspeed: one line, before accelerate raises its own
    accelerator = _accelerator(recipe, out)
    wipe = _check_output_dir(out, recipe, resume)  # read-only, every rank: never clobber a finished run
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    main = accelerator.is_main_process

    terms = run_terms(recipe)
    if recipe.sampling.engine == "vllm" and recipe.source.kind in SAMPLED_SOURCES and not torch.cuda.is_available():
        raise ModelError("sampling.engine: vllm runs on a CUDA GPU and none is visible; use sampling.engine: kdlm")
    tokenizers = tokenizers_stage(recipe, terms)
    train_set, val_set, report = data_stage(recipe, tokenizers.student, terms, main=main,
                                            teacher_tokenizer=tokenizers.teacher)
    models = models_stage(recipe, tokenizers, train_set + val_set, device=accelerator.device, terms=terms)
    terms = models.terms

    # every input is checked: only now is the output folder touched (a failed start leaves it as it was)
    if main:
        for old in _run_entries(out, recipe) if wipe else []:  # replace the old run, keep the teacher cache
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "resolved_config.yaml", dump_yaml(recipe))
        atomic_write_text(out / "data_report.json", _json(report.__dict__))
        if models.prune_report is not None:
            atomic_write_text(out / "prune_report.json", _json(models.prune_report))
    accelerator.wait_for_everyone()

    module, optimizer, scheduler = objective_stage(recipe, models, terms)
    collator = Collator(tokenizers.student.pad_token_id)
    if recipe.data.packing:
        pack_length = recipe.data.pack_length or recipe.data.max_length
        train_set, val_set = pack_examples(train_set, pack_length), pack_examples(val_set, pack_length)
        if main:
            print(f"kdlm: packed into {len(train_set)} train / {len(val_set)} validation rows of <= {pack_length} tokens")
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, collate_fn=list,
                        num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    module, optimizer, loader, scheduler = accelerator.prepare(module, optimizer, loader, scheduler)
    from kdlm.training.sharding import shard_teacher  # FSDP / ZeRO-3 (or teacher.shard: always): 1/world each
    models.teacher = shard_teacher(models.teacher, accelerator, recipe, validation_examples=len(val_set))

    # several teachers: validation figures are against the first (the recipe's `teacher`)
    validation_teacher = models.teacher.primary if isinstance(models.teacher, TeacherEnsemble) else models.teacher

    def run_validation(examples=None, max_batches=cfg.eval_batches) -> dict:
        return validate(accelerator.unwrap_model(module).student, validation_teacher,
                        val_set if examples is None else examples, collator=collator, batch_size=cfg.batch_size,
                        vocab=models.vocab, accelerator=accelerator, max_batches=max_batches,
                        chunk_bytes=recipe.loss.chunk_mb * 2**20)

    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "tokens": 0}
    schedules, domain_weights = schedules_stage(recipe, terms, val_set, run_validation, accelerator)
    source = source_stage(recipe, train_set, loader, state, collator, module, models, tokenizers, terms,
                          domain_weights, accelerator)

    # resume: model, optimizer, scheduler, RNG (accelerate), data position, source and schedule state
    ckpt_root = out / "checkpoints"
    if resume:
        ckpt = latest_checkpoint(ckpt_root)
        if ckpt is None:
            raise OutputError(f"{out}: --resume given but there is no complete checkpoint in {ckpt_root}")
        state.update(load_checkpoint(accelerator, ckpt))
        source.load_state_dict(state.get("source") or {})
        source.load_rank_state(load_rank_state(accelerator, ckpt))
        for hook in schedules:
            hook.load_state_dict((state.get("schedules") or {}).get(hook.name) or hook.state_dict())
        if main:
            print(f"kdlm: resumed from {ckpt} at step {state['step']}", flush=True)
    if cfg.report_to:
        accelerator.init_trackers("tensorboard" if "tensorboard" in cfg.report_to else "kdlm",
                                  config=_flat(to_dict(recipe)),
                                  init_kwargs={"wandb": {"project": cfg.wandb_project}} if cfg.wandb_project else {})
    metrics = MetricsLog(accelerator, out / "metrics.jsonl")
    before = state.get("before") or (run_validation() if val_set else {})
    state["before"] = before
    if main and before and state["step"] == 0:
        metrics.log({f"val/{k}": v for k, v in before.items()}, step=0)

    loop = Loop(accelerator=accelerator, module=module, teacher=models.teacher, optimizer=optimizer,
                scheduler=scheduler, source=source, schedules=schedules, validate=run_validation, metrics=metrics,
                cfg=cfg, ckpt_root=ckpt_root, has_validation=bool(val_set))
    run_loop(loop, state, on_step=on_step, show_progress=show_progress)

    after = run_validation() if val_set else {}
    model_dir = out / "model"
    if after:
        metrics.log({f"val/{k}": v for k, v in after.items()}, step=state["step"])
    if main:
        card = model_card(recipe, steps=state["step"], student_init=models.student_init, data_summary=report.summary(),
                          before=before, after=after) if after else f"# Distilled student\n\nTeacher: {recipe.teacher.model}\n"
        if recipe.student.lora.enabled:  # merged (in place: training is over) or the adapter alone
            from kdlm.models.lora import export_lora

            export_lora(accelerator.unwrap_model(module).student, tokenizers.student, model_dir, card,
                        recipe.student.lora.export, in_place=True)
        else:
            save_student_folder(accelerator.unwrap_model(module).student, tokenizers.student, model_dir, card)
        atomic_write_text(out / "final_metrics.json", _json({"steps": state["step"], "before": before, "after": after,
                                                             "memory": peak_memory_mb()}))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunResult(out, model_dir, state["step"], before, after, report, loop.history, models.kept_layers)


# ----------------------------------------------------------------------------- the stages


def run_terms(recipe: Recipe) -> list[Term]:
    """The recipe's terms, resolved; with several teachers, one copy of each divergence term per teacher."""
    terms = resolve_terms(recipe.loss)
    if recipe.multi_teacher:
        terms = expand_terms(terms, recipe.teacher_names(), [t.weight for t in recipe.teachers],
                             recipe.loss.teacher_pooling)
    return terms


def tokenizers_stage(recipe: Recipe, terms: list[Term]) -> Tokenizers:
    """Tokenizers first (cheap): refuse incompatible vocabularies before loading weights. A run none of whose
    parts needs the teacher (ce / redi terms on fixed data) never touches it."""
    student_src = resolve_source(recipe.student.model, recipe.student.gguf_file, recipe.student.revision)
    tokenizer = load_tokenizer(student_src, trust_remote_code=recipe.student.trust_remote_code)
    if not needs_teacher(recipe, terms):
        return Tokenizers(student_src, tokenizer, None, None)
    teacher_src = resolve_source(recipe.teacher.model, recipe.teacher.gguf_file, recipe.teacher.revision)
    teacher_tok = load_tokenizer(teacher_src, trust_remote_code=recipe.teacher.trust_remote_code)
    cross = any(t.is_cross_tokenizer for t in terms)
    if teacher_tok.get_vocab() != tokenizer.get_vocab() and not cross:
        try:
            shared_vocab_size(teacher_tok, tokenizer, 0, 0)  # raises with the differing tokens named
        except ModelError as err:
            raise ModelError(f"{err}; to distil across tokenizers, use an alm or uld loss term "
                             f"(docs/concepts/cross_tokenizer.md)") from None
    elif cross and teacher_tok.get_vocab() == tokenizer.get_vocab():
        print("kdlm: note: teacher and student share one tokenizer, so every aligned chunk is a single token: alm is "
              "then a per-token likelihood match and uld a sorted-probability L1; a divergence term (forward_kl) "
              "compares the whole distributions and is the better choice here", flush=True)
    others = []
    for i, cfg in enumerate(recipe.teachers[1:], start=1):
        src = resolve_source(cfg.model, cfg.gguf_file, cfg.revision)
        tok = load_tokenizer(src, trust_remote_code=cfg.trust_remote_code)
        if tok.get_vocab() != tokenizer.get_vocab():
            try:
                shared_vocab_size(tok, tokenizer, 0, 0)
            except ModelError as err:
                raise ModelError(f"teachers[{i}] ({cfg.model}): {err}") from None
        chats = recipe.data.format in ("messages", "auto") or recipe.data.chat_template
        if chats and getattr(tok, "chat_template", None) != getattr(teacher_tok, "chat_template", None):
            raise ConfigError(f"teachers[{i}] ({cfg.model}): its chat template differs from teachers[0]'s; every "
                              f"teacher reads the student's rendered chat, so they must share one (set data.format: "
                              f"prompt_completion or text if the rows are not chats)")
        others.append((src, tok))
    return Tokenizers(student_src, tokenizer, teacher_src, teacher_tok, others)


def needs_teacher(recipe: Recipe, terms: list[Term]) -> bool:
    """A divergence term, teacher samples, teacher-mixed sampling, pg's rewards or DDK's teacher CE."""
    src, kind = recipe.source, recipe.source.kind
    return (any(t.needs_teacher for t in terms) or kind == "teacher" or (kind == "mixed" and src.off_policy == "teacher")
            or recipe.sampling.teacher_mix > 0 or any(t.name == "pg" for t in terms) or recipe.schedule.ddk_every > 0)


def data_stage(recipe: Recipe, tokenizer, terms: list[Term], *, main: bool, teacher_tokenizer=None):
    """Encoded examples, with the checks that need them: negatives need redi; sampled sources need prompts that
    leave room for max_new_tokens; DDK needs every domain in validation. Cross-tokenizer terms: each example is
    also tokenised by the teacher and aligned by bytes (kdlm.data.alignment)."""
    train_set, val_set, report = prepare_data(recipe.data, tokenizer, seed=recipe.train.seed)
    if any(t.is_cross_tokenizer for t in terms):
        align_examples(train_set + val_set, tokenizer, teacher_tokenizer, show_progress=main)
    if report.negative_examples and not any(t.name == "redi" for t in terms):
        raise ConfigError(f"data.negative_field marks {report.negative_examples} negative rows but no loss term "
                          f"uses them; add {{name: redi}} to loss.terms")
    if recipe.multi_teacher and recipe.loss.teacher_pooling == "domain":
        _route_domains(recipe, train_set + val_set)
    if recipe.source.kind in SAMPLED_SOURCES:
        check_prompts(train_set, max_new_tokens=recipe.sampling.max_new_tokens, max_length=recipe.data.max_length)
    if recipe.schedule.ddk_every:
        missing = sorted({ex.domain for ex in train_set} - {ex.domain for ex in val_set})
        if missing:
            raise DataError(f"schedule.ddk_every: DDK compares per-domain validation CE, but domain(s) "
                            f"{', '.join(missing)} have no validation rows; raise data.validation_fraction")
    if main:
        print(f"kdlm: data: {report.summary()}", flush=True)
    return train_set, val_set, report


def align_examples(examples: list, tokenizer, teacher_tokenizer, *, show_progress: bool = True) -> None:
    """Give each example the teacher's tokens of its text, their counted labels and both sides' chunk ids."""
    from tqdm.auto import tqdm

    from kdlm.data.alignment import align_ids, chunk_labels

    chunks = tokens = 0
    for ex in tqdm(examples, desc="kdlm: aligning tokenizers", disable=not show_progress or len(examples) < 500,
                   unit="example"):
        try:
            teacher_ids, alignment = align_ids(tokenizer, ex.input_ids, teacher_tokenizer)
        except ValueError as err:
            raise DataError(f"{ex.sample_id}: {err}") from None
        ex.teacher_input_ids = teacher_ids
        ex.teacher_labels, ex.student_chunk, ex.teacher_chunk = chunk_labels(alignment, ex.labels, teacher_ids)
        chunks += max(ex.student_chunk, default=-1) + 1
        tokens += sum(1 for c in ex.student_chunk if c >= 0)
    if not chunks:
        raise DataError("cross-tokenizer alignment: no example has a counted chunk (are all tokens masked?)")
    if show_progress:
        print(f"kdlm: aligned {len(examples)} examples by bytes: {chunks} counted chunks, "
              f"{tokens / chunks:.2f} student tokens per chunk", flush=True)


def _route_domains(recipe: Recipe, examples: list) -> None:
    """Multi-teacher domain pooling: each example's teacher index, from its domain (one line if a domain has none)."""
    owner = {d: i for i, t in enumerate(recipe.teachers) for d in t.domains}
    for ex in examples:
        if ex.domain not in owner:
            raise DataError(f"{ex.sample_id}: domain {ex.domain!r} ({recipe.data.domain_field}) belongs to no "
                            f"teacher; add it to one of teachers[].domains")
        ex.route = owner[ex.domain]


def models_stage(recipe: Recipe, tokenizers: Tokenizers, examples: list, *, device,
                 terms: Optional[list[Term]] = None) -> Models:
    """The student (optionally pruned: a layer subset, by importance, and narrower), the teacher signal (live
    model, offline cache, or none), and the feature terms resolved against both models' shapes."""
    terms = list(terms if terms is not None else resolve_terms(recipe.loss))
    if any(t.is_feature for t in terms):  # layer maps / relation heads checked on the configs, before weights load
        resolve_features(recipe, terms, planned_dims(recipe, student=True), planned_dims(recipe, student=False))
    student_device = resolve_device(recipe.student.device, device)
    student = load_model(tokenizers.student_src, dtype=resolve_dtype(recipe.student.dtype, student_device, trainable=True),
                         device=student_device, trust_remote_code=recipe.student.trust_remote_code)
    student_init = f"`{recipe.student.model}` ({parameter_count(student) / 1e6:.1f}M parameters)"
    kept, prune_report = None, None
    if recipe.student.keep_layers is not None or recipe.student.prune.scored:
        kept, student_init, prune_report = build_student(recipe, student, examples)
    if recipe.student.lora.enabled:  # after the cut: the adapters go on the layers that remain
        from kdlm.models.lora import apply_lora, summary

        student = apply_lora(student, recipe.student.lora)
        line = summary(student, recipe.student.lora)
        print(f"kdlm: student: {line}", flush=True)
        student_init += f"\n\nTrained with {line}."
    student_rows = student.get_output_embeddings().weight.shape[0]
    teacher, vocab = _load_teacher(recipe, tokenizers.teacher_src, tokenizers.teacher, tokenizers.student,
                                   student_rows=student_rows, examples=examples, default_device=device)
    if recipe.multi_teacher and teacher is not None:
        teacher, vocab = _load_ensemble(recipe, tokenizers, teacher, vocab, student_rows=student_rows,
                                        examples=examples, default_device=device)
    if any(t.is_feature for t in terms):
        terms = resolve_features(recipe, terms, ModelDims(student.config), ModelDims(teacher.model.config), kept)
        _, teacher.hidden_layers, _, teacher.attention_layers = (sorted(x, key=str) for x in feature_layers(terms))
    if recipe.train.gradient_checkpointing:  # the sampler runs the student in eval mode, so its KV cache stays on
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.config.use_cache = False
    return Models(student, student_init, teacher, vocab, terms, kept, prune_report)


def build_student(recipe: Recipe, student: torch.nn.Module, examples: list) -> tuple[list[int], str, dict]:
    """Cut the student from `student.model` in place (student.keep_layers, student.prune) and describe it for the
    model card. Returns the kept layers' indices in the original model, the description and the prune report."""
    import time

    from kdlm.models.prune import load_calibration, prune_student

    cfg = recipe.student.prune
    calibration: list[list[int]] = []
    if cfg.scored and cfg.calibration:
        tokenizer = load_tokenizer(resolve_source(recipe.student.model, recipe.student.gguf_file, recipe.student.revision),
                                   trust_remote_code=recipe.student.trust_remote_code)
        calibration = load_calibration(tokenizer, cfg)
    elif cfg.scored:  # the training data, as the run encoded it
        calibration = [list(ex.input_ids[: cfg.calibration_length]) for ex in examples[: cfg.calibration_samples]]
    start = time.perf_counter()
    report = prune_student(student, recipe.student.keep_layers, cfg, calibration)
    seconds = time.perf_counter() - start
    print(f"kdlm: student: {report.summary()} ({seconds:.0f} s)", flush=True)
    init = f"layers {report.kept_layers} of `{recipe.student.model}` ({parameter_count(student) / 1e6:.1f}M parameters)"
    return report.kept_layers, init + "\n\n" + report.markdown(), {**report.to_dict(), "seconds": seconds}


def planned_dims(recipe: Recipe, *, student: bool) -> ModelDims:
    """A model's feature shapes from its config alone (no weights), with the student's pruning applied."""
    from transformers import AutoConfig

    side = recipe.student if student else recipe.teacher
    source = resolve_source(side.model, side.gguf_file, side.revision)
    dims = ModelDims(AutoConfig.from_pretrained(source.path, **source.kwargs))
    if student:
        keep, prune = recipe.student.keep_layers, recipe.student.prune
        if keep is not None:
            dims.layers = keep if isinstance(keep, int) else len(keep)
        if prune.num_key_value_heads:
            dims.heads, dims.kv_heads = dims.heads // dims.kv_heads * prune.num_key_value_heads, prune.num_key_value_heads
        if prune.hidden_size:
            dims.hidden = prune.hidden_size
    return dims


def init_student_layers(student: str, teacher: str) -> Optional[list[int]]:
    """The teacher layers a `kdlm init-student` folder was cut from, when it was cut from `teacher` (its
    prune_report.json names the source), so that `layers: kept` maps it; None otherwise."""
    report = Path(student).expanduser() / "prune_report.json"
    if not report.is_file():
        return None
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return list(data["kept_layers"]) if data.get("source") == teacher and data.get("kept_layers") else None


def resolve_features(recipe: Recipe, terms: list[Term], student: ModelDims, teacher: ModelDims,
                     kept: Optional[list[int]] = None) -> list[Term]:
    """Feature terms with their layer pairs and relation heads filled in (kdlm.losses.features)."""
    subset = recipe.student.keep_layers is not None and recipe.student.model == recipe.teacher.model
    if kept is None and subset:  # before the student exists: the layers keep_layers names or will choose
        keep = recipe.student.keep_layers
        kept = list(keep) if isinstance(keep, list) else list(range(keep))
    if kept is None and recipe.student.keep_layers is None:
        kept = init_student_layers(recipe.student.model, recipe.teacher.model)
        subset = kept is not None
    return resolve_feature_terms(terms, student=student, teacher=teacher, kept=kept if subset else None)


def objective_stage(recipe: Recipe, models: Models, terms: list[Term]):
    """The student and the objective in one module, AdamW over it, and the LR schedule."""
    from transformers import get_scheduler

    cfg = recipe.train
    projections = None
    if any(t.name == "hint" for t in terms):
        projections = FeatureProjections(terms, ModelDims(models.student.config).hidden,
                                         ModelDims(models.teacher.model.config).hidden,
                                         dtype=models.student.get_input_embeddings().weight.dtype)
        projections.to(models.student.get_input_embeddings().weight.device)
    module = DistillationModule(models.student, terms, models.vocab, fused=recipe.loss.fused,
                                chunk_bytes=recipe.loss.chunk_mb * 2**20, pg_clip=recipe.loss.pg_clip,
                                pg_length_normalise=recipe.loss.pg_length_normalise, projections=projections)
    # over the whole module: the student AND the hint projections (DistillKit v1 built its projections after
    # the optimizer, so they never trained: PEERS.md #10)
    optimizer = torch.optim.AdamW(_param_groups(module, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2))
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.max_steps)
    return module, optimizer, scheduler


def source_stage(recipe: Recipe, train_set: list, loader, state: dict, collator: Collator, module, models: Models,
                 tokenizers: Tokenizers, terms: list[Term], domain_weights: Optional[DomainWeights], accelerator):
    """The batch source over an example stream (the shuffled dataset, or DDK's domain-weighted draw)."""
    cfg = recipe.train
    if domain_weights is not None:
        rank, world = accelerator.process_index, accelerator.num_processes
        stream = DomainStream(train_set[rank::world], batch_size=cfg.batch_size, weights=domain_weights,
                              seed=cfg.seed, rank=rank)
    else:
        stream = LoaderStream(loader, state)
    if recipe.source.kind == "static":
        return StaticSource(stream, collate=collator, grad_accum=cfg.grad_accum, device=accelerator.device)
    teacher = models.teacher.model if isinstance(models.teacher, Teacher) else None
    sampler_models = SamplerModels(student=lambda: accelerator.unwrap_model(module).student, teacher=teacher,
                                   vocab=models.vocab, stop_ids=stop_ids_of(tokenizers.student, models.student, teacher),
                                   pad_id=tokenizers.student.pad_token_id, autocast=lambda: teacher_autocast(accelerator))
    if recipe.sampling.engine == "vllm":
        from kdlm.training.vllm_sampler import VllmSampler

        sampler_models.vllm = VllmSampler(
            models.student, tokenizers.student, folder=Path(recipe.output.dir) / "vllm-student",
            gpu_memory_utilization=recipe.sampling.vllm_gpu_memory_utilization, sleep=recipe.sampling.vllm_sleep,
            max_model_len=recipe.data.max_length, seed=cfg.seed)
    record = any(t.name == "pg" for t in terms) or recipe.sampling.teacher_mix > 0
    return SampledSource(recipe.source, recipe.sampling, stream=stream, collate=collator, grad_accum=cfg.grad_accum,
                         models=sampler_models, record_logprobs=record, seed=cfg.seed, accelerator=accelerator)


def schedules_stage(recipe: Recipe, terms: list[Term], val_set: list, run_validation, accelerator):
    """TAID's t (when a taid term is present) and DDK's domain weights (schedule.ddk_every > 0)."""
    hooks, weights = [], None
    if any(t.name == "taid" for t in terms):
        hooks.append(TaidHook(recipe.schedule, total_steps=recipe.train.max_steps, accelerator=accelerator))
    if recipe.schedule.ddk_every:
        sc = recipe.schedule
        weights = DomainWeights(sorted({ex.domain for ex in val_set}), smoothing=sc.ddk_smoothing, uniform=sc.ddk_uniform)
        by_domain = {d: [ex for ex in val_set if ex.domain == d] for d in weights.domains}
        hooks.append(DdkHook(sc, weights, per_domain_validation=lambda d: run_validation(by_domain[d],
                                                                                         sc.ddk_eval_batches)))
    return hooks, weights


def _accelerator(recipe: Recipe, out: Path):
    """accelerate keeps process-wide singletons; a second run in the same Python process (the API, tests,
    notebooks) may want another precision. The process group (PartialState) is kept."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(mixed_precision=_mixed_precision(recipe.train.mixed_precision),
                       log_with=list(recipe.train.report_to) or None, project_dir=str(out),
                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))


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
    teacher_rows = model.get_output_embeddings().weight.shape[0]
    if any(t.name in CROSS_TOKENIZER_TERM_NAMES for t in recipe.loss.terms):  # each side keeps its own vocabulary
        teacher_vocab = shared_vocab_size(teacher_tokenizer, teacher_tokenizer, teacher_rows, teacher_rows)
        return Teacher(model, teacher_vocab), shared_vocab_size(tokenizer, tokenizer, student_rows, student_rows)
    vocab = shared_vocab_size(teacher_tokenizer, tokenizer, teacher_rows, student_rows)
    return Teacher(model, vocab), vocab


def _load_ensemble(recipe: Recipe, tokenizers: Tokenizers, first, vocab: int, *, student_rows: int, examples: list,
                   default_device) -> tuple[TeacherEnsemble, int]:
    """Multi-teacher: every teacher loaded as a single one would be (live or cached), pooled by loss.teacher_pooling."""
    import dataclasses

    members = [(recipe.teacher_names()[0], recipe.teachers[0].weight, first)]
    for i, (cfg, (src, tok)) in enumerate(zip(recipe.teachers[1:], tokenizers.others), start=1):
        alone = dataclasses.replace(recipe, teacher=cfg, teachers=[])
        teacher, v = _load_teacher(alone, src, tok, tokenizers.student, student_rows=student_rows, examples=examples,
                                   default_device=default_device)
        members.append((recipe.teacher_names()[i], cfg.weight, teacher))
        vocab = min(vocab, v)
    for _, _, member in members:  # every LM head compares over the same (shared) vocabulary
        if isinstance(member, Teacher):
            member.head = dataclasses.replace(member.head, vocab=vocab)
    print(f"kdlm: {len(members)} teachers ({', '.join(n for n, _, _ in members)}), pooling: "
          f"{recipe.loss.teacher_pooling}", flush=True)
    return TeacherEnsemble(members, recipe.loss.teacher_pooling), vocab


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
