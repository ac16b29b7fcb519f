"""Distilling step-by-step end to end on the bundled SmolLM2 teacher: kdlm generate (cot inline, transformers
backend) -> step_by_step rows -> kdlm distill with the rows' weights. And the quickstart's teacher text path."""

from __future__ import annotations

import json

import pytest

from kdlm.config import from_dict, load_recipe
from kdlm.config.generation import GenerateRecipe
from kdlm.generation.run import generate

pytestmark = pytest.mark.slow

EASY = [("What is 2 + 2?", 4), ("What is 3 + 5?", 8), ("What is 10 - 4?", 6), ("What is 2 times 3?", 6)]


def test_step_by_step_generate_then_distill_on_the_bundled_teacher(tmp_path):
    from kdlm.data import read_rows
    from kdlm.training import distill

    prompts = tmp_path / "q.jsonl"
    prompts.write_text("".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n" for q, a in EASY))
    gen = from_dict(GenerateRecipe, {
        "teacher": {"backend": "transformers", "model": "smollm2-135m-instruct", "batch_size": 8},
        "generate": {"pipeline": "step_by_step", "prompts": str(prompts), "n": 4, "temperature": 0.7,
                     "max_new_tokens": 64, "max_rounds": 2, "alpha": 0.3, "concurrency": 8},
        "output": {"dir": str(tmp_path / "sbs")}})
    result = generate(gen, show_progress=False)
    rows = read_rows(str(result.output_dir), "train").rows
    assert rows, f"no verified rationale among {result.summary['cot_samples']} samples"
    labels = [r for r in rows if r["task"] == "label"]
    rationales = [r for r in rows if r["task"] == "rationale"]
    assert len(labels) == len(rationales) == result.summary["verified_samples"]
    assert all(r["weight"] == 0.3 and r["messages"][0]["content"].startswith("[label] ") for r in labels)
    assert all(r["weight"] == pytest.approx(0.7) and r["messages"][0]["content"].startswith("[rationale] ")
               for r in rationales)
    recipe = load_recipe(None, [
        "student.model=smollm2-135m-instruct", "student.keep_layers=4", "teacher.model=/nonexistent/teacher",
        f"data.train={result.output_dir}", "data.format=messages", "data.weight_field=weight",
        "data.validation_fraction=0.0", "loss.terms=[{name: ce, weight: 1.0}]", "train.max_steps=2",
        "train.batch_size=4", "train.report_to=[]", f"output.dir={tmp_path / 'run'}"])
    run = distill(recipe, show_progress=False)  # ce only: the (nonexistent) teacher is never loaded
    assert run.steps == 2 and (run.output_dir / "model" / "config.json").is_file()
