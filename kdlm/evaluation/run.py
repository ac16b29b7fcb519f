"""`kdlm eval`: evaluate models on tasks and write predictions, metrics and summary.json.

Everything the user gave is checked before any model is loaded (tasks, data files, models, options, the output
folder, lm-eval for --harness). The reference model (the first MODEL, or --teacher) is evaluated first and kept
loaded, so each student's token-level agreement with it can be computed on the same examples. Output layout:

    OUT/summary.json                                   every figure, schema `kdlm_eval_version` 1
    OUT/<label>/<task>/predictions.jsonl, metrics.json one row per example; the task's figures
    OUT/<label>/<task>/robustness/...                  perturbed inputs and their predictions (--robustness)
    OUT/<label>/<task>/ood/<set>/..., adversarial/<set>/...
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from kdlm import __version__
from kdlm.errors import ConfigError, DataError, ModelError, OutputError
from kdlm.evaluation import metrics as M
from kdlm.evaluation import stats as S
from kdlm.evaluation.answers import extract
from kdlm.evaluation.robustness import perturb, summarize_asr
from kdlm.evaluation.tasks import (DataSpec, Example, Task, build_context, class_options, few_shot_turns,
                                   load_examples, match_option, perturbable_span, resolve_task, with_input)

SUMMARY_VERSION = 1
SECTIONS = ("results", "retention", "agreement", "robustness", "ood", "efficiency", "harness", "judge")


# ----------------------------------------------------------------------------- settings and inputs


@dataclass
class EvalSettings:
    models: list[str]
    tasks: list[str]
    output: Path
    data_dir: Path = Path(".")
    teacher: Optional[str] = None
    limit: Optional[int] = None
    batch_size: int = 8
    max_new_tokens: Optional[int] = None
    sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    robustness: bool = False
    efficiency: bool = False
    harness: list[str] = field(default_factory=list)
    device: str = "auto"
    dtype: str = "auto"
    show_progress: bool = True
    overwrite: bool = False
    trust_remote_code: bool = False
    # LLM-as-judge (kdlm.evaluation.judge): pairwise win rate of each student against the reference
    judge_url: Optional[str] = None
    judge_model: Optional[str] = None
    judge_api_key_env: Optional[str] = None
    judge_prompt: Optional[str] = None
    judge_max_tokens: int = 256
    judge_concurrency: int = 4
    # an earlier evaluation folder whose reference-model figures are reused instead of recomputed (kdlm compare
    # evaluates every variant against the same teacher: its generations are made once)
    reference_from: Optional[Path] = None


@dataclass
class ModelEntry:
    label: str
    given: str  # as the user named it
    path: str  # for summary.json: the model folder (RUN/model for a run folder), alias or hub id
    source: Any  # kdlm.models.loading.ModelSource


@dataclass
class PreparedSet:
    name: str
    spec: DataSpec
    examples: list[Example]
    options: Optional[tuple[str, ...]] = None
    answer_index: Optional[list[int]] = None  # classification: the reference's option per example


@dataclass
class PreparedTask:
    task: Task
    main: PreparedSet
    shots: list[tuple[str, str]]
    max_new_tokens: int
    ood: dict[str, PreparedSet] = field(default_factory=dict)
    adversarial: dict[str, PreparedSet] = field(default_factory=dict)
    perturbed: dict[str, list[str]] = field(default_factory=dict)  # kind -> user text per example

    @property
    def name(self) -> str:
        return self.task.name


def _is_run_folder(path: Path) -> bool:
    return (path / "model").is_dir() and ((path / "resolved_config.yaml").is_file() or (path / "metrics.jsonl").is_file()
                                          or not (path / "config.json").is_file())


def resolve_model(spec: str) -> tuple[str, str, Any]:
    """(label, path for the summary, ModelSource). A distillation run folder means its `model/` subfolder."""
    from kdlm.models import bundled
    from kdlm.models.loading import resolve_source

    if spec in bundled.ALIASES:
        return spec, spec, resolve_source(spec)
    path = Path(spec).expanduser()
    if path.is_dir() and _is_run_folder(path):
        model_dir = path / "model"
        if not any(model_dir.iterdir()):
            raise ModelError(f"{spec}: run folder whose model/ is empty (is the run finished?)")
        return path.resolve().name, str(Path(spec) / "model"), resolve_source(str(model_dir))
    source = resolve_source(spec)
    cached = _bundled_alias_of(path)
    if cached:
        return cached, spec, source
    if path.suffix == ".gguf":
        label = path.stem
    elif path.exists():
        resolved = path.resolve()
        label = resolved.parent.name if resolved.name == "model" and _is_run_folder(resolved.parent) else resolved.name
    else:
        label = spec.rstrip("/").split("/")[-1]
    return label, spec, source


def _bundled_alias_of(path: Path) -> Optional[str]:
    """The alias whose converted copy `path` is (a folder in the kdlm cache), so it is labelled by its alias."""
    from kdlm.models import bundled

    try:
        if path.resolve().parent != (bundled.cache_root() / "models").resolve():
            return None
    except OSError:
        return None
    return next((alias for alias in bundled.ALIASES if path.name.startswith(alias + "-")), None)


def resolve_models(specs: list[str], teacher: Optional[str]) -> list[ModelEntry]:
    """Model entries, the reference first: --teacher (added if not among the models), else the first model."""
    if not specs:
        raise ConfigError("give at least one MODEL to evaluate")
    resolved = [(s, *resolve_model(s)) for s in specs]
    if teacher is not None:
        t = (teacher, *resolve_model(teacher))
        same = [r for r in resolved if r[0] == teacher or Path(r[3].path).resolve() == Path(t[3].path).resolve()]
        if same:
            resolved.remove(same[0])
            t = same[0]
        resolved.insert(0, t)
    entries, used = [], set()
    for given, label, path, source in resolved:
        label = re.sub(r"[^\w.+-]", "_", label) or "model"
        unique, n = label, 2
        while unique in used:
            unique, n = f"{label}-{n}", n + 1
        used.add(unique)
        entries.append(ModelEntry(unique, given, path, source))
    return entries


def prepare_task(task: Task, settings: EvalSettings) -> PreparedTask:
    """Load a task's examples (and OOD/adversarial sets and perturbations when --robustness), checking them all."""
    data_dir, limit = Path(settings.data_dir), effective_limit(settings, task)
    main = _prepare_set("main", task, task.data, data_dir, limit, None)
    pt = PreparedTask(task, main, few_shot_turns(task, data_dir), settings.max_new_tokens or task.max_new_tokens)
    if settings.robustness:
        for section in ("ood", "adversarial"):
            for name, spec in getattr(task, section).items():
                getattr(pt, section)[name] = _prepare_set(name, task, spec, data_dir, limit, main.options)
        if task.robustness.enabled and task.has_correctness:
            for kind in task.robustness.kinds:
                pt.perturbed[kind] = [perturbed_user(task, ex, kind, settings.seed) for ex in main.examples]
    return pt


def effective_limit(settings: EvalSettings, task: Task) -> Optional[int]:
    """Examples per set: the smaller of --limit and the task file's own `limit` (None: all)."""
    return min((x for x in (settings.limit, task.limit) if x is not None), default=None)


def perturbed_user(task: Task, example: Example, kind: str, seed: int) -> str:
    """The user text of `example` with the `kind` perturbation applied to its input span only."""
    _, text, _ = perturbable_span(task.data, example)
    new = perturb(text, kind, seed=seed, index=example.index, rate=task.robustness.rate, salt=task.name)
    return with_input(task.data, example, new)


def _prepare_set(name: str, task: Task, spec: DataSpec, data_dir: Path, limit: Optional[int],
                 fallback_options: Optional[tuple[str, ...]]) -> PreparedSet:
    examples = load_examples(spec, data_dir, task.name, limit)
    pset = PreparedSet(name, spec, examples)
    for ex in examples:
        if task.type == "perplexity" and not ex.reference:
            raise DataError(f"{ex.where}: empty reference, nothing to score (task {task.name})")
        if task.type == "generation" and task.extract != "none" and not extract(task.extract, ex.reference):
            raise DataError(f"{ex.where}: no answer can be extracted from the reference ({task.extract}; "
                            f"task {task.name}): {ex.reference[-60:]!r}")
    if task.type == "classification":
        pset.options = class_options(spec, data_dir, task.name, fallback_options)
        pset.answer_index = [match_option(ex.reference, pset.options, ex.where) for ex in examples]
    return pset


# ----------------------------------------------------------------------------- a loaded model


@dataclass
class LoadedModel:
    entry: ModelEntry
    model: Any
    tokenizer: Any
    notes: list[str]

    @property
    def label(self) -> str:
        return self.entry.label

    def contexts(self, pt: PreparedTask, users: list[str]) -> list[list[int]]:
        from kdlm.evaluation.scoring import context_ids

        return [context_ids(self.tokenizer, build_context(pt.task, u, pt.shots)) for u in users]


def load(entry: ModelEntry, device: torch.device, dtype: torch.dtype, settings: EvalSettings) -> LoadedModel:
    from kdlm.evaluation.scoring import has_chat_template
    from kdlm.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(entry.source, trust_remote_code=settings.trust_remote_code)
    model = load_model(entry.source, dtype=dtype, device=device, trust_remote_code=settings.trust_remote_code, frozen=True)
    notes = []
    if not has_chat_template(tokenizer):
        notes.append(f"{entry.label}: the tokenizer has no chat template; chat-format tasks are given as plain text")
    return LoadedModel(entry, model, tokenizer, notes)


def run_examples(lm: LoadedModel, pt: PreparedTask, pset: PreparedSet, settings: EvalSettings,
                 indices: Optional[list[int]] = None, users: Optional[list[str]] = None, desc: str = "") -> list[dict]:
    """Predictions and per-example scores for `indices` of a set (all by default), with `users` replacing their
    user texts (perturbed inputs)."""
    from kdlm.evaluation import scoring

    task = pt.task
    indices = list(range(len(pset.examples))) if indices is None else indices
    examples = [pset.examples[i] for i in indices]
    users = [ex.user for ex in examples] if users is None else users
    if not examples:
        return []
    contexts = lm.contexts(pt, users)
    desc = desc or f"{lm.label}/{task.name}"
    rows = []
    if task.type == "generation":
        predictions = scoring.generate(
            lm.model, lm.tokenizer, contexts, max_new_tokens=pt.max_new_tokens, batch_size=settings.batch_size,
            do_sample=settings.sample, temperature=settings.temperature, seed=settings.seed if settings.sample else None,
            stop=task.stop, desc=desc, show_progress=settings.show_progress)
        for ex, user, pred in zip(examples, users, predictions):
            rows.append(score_generation(task, ex, user, pred))
    elif task.type == "classification":
        scores = scoring.option_scores(lm.model, lm.tokenizer, contexts, pset.options, prefix=task.option_prefix,
                                       reduce=task.option_score, batch_size=settings.batch_size, desc=desc,
                                       show_progress=settings.show_progress)
        for i, ex, user, s in zip(indices, examples, users, scores):
            rows.append(score_classification(ex, user, pset.options, pset.answer_index[i], s))
    else:
        seqs, limit = [], scoring.max_positions(lm.model)
        for ctx, ex in zip(contexts, examples):
            ids = scoring.continuation_ids(lm.tokenizer, ex.reference)
            if not ids:
                raise DataError(f"{ex.where}: empty reference text, nothing to score (task {task.name})")
            if not ctx:  # a bare text: condition on BOS (or EOS) so that its first token is scored too
                ctx = [lm.tokenizer.bos_token_id if lm.tokenizer.bos_token_id is not None else lm.tokenizer.eos_token_id]
            seqs.append(scoring.Scored(scoring.fit_context(ctx, len(ids), limit) + ids, len(ids)))
        lps = scoring.target_logprobs(lm.model, seqs, batch_size=settings.batch_size, desc=desc,
                                      show_progress=settings.show_progress)
        for ex, user, lp in zip(examples, users, lps):
            nll = -float(lp.sum())
            rows.append({"index": ex.index, "input": user, "reference": ex.reference, "tokens": len(lp), "nll": nll,
                         "ce": nll / len(lp), "perplexity": math.exp(nll / len(lp))})
    return rows


def score_generation(task: Task, ex: Example, user: str, prediction: str) -> dict:
    row: dict[str, Any] = {"index": ex.index, "input": user, "prediction": prediction, "reference": ex.reference}
    pred, ref = prediction, ex.reference
    if task.extract != "none":
        pred, ref = extract(task.extract, prediction) or "", extract(task.extract, ex.reference) or ""
        row["extracted_prediction"], row["extracted_reference"] = pred or None, ref or None
    for metric in task.metrics:
        if metric == "rouge_l":
            row["rouge_l"] = M.rouge_l(pred, ref)
        elif metric == "exact_match":
            row["exact_match"] = M.exact_match(pred, ref)
        elif metric == "token_f1":
            row["token_f1"] = M.token_f1(pred, ref)
        elif metric == "accuracy":
            row["accuracy"] = float(bool(ref) and pred == ref)
    if "accuracy" in task.metrics:
        row["correct"] = row["accuracy"] == 1.0
    elif "exact_match" in task.metrics:
        row["correct"] = row["exact_match"] == 1.0
    return row


def score_classification(ex: Example, user: str, options: tuple[str, ...], answer: int, scores: list[float]) -> dict:
    probs = M.softmax(scores)
    chosen = max(range(len(options)), key=lambda j: (scores[j], -j))  # ties: the first option
    return {"index": ex.index, "input": user, "prediction": options[chosen], "reference": options[answer],
            "correct": chosen == answer, "confidence": probs[chosen],
            "option_logprobs": dict(zip(options, scores)), "option_probs": dict(zip(options, probs))}


def aggregate(task: Task, rows: list[dict]) -> dict[str, Optional[float]]:
    """The task's metrics over its rows (classification adds its ECE, perplexity its token count)."""
    if task.type == "classification":
        correct = [r["correct"] for r in rows]
        classes = sorted({r["reference"] for r in rows})
        return {"accuracy": M.accuracy(correct),
                "balanced_accuracy": S.balanced_accuracy([classes.index(r["reference"]) for r in rows], correct),
                "ece": M.expected_calibration_error([r["confidence"] for r in rows], correct)}
    if task.type == "perplexity":
        nll, tokens = sum(r["nll"] for r in rows), sum(r["tokens"] for r in rows)
        out = {"perplexity": M.perplexity(nll, tokens), "ce": M.cross_entropy(nll, tokens)}
        return {m: out[m] for m in task.metrics} | {"tokens": tokens}
    return {m: M.mean(r[m] for r in rows) for m in task.metrics}


# ----------------------------------------------------------------------------- agreement with the teacher


def compute_agreement(teacher: LoadedModel, student: LoadedModel, pt: PreparedTask, teacher_rows: list[dict],
                      settings: EvalSettings, rows: list[dict]) -> Optional[dict]:
    """KL(teacher || student) per token and top-1 agreement on the teacher's answers (generation) or the references;
    per-example values are added to the student's rows. None when the vocabularies differ."""
    from kdlm.evaluation import scoring
    from kdlm.models.compat import shared_vocab_size

    try:
        vocab = shared_vocab_size(teacher.tokenizer, student.tokenizer,
                                  teacher.model.get_output_embeddings().weight.shape[0],
                                  student.model.get_output_embeddings().weight.shape[0])
    except ModelError:
        return None
    task = pt.task
    on_teacher = task.type == "generation" and task.agreement_on == "teacher"
    contexts = student.contexts(pt, [ex.user for ex in pt.main.examples])
    seqs, where = [], []
    for i, (ctx, ex) in enumerate(zip(contexts, pt.main.examples)):
        text = teacher_rows[i]["prediction"] if on_teacher else ex.reference
        if task.type == "classification":
            text = task.option_prefix + pt.main.options[pt.main.answer_index[i]]
        ids = scoring.continuation_ids(student.tokenizer, text)
        if ids:
            limit = min(filter(None, [scoring.max_positions(student.model), scoring.max_positions(teacher.model)]), default=None)
            seqs.append(scoring.Scored(scoring.fit_context(ctx, len(ids), limit) + ids, len(ids)))
            where.append(i)
    totals = scoring.AgreementTotals()
    if seqs:
        per = scoring.agreement(teacher.model, student.model, seqs, vocab=vocab, batch_size=settings.batch_size,
                                desc=f"{student.label}/{task.name} agreement", show_progress=settings.show_progress)
        for i, t in zip(where, per):
            totals.add(t)
            rows[i]["kl_to_teacher"] = t.kl_sum / t.tokens
            rows[i]["top1_agreement"] = t.agree / t.tokens
    out = totals.as_dict()
    out["on"] = "teacher answers" if on_teacher else "references"
    return out


# ----------------------------------------------------------------------------- robustness and OOD


def robustness_for(lm: LoadedModel, pt: PreparedTask, rows: list[dict], settings: EvalSettings, out_dir: Path) -> dict:
    """ASR per perturbation kind over the clean-correct examples; static adversarial sets' metric and drop."""
    task = pt.task
    entry: dict[str, Any] = {}
    if pt.perturbed:
        clean = [bool(r.get("correct")) for r in rows]
        keep = [i for i, c in enumerate(clean) if c]
        results: dict[str, list[Optional[bool]]] = {}
        log_rows = []
        for kind, users in pt.perturbed.items():
            got = run_examples(lm, pt, pt.main, settings, keep, [users[i] for i in keep],
                               desc=f"{lm.label}/{task.name} {kind}") if keep else []
            results[kind] = [None] * len(clean)
            for i, r in zip(keep, got):
                results[kind][i] = bool(r.get("correct"))
                log_rows.append({"kind": kind, **r, "clean_input": rows[i]["input"], "flipped": not r.get("correct")})
        entry.update(summarize_asr(clean, results))
        entry["perturbation"] = {"kinds": list(pt.perturbed), "rate": task.robustness.rate, "seed": settings.seed}
        write_jsonl(out_dir / "robustness" / "predictions.jsonl", log_rows)
    if pt.adversarial:
        primary = task.primary_metric
        clean_value = aggregate(task, rows).get(primary)
        adv = {}
        for name, pset in pt.adversarial.items():
            adv_rows = run_examples(lm, pt, pset, settings, desc=f"{lm.label}/{task.name} adv:{name}")
            value = aggregate(task, adv_rows).get(primary)
            absolute, relative = M.drop(clean_value, value)
            adv[name] = {primary: value, "n": len(adv_rows), "drop": absolute, "relative_drop": relative}
            write_set(out_dir / "adversarial" / name, lm.label, task, adv_rows, aggregate(task, adv_rows))
        entry["adversarial"] = {name: a[primary] for name, a in adv.items()}
        entry["adversarial_drop"] = {name: a["drop"] for name, a in adv.items()}
        entry["adversarial_relative_drop"] = {name: a["relative_drop"] for name, a in adv.items()}
        entry["adversarial_n"] = {name: a["n"] for name, a in adv.items()}
    if entry:
        write_json(out_dir / "robustness" / "metrics.json", entry)
    return entry


def ood_for(lm: LoadedModel, pt: PreparedTask, main_metrics: dict, settings: EvalSettings, out_dir: Path) -> dict:
    task, primary = pt.task, pt.task.primary_metric
    in_value = main_metrics.get(primary)
    entry: dict[str, Any] = {"metric": primary, "in_distribution": in_value, "ood": {}, "drop": {}, "relative_drop": {}}
    for name, pset in pt.ood.items():
        rows = run_examples(lm, pt, pset, settings, desc=f"{lm.label}/{task.name} ood:{name}")
        values = aggregate(task, rows)
        write_set(out_dir / "ood" / name, lm.label, task, rows, values)
        entry["ood"][name] = values.get(primary)
        entry["drop"][name], entry["relative_drop"][name] = M.drop(in_value, values.get(primary))
    return entry


# ----------------------------------------------------------------------------- writing


def _clean(value):
    """JSON-safe: NaN/inf -> None, tuples -> lists, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(_clean(obj), fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(_clean(row), ensure_ascii=False) + "\n")


def write_set(folder: Path, label: str, task: Task, rows: list[dict], values: dict, **extra) -> None:
    write_jsonl(folder / "predictions.jsonl", rows)
    write_json(folder / "metrics.json", {"model": label, "task": task.name, "type": task.type,
                                         "primary_metric": task.primary_metric, "n": len(rows), "metrics": values, **extra})


def _is_number(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def numeric_view(entry: dict) -> dict:
    """The entry as summary.json sections hold it: numbers (or null) and objects of numbers only; descriptive
    extras (strings, lists) stay in the per-task metrics.json."""
    return {k: v for k, v in entry.items()
            if _is_number(v) or (isinstance(v, dict) and all(_is_number(x) for x in v.values()))}


def safe_name(name: str) -> str:
    return re.sub(r"[^\w.+-]", "_", name) or "_"


# ----------------------------------------------------------------------------- the whole evaluation


def check_output(settings: EvalSettings) -> Path:
    out = Path(settings.output)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if (out / "summary.json").exists() and not settings.overwrite:
        raise OutputError(f"{out}: already holds an evaluation (summary.json); pass --overwrite or choose another --output")
    return out


def _say(settings: EvalSettings, text: str) -> None:
    if settings.show_progress:
        print(f"kdlm eval: {text}", file=sys.stderr, flush=True)


def run_evaluation(settings: EvalSettings) -> dict:
    """Evaluate every model on every task; returns the summary (also written to OUT/summary.json)."""
    from kdlm.evaluation import efficiency as E
    from kdlm.evaluation import harness as H
    from kdlm.models.loading import DTYPES, resolve_device, resolve_dtype

    # --- every check before the first model is loaded
    if settings.limit is not None and settings.limit < 1:
        raise ConfigError(f"--limit must be >= 1 (got {settings.limit})")
    if settings.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1 (got {settings.batch_size})")
    if settings.max_new_tokens is not None and settings.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1 (got {settings.max_new_tokens})")
    if settings.sample and not settings.temperature > 0:
        raise ConfigError(f"--temperature must be > 0 (got {settings.temperature})")
    if settings.dtype != "auto" and settings.dtype not in DTYPES:
        raise ConfigError(f"--dtype {settings.dtype!r}: use auto, {', '.join(DTYPES)}")
    if not settings.tasks and not settings.harness:
        raise ConfigError("give at least one --task (or --harness TASKS)")
    out = check_output(settings)
    tasks = [resolve_task(t) for t in settings.tasks]
    names = [t.name for t in tasks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"task {dup!r} is given twice")
    prepared = [prepare_task(t, settings) for t in tasks]
    entries = resolve_models(list(settings.models), settings.teacher)
    if settings.harness:
        H.require_lm_eval()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device, trainable=False)
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    from kdlm.evaluation.judge import open_judge

    judge = open_judge(settings)  # None without --judge-url; the server and model are checked here

    summary: dict[str, Any] = {
        "kdlm_eval_version": SUMMARY_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "reference": entries[0].label,
        "models": [],
        "tasks": [{"name": p.name, "type": p.task.type, "primary_metric": p.task.primary_metric,
                   "limit": effective_limit(settings, p.task),
                   "n": len(p.main.examples), "file": p.task.file, "description": p.task.description,
                   **({"majority_baseline": S.majority_baseline(p.main.answer_index)}
                      if p.task.type == "classification" else {})} for p in prepared],
        "intervals": {},  # label -> task -> metric -> {ci_low, ci_high}: bootstrap 95% over examples
        **{section: {} for section in SECTIONS},
        "settings": {"limit": settings.limit, "batch_size": settings.batch_size, "max_new_tokens": settings.max_new_tokens,
                     "sample": settings.sample, "temperature": settings.temperature if settings.sample else None,
                     "seed": settings.seed, "dtype": dtype_name, "data_dir": str(settings.data_dir),
                     "robustness": settings.robustness, "efficiency": settings.efficiency},
        "kdlm_version": __version__,
        "notes": [],
    }
    if settings.robustness:
        for pt in prepared:
            if not (pt.perturbed or pt.adversarial or pt.ood):
                why = ("its robustness is off in the task file" if not pt.task.robustness.enabled else
                       "its examples are not simply right or wrong (no accuracy/exact_match)")
                summary["notes"].append(f"{pt.name}: no perturbations, OOD or adversarial sets: {why}")
    if judge is not None:
        judge.annotate(summary, prepared, entries)
    reference = reference_summary(settings, entries[0], prepared)
    if reference is not None:
        summary["notes"].append(f"{entries[0].label}: figures reused from {settings.reference_from}")
    out.mkdir(parents=True, exist_ok=True)
    teacher: Optional[LoadedModel] = None
    teacher_rows: dict[str, list[dict]] = {}

    for k, entry in enumerate(entries):
        role = "reference" if k == 0 else "student"
        _say(settings, f"[{k + 1}/{len(entries)}] {entry.label} ({role}): loading {entry.given}")
        lm = load(entry, device, dtype, settings)
        summary["notes"] += lm.notes
        summary["models"].append({"label": entry.label, "path": entry.path, "parameters": E.parameter_count(lm.model),
                                  "disk_mb": E.disk_mb(entry.source.path, entry.source.gguf_file),
                                  "source": entry.source.path, "role": role})
        reused = reference if k == 0 else None
        for pt in prepared:
            task_dir = out / safe_name(entry.label) / safe_name(pt.name)
            if reused is not None:
                rows = read_jsonl(Path(settings.reference_from) / safe_name(entry.label) / safe_name(pt.name)
                                  / "predictions.jsonl")
            else:
                rows = run_examples(lm, pt, pt.main, settings)
            values = aggregate(pt.task, rows)
            summary["results"].setdefault(entry.label, {})[pt.name] = {**values, "n": len(rows)}
            extra: dict[str, Any] = {}
            if k == 0:
                teacher_rows[pt.name] = rows
            elif teacher is not None:
                agree = compute_agreement(teacher, lm, pt, teacher_rows[pt.name], settings, rows)
                if agree is None:
                    note = f"{entry.label}: its tokenizer differs from {teacher.label}'s; no token-level agreement"
                    if note not in summary["notes"]:
                        summary["notes"].append(note)
                else:
                    agree["ece"] = values.get("ece") if pt.task.type == "classification" else None
                    summary["agreement"].setdefault(entry.label, {})[pt.name] = numeric_view(agree)
                    extra["agreement"] = agree
                if judge is not None and pt.task.type == "generation":
                    judged = judge.judge_task(pt, teacher_rows[pt.name], rows, task_dir, label=entry.label)
                    summary["judge"].setdefault(entry.label, {})[pt.name] = numeric_view(judged)
                    extra["judge"] = judged
            if reused is not None:
                for section in ("robustness", "ood"):
                    if pt.name in reused.get(section, {}).get(entry.label, {}):
                        summary[section].setdefault(entry.label, {})[pt.name] = reused[section][entry.label][pt.name]
            elif settings.robustness:
                if pt.perturbed or pt.adversarial:
                    rob = robustness_for(lm, pt, rows, settings, task_dir)
                    summary["robustness"].setdefault(entry.label, {})[pt.name] = numeric_view(rob)
                    extra["robustness"] = rob
                if pt.ood:
                    ood = ood_for(lm, pt, values, settings, task_dir)
                    summary["ood"].setdefault(entry.label, {})[pt.name] = numeric_view(ood)
                    extra["ood"] = ood
            intervals = S.intervals_for_rows(pt.task.type, pt.task.metrics, rows, pt.main.options, seed=settings.seed)
            summary["intervals"].setdefault(entry.label, {})[pt.name] = {
                m: {"ci_low": lo, "ci_high": hi} for m, (lo, hi) in intervals.items()}
            extra["intervals"] = intervals
            write_set(task_dir, entry.label, pt.task, rows, values, **extra,
                      settings={"max_new_tokens": pt.max_new_tokens, **summary["settings"]})
        if settings.efficiency and reused is not None and entry.label in reused.get("efficiency", {}):
            summary["efficiency"][entry.label] = reused["efficiency"][entry.label]
        elif settings.efficiency:
            _say(settings, f"{entry.label}: measuring latency, throughput and memory")
            figures = E.measure(lm.model, lm.tokenizer, path=entry.source.path, gguf_file=entry.source.gguf_file,
                                dtype=dtype_name, batch_size=settings.batch_size,
                                trust_remote_code=settings.trust_remote_code)
            summary["efficiency"][entry.label] = numeric_view(figures)
        if k == 0 and len(entries) > 1:
            teacher = lm
        else:
            del lm
            _free()
    teacher = None
    _free()

    if settings.efficiency:
        ref = summary["efficiency"].get(entries[0].label, {})
        for entry in entries[1:]:
            summary["efficiency"][entry.label]["ratios"] = E.ratios(summary["efficiency"][entry.label], ref)
    summary["retention"] = retention_table(summary["results"], entries[0].label)
    if settings.harness:
        _say(settings, f"running lm-evaluation-harness tasks {', '.join(settings.harness)}")
        summary["harness"] = H.run_harness([(e.label, e.source.path, e.source.gguf_file) for e in entries],
                                           settings.harness, limit=settings.limit, device=str(device),
                                           batch_size=settings.batch_size, dtype=dtype_name)
    write_json(out / "summary.json", summary)
    return _clean(summary)


def reference_summary(settings: EvalSettings, entry: ModelEntry, prepared: list[PreparedTask]) -> Optional[dict]:
    """The summary of `settings.reference_from`, checked to hold the reference model's predictions for every task
    under the same settings; None without --reference-from. Mismatches are a ConfigError naming the field."""
    if settings.reference_from is None:
        return None
    folder = Path(settings.reference_from)
    path = folder / "summary.json"
    if not path.is_file():
        raise ConfigError(f"--reference-from {folder}: no summary.json there (not a `kdlm eval` folder)")
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable JSON ({err})") from None
    if entry.label not in old.get("results", {}):
        raise ConfigError(f"--reference-from {folder}: holds no results of the reference model {entry.label!r} "
                          f"(it has {', '.join(old.get('results', {})) or 'none'})")
    mine = {"limit": settings.limit, "max_new_tokens": settings.max_new_tokens, "sample": settings.sample,
            "seed": settings.seed, "robustness": settings.robustness, "data_dir": str(settings.data_dir)}
    for key, value in mine.items():
        if old.get("settings", {}).get(key) != value:
            raise ConfigError(f"--reference-from {folder}: was evaluated with {key}={old.get('settings', {}).get(key)!r}, "
                              f"this evaluation uses {key}={value!r}")
    for pt in prepared:
        if pt.name not in old["results"][entry.label]:
            raise ConfigError(f"--reference-from {folder}: has no task {pt.name!r} for {entry.label}")
        rows = folder / safe_name(entry.label) / safe_name(pt.name) / "predictions.jsonl"
        if not rows.is_file():
            raise DataError(f"{rows}: missing (needed by --reference-from)")
    return old


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as err:
                    raise DataError(f"{path}: line {n} is not valid JSON ({err})") from None
    return rows


def retention_table(results: dict, reference: str) -> dict:
    """retention[label][task][metric] = 100 * student / teacher (teacher / student for lower-is-better metrics), on
    the same examples; every model including the reference (100 by definition)."""
    ref = results.get(reference, {})
    table: dict[str, dict] = {}
    for label, per_task in results.items():
        for task, values in per_task.items():
            for metric, value in values.items():
                if metric in ("n", "tokens") or task not in ref or metric not in ref[task]:
                    continue
                table.setdefault(label, {}).setdefault(task, {})[metric] = M.retention(value, ref[task][metric], metric)
    return table


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
