"""The distilled student as a plain Hugging Face folder, with a model card.

Only the student's own architecture is saved: no teacher, no objective wrapper, no
projection heads (a DistillKit mistake, PEERS.md #10), so `from_pretrained` loads it
as the ordinary model it is.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from kdlm.losses.objective import STUDENT_TERMS


def save_student_folder(student, tokenizer, target: Path, card: str) -> None:
    """Write safetensors weights, config, generation config, tokenizer and README.md; replace `target` atomically."""
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    student.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(card)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def model_card(recipe: Any, *, steps: int, student_init: str, data_summary: str, before: dict, after: dict,
               teacher_self: dict | None = None) -> str:
    """README.md for the distilled student: teacher, init, data, objective, steps and validation figures."""
    terms = "\n".join(
        f"- `{t.name}` weight {t.weight}" + (f", temperature {t.temperature}" if t.temperature else "") for t in recipe.loss.terms
    )
    rows = [("initial student", before), ("distilled student", after)]
    if "kl_to_teacher" in after:
        table = "| model | CE (nats/token) | KL to teacher | top-1 agreement |\n|---|---|---|---|\n" + "\n".join(
            f"| {name} | {m['ce']:.4f} | {m['kl_to_teacher']:.4f} | {m['top1_agreement']:.2%} |" for name, m in rows
        )
        if teacher_self:
            table += f"\n| teacher | {teacher_self['ce']:.4f} | 0 | 100% |"
        figures = "CE is the student's cross-entropy on the reference tokens; KL is KL(teacher || student) at temperature 1;\nboth"
    elif "chunk_gap" in after:  # across tokenizers: chunk likelihoods instead of a KL over a shared vocabulary
        table = "| model | CE (nats/token) | chunk-likelihood gap to teacher (nats/chunk) |\n|---|---|---|\n" + "\n".join(
            f"| {name} | {m['ce']:.4f} | {m['chunk_gap']:.4f} |" for name, m in rows)
        figures = ("CE is the student's cross-entropy on the reference tokens; the gap is the mean |log p_teacher - "
                   "log p_student| over byte-aligned chunks of the text (docs/concepts/cross_tokenizer.md);\nboth")
    else:  # no term needed the teacher (ce / redi only): it was never loaded, so only CE was measured
        table = "| model | CE (nats/token) |\n|---|---|\n" + "\n".join(f"| {name} | {m['ce']:.4f} |" for name, m in rows)
        figures = "CE is the student's cross-entropy on the reference tokens,"
    uses_teacher = any(t.name not in STUDENT_TERMS for t in recipe.loss.terms)
    teacher = f"`{recipe.teacher.model}`" if uses_teacher else "none loaded (the objective uses the data's tokens only)"
    return f"""---
library_name: transformers
tags: [kdlm, knowledge-distillation]
---
# Distilled student

Made with [kdlm](https://pypi.org/project/kdlm/) by knowledge distillation.

- **Teacher:** {teacher}
- **Student initialisation:** {student_init}
- **Data:** `{recipe.data.train}` ({data_summary})
- **Objective** (default temperature {recipe.loss.temperature}):
{terms}
- **Optimizer steps:** {steps} (batch {recipe.train.batch_size} x accumulation {recipe.train.grad_accum}, learning rate {recipe.train.learning_rate})

## Held-out validation

{table}

{figures} per counted token. The full recipe is in `resolved_config.yaml` of the run folder:

```yaml
{yaml.safe_dump(recipe_dict(recipe), sort_keys=False).strip()}
```
"""


def recipe_dict(recipe: Any) -> dict:
    from kdlm.config import to_dict

    return to_dict(recipe)
