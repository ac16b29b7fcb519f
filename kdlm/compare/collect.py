"""compare.json from the variants' evaluation folders: every metric with its bootstrap 95% interval over examples,
the paired-bootstrap difference of every variant to the baseline, retention against the teacher, the
majority-class baseline of classification sets, and the best variant per metric.

The statistics are recomputed from each model's per-example rows (predictions.jsonl), so the interval is the
interval of the figure `kdlm eval` reports. With several seeds, a variant's per-example columns are averaged over
its seeds before resampling (the interval is over examples; the spread over seeds is reported as `std`).
"""

from __future__ import annotations

import json
import math
import statistics as pystats
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from kdlm.compare.grid import Grid
from kdlm.compare.run import created_now, eval_finished, run_finished, seed_dir, teacher_eval_dir
from kdlm.evaluation import stats as S

COMPARE_VERSION = 1
LOWER = {"perplexity", "ce", "ece", "kl_to_teacher", "asr", "drop", "latency_ms_p50", "latency_ms_p95",
         "peak_memory_mb", "disk_mb", "parameters", "seconds"}
UNRANKED = {"training/steps", "training/counted_tokens"}  # the budget itself, not a quality
EFFICIENCY = ("parameters", "latency_ms_p50", "throughput_tok_s", "peak_memory_mb")
NAMES = {"rouge_l": "ROUGE-L", "token_f1": "token F1", "exact_match": "exact match", "accuracy": "accuracy",
         "balanced_accuracy": "balanced accuracy", "perplexity": "perplexity", "ce": "CE (nats/token)",
         "kl_to_teacher": "KL to teacher (nats/token)", "top1_agreement": "top-1 agreement",
         "judge_win_rate": "judge win rate vs teacher", "asr": "ASR", "drop": "drop"}


def ood_drop(metric: str, in_distribution: float, shifted: float) -> float:
    """How much worse `metric` is on the shifted set, in its own units, > 0 always meaning worse: in - shifted for
    a metric where higher is better (accuracy), shifted - in where lower is (perplexity), so that the smallest drop
    is the most robust variant whatever the task's metric."""
    return shifted - in_distribution if metric in LOWER else in_distribution - shifted


@dataclass
class Source:
    """One model's evaluation folder and the label it has there."""

    folder: Path
    label: str
    summary: dict


def _read_jsonl(path: Path) -> list[dict]:
    """`kdlm eval`'s reader (a bad line is a DataError naming it); a missing file is no rows. Lines end at "\n"
    only: str.splitlines() would also split inside JSON strings at U+2028 and the other line separators."""
    from kdlm.evaluation.run import read_jsonl

    return read_jsonl(path) if path.is_file() else []


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text(encoding="utf-8"))


def _student_source(folder: Path) -> Optional[Source]:
    if not eval_finished(folder):
        return None
    summary = _summary(folder)
    labels = [m["label"] for m in summary["models"] if m.get("role") == "student"]
    return Source(folder, labels[0] if labels else summary["reference"], summary)


def _slug(name: str) -> str:
    from kdlm.evaluation.run import safe_name

    return safe_name(name)


# ----------------------------------------------------------------------------- per-example statistics


def _metric_stats(source: Source, task: dict, subset: Optional[str] = None) -> dict[str, S.Statistic]:
    """key suffix -> Statistic for one model on one task (main set, or `ood:NAME` / `adv:NAME` subset)."""
    folder = source.folder / _slug(source.label) / _slug(task["name"])
    if subset:
        kind, name = subset.split(":", 1)
        folder = folder / ("ood" if kind == "ood" else "adversarial") / _slug(name)
    rows = _read_jsonl(folder / "predictions.jsonl")
    if not rows:
        return {}
    metrics = [m for m in task.get("metrics") or [task["primary_metric"]]]
    out = S.statistics_for_rows(task["type"], metrics, rows)
    if subset:  # agreement is measured on the main set only
        out = {k: v for k, v in out.items() if k not in ("kl_to_teacher", "top1_agreement")}
    if not subset and task["type"] == "generation":
        judged = _read_jsonl(folder / "judge.jsonl")
        if judged:
            per: dict[Any, list[float]] = {}
            for r in judged:
                if r.get("outcome") is not None:
                    per.setdefault(r["index"], []).append(float(r["outcome"]))
            if per:
                out["judge_win_rate"] = S.mean_statistic("judge_win_rate", [sum(v) / len(v) for v in per.values()])
    return out


def _asr_stats(source: Source, task: dict) -> dict[str, S.Statistic]:
    rows = _read_jsonl(source.folder / _slug(source.label) / _slug(task["name"]) / "robustness" / "predictions.jsonl")
    if not rows:
        return {}
    out = {"asr": S.mean_statistic("asr", [float(bool(r["flipped"])) for r in rows])}
    for kind in sorted({r["kind"] for r in rows}):
        out[f"asr:{kind}"] = S.mean_statistic("asr", [float(bool(r["flipped"])) for r in rows if r["kind"] == kind])
    return out


def _average(stats: list[S.Statistic]) -> Optional[S.Statistic]:
    """The statistic on per-example columns averaged over seeds (same examples), or pooled when they differ."""
    stats = [s for s in stats if s is not None and s.n]
    if not stats:
        return None
    if len(stats) == 1:
        return stats[0]
    if len({s.n for s in stats}) == 1:
        cols = tuple(np.mean([s.columns[j] for s in stats], axis=0) for j in range(len(stats[0].columns)))
    else:  # ASR rows: each seed has its own clean-correct examples
        cols = tuple(np.concatenate([s.columns[j] for s in stats]) for j in range(len(stats[0].columns)))
    return S.Statistic(stats[0].name, cols, stats[0].fn)


# ----------------------------------------------------------------------------- the table


def collect(grid: Grid, out: Path, *, resamples: int = S.DEFAULT_RESAMPLES) -> dict:
    """Build (and write) OUT/compare.json from whatever has finished; unfinished variants are `pending`."""
    out = Path(out)
    teacher_src = _student_source(teacher_eval_dir(out))
    if teacher_src is not None:
        teacher_src.label = teacher_src.summary["reference"]
    tasks = _tasks(grid, teacher_src)

    # sources per variant: a list over seeds (baselines have one)
    variants_out, sources = [], {}
    for v in grid.variants:
        entry: dict[str, Any] = {"name": v.name, "role": v.role, "description": v.description,
                                 "overrides": list(v.overrides), "status": "pending", "error": None, "runs": []}
        if v.role == "teacher":
            srcs = [teacher_src] if teacher_src else []
        elif v.role == "initial":
            s = _student_source(out / "baselines" / "initial" / "eval")
            srcs = [s] if s else []
        else:
            srcs, errors, train = [], [], []
            for seed in grid.seeds:
                sd = seed_dir(out, v.name, seed)
                status = _status(sd)
                if status.get("status") == "failed":
                    errors.append(f"seed {seed}: {status.get('error')}" if len(grid.seeds) > 1 else str(status.get("error")))
                s = _student_source(sd / "eval")
                if s is not None and run_finished(sd / "run"):
                    srcs.append(s)
                    entry["runs"].append(str((sd / "run").relative_to(out)))
                    train.append(_training(sd, status))
            if errors:
                entry["status"], entry["error"] = "failed", "; ".join(errors)
            if train:
                entry["train"] = {k: _mean([t.get(k) for t in train]) for k in train[0]}
        if srcs and len(srcs) == (1 if v.role in ("teacher", "initial") else len(grid.seeds)):
            entry["status"] = "done"
            sources[v.name] = srcs
        elif srcs and entry["status"] != "failed":
            entry["status"] = "partial"
        variants_out.append(entry)

    stat_table: dict[str, dict[str, list[S.Statistic]]] = {}  # variant -> key -> per-seed statistics
    point_only: dict[str, dict[str, list[Optional[float]]]] = {}
    for name, srcs in sources.items():
        for src in srcs:
            for task in tasks:
                main = _metric_stats(src, task)
                found = dict(_prefixed(task, main))
                for kind in ("ood", "adversarial"):
                    for set_name in task.get(kind, []):
                        sub = f"{'ood' if kind == 'ood' else 'adv'}:{set_name}"
                        subset = _metric_stats(src, task, sub)
                        found.update(_prefixed(task, subset, sub))
                        ins, shifted = main.get(task["primary_metric"]), subset.get(task["primary_metric"])
                        if kind == "ood" and ins is not None and shifted is not None:
                            key = f"{task['name']}/ood:{set_name}/drop"
                            point_only.setdefault(name, {}).setdefault(key, []).append(
                                ood_drop(task["primary_metric"], ins.point(), shifted.point()))
                found.update(_prefixed(task, _asr_stats(src, task)))
                for key, stat in found.items():
                    stat_table.setdefault(name, {}).setdefault(key, []).append(stat)
            eff = src.summary.get("efficiency", {}).get(src.label, {})
            for m in EFFICIENCY:
                if isinstance(eff.get(m), (int, float)):
                    point_only.setdefault(name, {}).setdefault(f"efficiency/{m}", []).append(float(eff[m]))
        for entry in variants_out:
            if entry["name"] == name and entry.get("train"):
                for m, value in entry["train"].items():
                    if isinstance(value, (int, float)):  # already the mean over seeds
                        point_only.setdefault(name, {})[f"training/{m}"] = [value]

    keys_seen: list[str] = []
    for per in list(stat_table.values()) + list(point_only.values()):
        for key in per:
            if key not in keys_seen:
                keys_seen.append(key)
    order = {"task": 0, "robustness": 1, "ood": 2, "efficiency": 3, "training": 4}
    metric_defs = sorted((_define(k, tasks) for k in keys_seen), key=lambda d: (order[d["group"]], keys_seen.index(d["key"])))

    table: dict[str, dict[str, dict]] = {}
    averaged: dict[str, dict[str, S.Statistic]] = {}
    for name in sources:
        row = {}
        for key, stats in stat_table.get(name, {}).items():
            avg = _average(stats)
            ci = S.bootstrap_ci(avg, resamples=resamples)
            per_seed = [s.point() for s in stats]
            row[key] = {"value": _mean(per_seed) if len(per_seed) > 1 and len({s.n for s in stats}) == 1 else ci["value"],
                        "ci_low": ci["ci_low"], "ci_high": ci["ci_high"], "n": ci["n"],
                        "std": _std(per_seed), "per_seed": per_seed}
            averaged.setdefault(name, {})[key] = avg
        for key, values in point_only.get(name, {}).items():
            row[key] = {"value": _mean(values), "ci_low": None, "ci_high": None, "n": None, "std": _std(values),
                        "per_seed": values}
        table[name] = row

    baseline = grid.baseline if grid.baseline in sources else None
    differences: dict[str, dict] = {}
    if baseline:
        for name in sources:
            if name in (baseline, "teacher"):
                continue
            for key, stat in averaged.get(name, {}).items():
                base = averaged[baseline].get(key)
                if base is None or base.n != stat.n or key.split("/")[-1].startswith("asr"):
                    continue  # ASR rows are each model's own clean-correct examples: not paired
                d = S.paired_bootstrap(stat, base, resamples=resamples)
                differences.setdefault(name, {})[key] = {"vs": baseline, "diff": d["diff"], "ci_low": d["ci_low"],
                                                         "ci_high": d["ci_high"], "significant": d["significant"]}

    defs = {d["key"]: d for d in metric_defs}
    retention: dict[str, dict] = {}
    best: dict[str, str] = {}
    if "teacher" in table:
        for name, row in table.items():
            for key, cell in row.items():
                t = table["teacher"].get(key, {}).get("value")
                if defs[key]["group"] in ("task", "ood") and not key.endswith("/drop") and cell["value"] is not None and t:
                    retention.setdefault(name, {})[key] = _retention(cell["value"], t, defs[key]["higher_is_better"])
    for key, d in defs.items():
        if key in UNRANKED:
            continue
        candidates = [(n, table[n][key]["value"]) for n in table if n != "teacher" and key in table[n]
                      and table[n][key]["value"] is not None]
        if candidates:
            best[key] = (max if d["higher_is_better"] else min)(candidates, key=lambda c: c[1])[0]

    result = {
        "kdlm_compare_version": COMPARE_VERSION,
        "grid": grid.name,
        "grid_file": str(grid.file),
        "description": grid.description,
        "created": created_now(),
        "budget": {"kind": grid.budget.kind, "value": grid.budget.value, "description": _budget_text(grid)},
        "seeds": list(grid.seeds),
        "reference": "teacher",
        "baseline": baseline,
        "variants": variants_out,
        "metrics": metric_defs,
        "table": table,
        "differences": differences,
        "retention": retention,
        "majority_baseline": _majority(tasks, teacher_src),
        "best": best,
        "bootstrap": {"resamples": resamples, "confidence": S.DEFAULT_CONFIDENCE, "method": "percentile; paired for differences"},
        "notes": [],
    }
    result["notes"] += _budget_notes(grid, variants_out)
    _write_json(out / "compare.json", result)
    return result


def _budget_notes(grid: Grid, variants: list[dict]) -> list[str]:
    """A token budget is honoured only if train.max_steps leaves room for it: name the variants that stopped
    at max_steps before spending it (their comparison is not at an equal budget)."""
    notes = []
    if grid.budget.kind != "tokens":
        return notes
    for v in variants:
        tokens = (v.get("train") or {}).get("counted_tokens")
        if tokens is not None and tokens < grid.budget.value:
            notes.append(f"{v['name']}: trained on {tokens:.0f} counted tokens, less than the budget of "
                         f"{grid.budget.value:.0f}: it reached train.max_steps first (raise it in the base recipe)")
    return notes


def _budget_text(grid: Grid) -> str:
    from kdlm.config.load import load_recipe

    try:
        return grid.budget.describe(load_recipe(grid.recipe, list(grid.common)))
    except Exception:  # the description is informative only
        return grid.budget.describe()


def _tasks(grid: Grid, teacher: Optional[Source]) -> list[dict]:
    """The tasks as the teacher's evaluation describes them, with their metrics and OOD/adversarial set names."""
    from kdlm.evaluation.tasks import resolve_task

    out = []
    for spec in grid.eval.tasks:
        t = resolve_task(spec)
        entry = {"name": t.name, "type": t.type, "primary_metric": t.primary_metric, "metrics": list(t.metrics),
                 "ood": list(t.ood) if grid.eval.robustness else [],
                 "adversarial": list(t.adversarial) if grid.eval.robustness else []}
        if teacher is not None:
            info = next((x for x in teacher.summary.get("tasks", []) if x["name"] == t.name), {})
            entry["majority_baseline"] = info.get("majority_baseline")
        out.append(entry)
    return out


def _majority(tasks: list[dict], teacher: Optional[Source]) -> dict[str, float]:
    """Always answering the most frequent class: main sets from the teacher's summary, OOD/adversarial sets
    from the references in the teacher's predictions there."""
    out: dict[str, float] = {}
    for task in tasks:
        if task["type"] != "classification":
            continue
        mb = task.get("majority_baseline") or {}
        for m in ("accuracy", "balanced_accuracy"):
            if mb.get(m) is not None:
                out[f"{task['name']}/{m}"] = mb[m]
        if teacher is None:
            continue
        base = teacher.folder / _slug(teacher.label) / _slug(task["name"])
        for kind, short in (("ood", "ood"), ("adversarial", "adv")):
            for set_name in task.get(kind, []):
                rows = _read_jsonl(base / kind / _slug(set_name) / "predictions.jsonl")
                refs = sorted({r["reference"] for r in rows})
                mb = S.majority_baseline([refs.index(r["reference"]) for r in rows])
                for m in ("accuracy", "balanced_accuracy"):
                    if mb[m] is not None:
                        out[f"{task['name']}/{short}:{set_name}/{m}"] = mb[m]
    return out


def _prefixed(task: dict, stats: dict[str, S.Statistic], sub: Optional[str] = None) -> dict[str, S.Statistic]:
    prefix = task["name"] + (f"/{sub}" if sub else "")
    return {f"{prefix}/{k}": v for k, v in stats.items()}


def _define(key: str, tasks: list[dict]) -> dict:
    parts = key.split("/")
    metric = parts[-1]
    base = metric.split(":")[0]
    if parts[0] in ("efficiency", "training"):
        group, task = parts[0], None
    else:
        task = parts[0]
        group = "robustness" if base == "asr" or (len(parts) == 3 and parts[1].startswith("adv:")) else \
            "ood" if len(parts) == 3 and parts[1].startswith("ood:") else "task"
    bare = base[4:] if base.startswith("val_") else base
    higher = not (bare in LOWER or bare.endswith("_seconds"))
    label = NAMES.get(base, base.replace("_", " "))
    if ":" in metric:
        label += f" ({metric.split(':', 1)[1]})"
    if task:
        label = f"{task}{' ' + parts[1] if len(parts) == 3 else ''} {label}"
    return {"key": key, "task": task, "metric": metric, "higher_is_better": higher, "group": group, "label": label}


def _training(sd: Path, status: dict) -> dict:
    """Training figures of one seed's run: steps, counted tokens, seconds, held-out KL/CE/top-1 after training."""
    run = sd / "run"
    final = json.loads((run / "final_metrics.json").read_text(encoding="utf-8"))
    tokens = 0
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").split("\n"):
        if line.strip():
            rec = json.loads(line)
            tokens += rec.get("counted_tokens", 0) or 0
    after = final.get("after") or {}
    out = {"steps": final.get("steps"), "counted_tokens": tokens, "train_seconds": status.get("distill_seconds")}
    for k in ("ce", "kl_to_teacher", "top1_agreement", "chunk_gap"):
        if isinstance(after.get(k), (int, float)):
            out[f"val_{k}"] = after[k]
    return out


def _status(sd: Path) -> dict:
    try:
        return json.loads((sd / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _std(values: list) -> Optional[float]:
    values = [v for v in values if isinstance(v, (int, float)) and v is not None and math.isfinite(v)]
    return pystats.stdev(values) if len(values) > 1 else None


def _retention(value: float, teacher: float, higher: bool) -> Optional[float]:
    if higher:
        return 100.0 * value / teacher if teacher else None
    return 100.0 * teacher / value if value else None


def _write_json(path: Path, obj: Any) -> None:
    from kdlm.evaluation.run import write_json

    write_json(path, obj)
