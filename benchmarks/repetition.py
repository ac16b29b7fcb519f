"""Share of repeated word 4-grams in models' greedy answers to the quickstart's held-out prompts.

    python benchmarks/repetition.py RUN/model OTHER/model ...    # HF folders (a run's exported student)

The held-out split is the quickstart recipe's (10% of the 360 prompts, its seed); each model answers every
held-out prompt greedily with at most 64 new tokens, as the quickstart's report does
(`kdlm.evaluation.metrics.repeated_ngram_share`: within each answer, pooled over answers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model folders or names kdlm can load")
    args = parser.parse_args()
    import torch

    from kdlm.config import load_recipe
    from kdlm.data import prepare_data, read_rows
    from kdlm.evaluation.metrics import repeated_ngram_share
    from kdlm.models.generate import generate_chat
    from kdlm.models.loading import load_model, load_tokenizer, resolve_source
    from kdlm.quickstart.run import SAMPLE_TOKENS, TEACHER, recipe_path, teacher_answers

    data = teacher_answers(show_progress=False)
    recipe = load_recipe(recipe_path(), [f"data.train={data}"])
    tokenizer = load_tokenizer(resolve_source(TEACHER))
    _, val_set, _ = prepare_data(recipe.data, tokenizer, seed=recipe.train.seed)
    raw = read_rows(str(data), "train")
    by_location = dict(zip(raw.locations, raw.rows))
    questions = [by_location[ex.sample_id]["messages"][0]["content"] for ex in val_set]
    for name in args.models:
        model = load_model(resolve_source(name), dtype=torch.float32, device=torch.device("cpu"), frozen=True)
        answers = generate_chat(model, tokenizer, questions, max_new_tokens=SAMPLE_TOKENS, show_progress=False)
        print(json.dumps({"model": name, "prompts": len(questions),
                          "repeated_4gram_share": repeated_ngram_share(answers)}), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
