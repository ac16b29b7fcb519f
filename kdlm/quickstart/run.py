"""`kdlm quickstart`: a real distillation on a CPU in minutes.

1. The bundled SmolLM2-135M-Instruct teacher answers the project's own prompts
   (`prompts.jsonl`) through `kdlm generate`'s `responses` pipeline (transformers backend,
   batched greedy generation); the dataset folder is cached, keyed by the prompts, the
   teacher and the generation settings.
2. `recipes/quickstart.yaml` distils the teacher into 15 of its 30 layers, chosen by block influence
   (81.4M of 134.5M parameters), on them.
3. A table compares initial student, distilled student and teacher on the held-out
   split (CE, KL to teacher, top-1 agreement), with sample answers side by side.
"""

from __future__ import annotations

import copy
import hashlib
import json
import textwrap
import time
from importlib import resources
from pathlib import Path
from typing import Optional

import torch

from kdlm.config import load_recipe
from kdlm.data import prepare_data, read_rows
from kdlm.evaluation.metrics import repeated_ngram_share
from kdlm.models import bundled
from kdlm.models.generate import generate_chat
from kdlm.models.loading import load_model, load_tokenizer, resolve_source
from kdlm.training import distill
from kdlm.training.trainer import build_student
from kdlm.training.checkpoint import atomic_write_text

TEACHER = "smollm2-135m-instruct"
GENERATION = {"max_new_tokens": 96, "batch_size": 48, "do_sample": False}
SAMPLE_TOKENS = 64  # greedy tokens per held-out answer in the report


def recipe_path(name: str = "quickstart") -> Path:
    """A recipe shipped with the package (kdlm/recipes/NAME.yaml)."""
    return Path(str(resources.files("kdlm") / "recipes" / f"{name}.yaml"))


def prompts() -> list[dict]:
    return [json.loads(line) for line in (resources.files("kdlm") / "quickstart" / "prompts.jsonl").read_text().splitlines()
            if line.strip()]


def teacher_answers(show_progress: bool = True) -> Path:
    """The quickstart's training data: the teacher's answer to every prompt, written by `kdlm generate`'s
    `responses` pipeline with the `transformers` backend (the one code path for teacher text), into a cached
    dataset folder keyed by the prompts, the teacher and the generation settings."""
    from kdlm.config import from_dict
    from kdlm.config.generation import GenerateRecipe
    from kdlm.generation.run import generate

    prompt_file = resources.files("kdlm") / "quickstart" / "prompts.jsonl"
    rows = prompts()
    teacher_dir = bundled.materialize(TEACHER)
    key = hashlib.sha256(json.dumps([rows, teacher_dir.name, GENERATION], sort_keys=True).encode()).hexdigest()[:16]
    out = bundled.cache_root() / "quickstart" / f"answers-{key}"
    if (out / "manifest.json").is_file() and json.loads((out / "manifest.json").read_text()).get("complete"):
        return out
    # greedy, all prompts queued at once (concurrency = their number) so the batches are cut from the
    # length-sorted whole, 48 prompts each; bf16 where the CPU has it (the answers are only data: the
    # distillation targets are the fp32 teacher's logits)
    recipe = from_dict(GenerateRecipe, {
        "teacher": {"backend": "transformers", "model": TEACHER, "batch_size": GENERATION["batch_size"]},
        "generate": {"pipeline": "responses", "prompts": str(prompt_file), "max_new_tokens": GENERATION["max_new_tokens"],
                     "temperature": 0.0, "concurrency": len(rows)},
        "output": {"dir": str(out), "overwrite": True}})
    generate(recipe, show_progress=show_progress)
    return out


def run_quickstart(output: Path, *, overrides: list[str] = (), show_progress: bool = True) -> dict:
    """Run the whole quickstart; print and return the comparison table."""
    start = time.perf_counter()
    data_file = teacher_answers(show_progress)
    recipe = load_recipe(recipe_path(), [f"data.train={data_file}", f"output.dir={output}", *overrides])
    result = distill(recipe, show_progress=show_progress)

    # sample answers of the three models on held-out prompts
    source = resolve_source(TEACHER)
    tokenizer = load_tokenizer(source)
    train_set, val_set, _ = prepare_data(recipe.data, tokenizer, seed=recipe.train.seed)
    teacher_model = load_model(source, dtype=torch.float32, device=torch.device("cpu"), frozen=True)
    teacher_self = {"ce": result.after["teacher_ce"], "kl_to_teacher": 0.0, "top1_agreement": 1.0}
    initial = copy.deepcopy(teacher_model)
    build_student(recipe, initial, train_set + val_set)  # the same cut as the run's (same calibration rows)
    distilled = load_model(resolve_source(str(result.model_dir)), dtype=torch.float32, device=torch.device("cpu"), frozen=True)

    table = {"initial student": result.before, "distilled student": result.after, "teacher": teacher_self}
    raw = read_rows(str(data_file), "train")
    by_location = dict(zip(raw.locations, raw.rows))
    questions = [by_location[ex.sample_id]["messages"][0]["content"] for ex in val_set]
    # every held-out prompt, for the repetition figure; the first three are shown
    answers = {name: generate_chat(model, tokenizer, questions, max_new_tokens=SAMPLE_TOKENS, show_progress=False)
               for name, model in (("distilled student", distilled), ("teacher", teacher_model))}
    shown = questions[:3]
    samples = {"initial student": generate_chat(initial, tokenizer, shown, max_new_tokens=SAMPLE_TOKENS,
                                                show_progress=False),
               **{name: texts[:3] for name, texts in answers.items()}}
    repetition = {name: repeated_ngram_share(texts) for name, texts in answers.items()}
    text = render_report(table, shown, samples, time.perf_counter() - start, repetition=repetition,
                         prompts=len(questions), kept=result.kept_layers)
    print(text)
    atomic_write_text(Path(output) / "quickstart_report.md", text)
    return {**table, "repetition": repetition, "kept_layers": result.kept_layers}


def render_report(table: dict, questions: list[str], samples: dict, seconds: float, *,
                  repetition: Optional[dict] = None, prompts: int = 0, kept: Optional[list[int]] = None) -> str:
    """The quickstart's closing table and samples, as Markdown (also readable in a terminal)."""
    lines = ["", f"## Quickstart: held-out figures ({seconds / 60:.1f} min in all)", "",
             "| model | CE (nats/token) | KL to teacher | top-1 agreement |", "|---|---|---|---|"]
    for name, m in table.items():
        lines.append(f"| {name} | {m['ce']:.3f} | {m['kl_to_teacher']:.3f} | {m['top1_agreement']:.1%} |")
    lines += ["", "Lower CE and KL are better; the teacher's KL to itself is 0 by definition."]
    if kept:
        layers = "all of the teacher's layers" if kept == list(range(len(kept))) and len(kept) > 1 else \
            f"layers {', '.join(map(str, kept))} of the teacher's"
        lines += [f"The student started as {layers}, pruned as student.prune says (see its model card)."]
    if repetition:
        shares = ", ".join(f"{name} {share:.1%}" if share is not None else f"{name} n/a" for name, share in repetition.items())
        lines += [f"Repeated 4-grams in the answers to the {prompts} held-out prompts (lower is better): {shares}."]
    lines += ["", "## Sample answers (held-out prompts)", ""]
    for i, question in enumerate(questions):
        lines.append(f"**Prompt:** {question}")
        lines.append("")
        for name, answers in samples.items():
            answer = " ".join(answers[i].split()) or "(empty)"
            lines.append(textwrap.fill(f"- *{name}:* {answer}", width=110, subsequent_indent="  "))
        lines.append("")
    return "\n".join(lines)
