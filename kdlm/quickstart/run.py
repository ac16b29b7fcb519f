"""`kdlm quickstart`: a real distillation on a CPU in minutes.

1. The bundled SmolLM2-135M-Instruct teacher answers the project's own prompts
   (`prompts.jsonl`) with batched greedy generation; the answers are cached, keyed by
   the prompts, the teacher and the generation settings.
2. `recipes/quickstart.yaml` distils the teacher into a 10-of-30-layer student on them.
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

import torch

from kdlm.config import load_recipe
from kdlm.data import prepare_data, read_rows
from kdlm.models import bundled
from kdlm.models.generate import cpu_has_fast_bf16, generate_chat
from kdlm.models.init_student import keep_layers
from kdlm.models.loading import load_model, load_tokenizer, resolve_source
from kdlm.training import distill
from kdlm.training.checkpoint import atomic_write_text

TEACHER = "smollm2-135m-instruct"
GENERATION = {"max_new_tokens": 96, "batch_size": 48, "do_sample": False}


def recipe_path(name: str = "quickstart") -> Path:
    """A recipe shipped with the package (kdlm/recipes/NAME.yaml)."""
    return Path(str(resources.files("kdlm") / "recipes" / f"{name}.yaml"))


def prompts() -> list[dict]:
    return [json.loads(line) for line in (resources.files("kdlm") / "quickstart" / "prompts.jsonl").read_text().splitlines()
            if line.strip()]


def teacher_answers(show_progress: bool = True) -> Path:
    """The quickstart's training data: the teacher's answer to every prompt, as chat messages (cached JSONL)."""
    rows = prompts()
    teacher_dir = bundled.materialize(TEACHER)
    key = hashlib.sha256(json.dumps([rows, teacher_dir.name, GENERATION], sort_keys=True).encode()).hexdigest()[:16]
    path = bundled.cache_root() / "quickstart" / f"answers-{key}.jsonl"
    if path.is_file():
        return path
    source = resolve_source(TEACHER)
    tokenizer = load_tokenizer(source)
    # bf16 generation is ~2.4x faster on CPUs with native bf16; these answers are only data, so its
    # rounding is harmless (the distillation targets are the fp32 teacher's logits).
    dtype = torch.bfloat16 if cpu_has_fast_bf16() or torch.cuda.is_available() else torch.float32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(source, dtype=dtype, device=device, frozen=True)
    answers = generate_chat(model, tokenizer, [r["prompt"] for r in rows], desc="teacher answers",
                            show_progress=show_progress, **GENERATION)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": r["id"], "messages": [{"role": "user", "content": r["prompt"]},
                                                     {"role": "assistant", "content": a}]}) for r, a in zip(rows, answers)]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def run_quickstart(output: Path, *, overrides: list[str] = (), show_progress: bool = True) -> dict:
    """Run the whole quickstart; print and return the comparison table."""
    start = time.perf_counter()
    data_file = teacher_answers(show_progress)
    recipe = load_recipe(recipe_path(), [f"data.train={data_file}", f"output.dir={output}", *overrides])
    result = distill(recipe, show_progress=show_progress)

    # sample answers of the three models on held-out prompts
    source = resolve_source(TEACHER)
    tokenizer = load_tokenizer(source)
    _, val_set, _ = prepare_data(recipe.data, tokenizer, seed=recipe.train.seed)
    teacher_model = load_model(source, dtype=torch.float32, device=torch.device("cpu"), frozen=True)
    teacher_self = {"ce": result.after["teacher_ce"], "kl_to_teacher": 0.0, "top1_agreement": 1.0}
    initial = copy.deepcopy(teacher_model)
    keep_layers(initial, recipe.student.keep_layers)
    distilled = load_model(resolve_source(str(result.model_dir)), dtype=torch.float32, device=torch.device("cpu"), frozen=True)

    table = {"initial student": result.before, "distilled student": result.after, "teacher": teacher_self}
    raw = read_rows(str(data_file), "train")
    by_location = dict(zip(raw.locations, raw.rows))
    questions = [by_location[ex.sample_id]["messages"][0]["content"] for ex in val_set[:3]]
    samples = {name: generate_chat(model, tokenizer, questions, max_new_tokens=40, show_progress=False)
               for name, model in (("initial student", initial), ("distilled student", distilled), ("teacher", teacher_model))}
    text = render_report(table, questions, samples, time.perf_counter() - start)
    print(text)
    atomic_write_text(Path(output) / "quickstart_report.md", text)
    return table


def render_report(table: dict, questions: list[str], samples: dict, seconds: float) -> str:
    """The quickstart's closing table and samples, as Markdown (also readable in a terminal)."""
    lines = ["", f"## Quickstart: held-out figures ({seconds / 60:.1f} min in all)", "",
             "| model | CE (nats/token) | KL to teacher | top-1 agreement |", "|---|---|---|---|"]
    for name, m in table.items():
        lines.append(f"| {name} | {m['ce']:.3f} | {m['kl_to_teacher']:.3f} | {m['top1_agreement']:.1%} |")
    lines += ["", "Lower CE and KL are better; the teacher's KL to itself is 0 by definition.", "", "## Sample answers (held-out prompts)", ""]
    for i, question in enumerate(questions):
        lines.append(f"**Prompt:** {question}")
        lines.append("")
        for name, answers in samples.items():
            answer = " ".join(answers[i].split()) or "(empty)"
            lines.append(textwrap.fill(f"- *{name}:* {answer}", width=110, subsequent_indent="  "))
        lines.append("")
    return "\n".join(lines)
