"""The output of `kdlm generate`: a dataset folder that `kdlm distill` reads as `data.train`.

    data-00000.jsonl ...   the rows, in prompt order (JSONL shards of output.shard_rows rows)
    manifest.json          {"format": "kdlm-dataset", "shards": [...], "rows", "complete", counts, teacher, ...}
    README.md              the dataset card: what made it, its columns, how to train on it
    failed.jsonl           requests that finally failed (status, message, attempts); a re-run retries them
    filtered.jsonl         rows a hygiene filter dropped, each with the filter's reason
    summary.json           the closing figures (requests, tokens/s, cached/failed/retried, wall time)
    resolved_config.yaml   the recipe, resolved
    rows.log.jsonl         the append-only row log the shards are built from
    request_cache/         the content-addressed request cache (shareable: generate.cache_dir)

Shards and manifest are written through temporary files and renamed, the manifest last: a reader sees
the old dataset or the new one, never half of one.
"""

from __future__ import annotations

import datetime
import json
from collections import Counter
from pathlib import Path
from typing import Any

from kdlm.data.sources import DATASET_FORMAT, DATASET_MANIFEST
from kdlm.generation.store import atomic_write_text

FORMAT_VERSION = 1
TOKENIZER_FILTERS = ("end_of_turn", "same_tokens")  # filters that get the student's tokenizer


def shard_name(i: int) -> str:
    return f"data-{i:05d}.jsonl"


def _order(row: dict) -> tuple:
    order = (row.get("provenance") or {}).get("order") or [0, 0, ""]
    return (int(order[0]), int(order[1]), str(order[2]), row["id"])


def write_dataset(out: Path, recipe, rows: list[dict], summary: dict, *, pipeline, complete: bool) -> int:
    """Filter, order and shard `rows` into `out`; write manifest and card. Returns the number of rows written."""
    rows = sorted(rows, key=_order)
    rows, dropped = apply_filters(recipe, rows)
    filtered_path = out / "filtered.jsonl"
    if dropped:
        atomic_write_text(filtered_path, "".join(json.dumps({"reason": reason, "row": row}, ensure_ascii=False) + "\n"
                                                 for row, reason in dropped))
    else:
        filtered_path.unlink(missing_ok=True)
    per = recipe.output.shard_rows
    names = []
    for i in range(0, max(len(rows), 1), per):
        name = shard_name(i // per)
        atomic_write_text(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[i:i + per]))
        names.append(name)
    for stale in out.glob("data-*.jsonl"):
        if stale.name not in names:
            stale.unlink()
    counts: dict[str, Any] = {"filtered": dict(Counter(reason.split(":")[0] for _, reason in dropped))}
    for column in ("verdict", "task"):
        values = Counter(r.get(column) for r in rows if r.get(column) is not None)
        if values:
            counts[column] = dict(values)
    finish = Counter((r.get("provenance") or {}).get("finish_reason") for r in rows)
    counts["finish_reason"] = {str(k): v for k, v in finish.items()}
    manifest = {
        "format": DATASET_FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": complete,
        "shards": names,
        "rows": len(rows),
        "pipeline": recipe.generate.pipeline,
        "teacher": summary.get("teacher"),
        "sampling": {"max_new_tokens": recipe.generate.max_new_tokens, "n": recipe.generate.n,
                     "temperature": recipe.generate.temperature, "top_p": recipe.generate.top_p,
                     "top_k": recipe.generate.top_k, "seed": recipe.generate.seed, "logprobs": recipe.generate.logprobs},
        "prompts": recipe.generate.prompts,
        "columns": {"id": "the sample's request key (+ :part)", "messages": "the student's chat, teacher answer last",
                    "provenance": "request key, teacher, sampling, sample index, finish_reason, usage, latency, verdict",
                    **pipeline.columns(),
                    **({"teacher_logprobs": "top-k log-probs of each generated token (grey-box)"}
                       if recipe.generate.logprobs else {})},
        "counts": counts,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(out / "README.md", dataset_card(recipe, manifest, summary))
    atomic_write_text(out / DATASET_MANIFEST, json.dumps(manifest, indent=1) + "\n")  # last: the completion record
    return len(rows)


def check_filters(recipe) -> None:
    """Every filter step names a filter and only options it takes (ConfigError otherwise)."""
    from kdlm.generation.filters import check_filter

    for step in recipe.generate.filters:
        check_filter(step.name, {k: v for k, v in step.options.items() if not (step.name in TOKENIZER_FILTERS and k == "student")})


def apply_filters(recipe, rows: list[dict]) -> tuple[list[dict], list[tuple[dict, str]]]:
    """The recipe's hygiene filters in order; returns (kept, [(row, "filter: reason")])."""
    from kdlm.generation.filters import run_filter

    dropped: list[tuple[dict, str]] = []
    for step in recipe.generate.filters:
        options = dict(step.options)
        if step.name in TOKENIZER_FILTERS and "tokenizer" not in options:
            options["tokenizer"] = _student_tokenizer(recipe, options.pop("student", None))
        rows, out = run_filter(step.name, rows, **options)
        dropped += [(row, f"{step.name}: {reason}") for row, reason in out]
    return rows, dropped


def _student_tokenizer(recipe, name):
    from kdlm.errors import ConfigError
    from kdlm.models.loading import load_tokenizer, resolve_source

    name = name or recipe.teacher.tokenizer or (recipe.teacher.model if recipe.teacher.backend != "openai" else None)
    if not name:
        raise ConfigError("generate.filters: end_of_turn and same_tokens need options.student (the student's tokenizer: hub id, "
                          "folder or bundled alias)")
    return load_tokenizer(resolve_source(name))


def dataset_card(recipe, manifest: dict, summary: dict) -> str:
    g, t = recipe.generate, recipe.teacher
    train = {"train": recipe.output.dir, "format": "messages"}
    if g.pipeline == "step_by_step":
        train["weight_field"] = "weight"
    if g.pipeline == "cot" and g.keep_negatives:
        train["negative_field"] = "negative"
    if g.pipeline == "context":
        train["teacher_messages_field"] = "teacher_messages"
    lines = [
        f"# Teacher-written dataset: `{g.pipeline}`", "",
        f"Written by `kdlm generate` from `{g.prompts}` with the `{t.backend}` teacher `{t.model}` "
        f"(fingerprint `{(summary.get('teacher') or {}).get('fingerprint')}`).",
        "" if manifest["complete"] else "\n**Incomplete**: the run stopped early; re-run the same command to finish it.\n",
        "## Figures", "",
        f"- rows: {manifest['rows']} in {len(manifest['shards'])} shard(s)",
        f"- prompts: {summary.get('prompts')}; samples new / cached / failed: {summary.get('samples_new')} / "
        f"{summary.get('samples_cached')} / {summary.get('samples_failed')}",
        f"- completion tokens this run: {summary.get('completion_tokens')}, {summary.get('completion_tokens_per_s')} tokens/s, "
        f"wall {summary.get('wall_s')} s",
    ]
    if "verified_fraction" in summary:
        lines.append(f"- verified: {summary['verified_fraction']:.1%} of {summary.get('cot_samples')} rationales; "
                     f"{summary.get('questions_verified_fraction', 0):.1%} of questions have one")
    for key, values in manifest["counts"].items():
        if values:
            lines.append(f"- {key}: " + ", ".join(f"{k} {v}" for k, v in sorted(values.items())))
    lines += ["", "## Sampling", "", "```json", json.dumps(manifest["sampling"], indent=1), "```", "",
              "## Columns", ""]
    lines += [f"- `{k}`: {v}" for k, v in manifest["columns"].items()]
    lines += ["", "## Train on it", "", "```yaml", "data: " + json.dumps(train), "loss: [{name: ce, weight: 1.0}]"
              + ("   # add {name: redi} to learn from the negatives" if "negative_field" in train else ""),
              "```", "",
              "The texts are the teacher's outputs; their licence follows the teacher's terms of use and the prompts' licence.", ""]
    return "\n".join(lines)
