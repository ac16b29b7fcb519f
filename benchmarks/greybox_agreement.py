"""Grey-box KD from a vLLM server: do the API's top-k log-probs, turned into kdlm's teacher cache, say what the
local teacher says? The server's top-1 token is compared with the local fp32 teacher's argmax at every cached
position, and a short distillation trains from the cache.

    scripts/vllm_cpu_server.sh start <bundled teacher HF folder>
    .venv/bin/python benchmarks/greybox_agreement.py [--base-url http://127.0.0.1:8765/v1] [--prompts 120]

Writes benchmarks/results/greybox_agreement.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, utc_now, versions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8765/v1")
    ap.add_argument("--prompts", type=int, default=120)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    import numpy as np
    import torch

    from kdlm.cache import CachedTeacher
    from kdlm.cache.capture import capture_teacher
    from kdlm.config import load_recipe
    from kdlm.config.generation import load_generate_recipe
    from kdlm.data import prepare_data
    from kdlm.generation.run import generate
    from kdlm.models import bundled
    from kdlm.models.loading import load_model, load_tokenizer, resolve_source
    from kdlm.training import distill
    from kdlm.training.step import counted_positions

    folder = str(bundled.materialize("smollm2-135m-instruct"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gen = load_generate_recipe(REPO / "kdlm" / "recipes" / "generate" / "greybox-vllm-cpu.yaml", [
            f"teacher.base_url={args.base_url}", f"generate.prompts={REPO / 'kdlm' / 'quickstart' / 'prompts.jsonl'}",
            f"generate.max_prompts={args.prompts}", f"output.dir={tmp / 'gen'}"])
        started = time.perf_counter()
        result = generate(gen, show_progress=False)
        gen_s = time.perf_counter() - started
        manifest = json.loads((result.output_dir / "manifest.json").read_text())
        recipe = load_recipe(REPO / "kdlm" / "recipes" / "greybox-distill-cpu.yaml", [
            f"teacher.model={folder}", f"student.model={folder}", f"data.train={result.output_dir}",
            f"train.max_steps={args.steps}", f"output.dir={tmp / 'run'}"])
        started = time.perf_counter()
        cache_dir = capture_teacher(recipe, show_progress=False, from_logprobs=True)
        cache_s = time.perf_counter() - started

        source = resolve_source(folder)
        tokenizer = load_tokenizer(source)
        model = load_model(source, dtype=torch.float32, device=torch.device("cpu"), frozen=True)
        train, val, _ = prepare_data(recipe.data, tokenizer, seed=recipe.train.seed)
        cache = CachedTeacher(cache_dir, recipe, tokenizer)
        same = in_top5 = total = 0
        with torch.no_grad():
            for ex in train + val:
                mask, _ = counted_positions(torch.tensor([ex.labels]))
                local = model(torch.tensor([ex.input_ids])).logits[:, :-1][mask].argmax(-1).numpy()
                ids, _ = cache.rows(ex.sample_id)
                same += int((ids[:, 0] == local).sum())
                in_top5 += int((ids[:, :5] == local[:, None]).any(1).sum())
                total += len(local)
        run = distill(recipe, show_progress=False)
    results = {
        "machine": machine_info(), "versions": versions("torch", "transformers", "httpx"), "date": utc_now(),
        "server": args.base_url, "prompts": args.prompts, "rows": manifest["rows"],
        "filtered": manifest["counts"].get("filtered", {}), "generate_wall_s": round(gen_s, 1),
        "completion_tokens": result.summary["completion_tokens"], "cache_build_s": round(cache_s, 2),
        "positions": total, "top1_agreement": round(same / total, 4), "local_argmax_in_api_top5": round(in_top5 / total, 4),
        "distill": {"steps": run.steps, "before": run.before, "after": run.after},
    }
    out = REPO / "benchmarks" / "results"
    (out / "greybox_agreement.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"# Grey-box: API top-k log-probs vs the local teacher ({results['date']}, {results['machine']['cpu']})", "",
             f"- {args.prompts} prompts to the vLLM server (top-20 log-probs, greedy, max 96 tokens): {manifest['rows']} rows "
             f"kept, filtered {results['filtered']}; {results['completion_tokens']} tokens in {results['generate_wall_s']} s",
             f"- cache built from the rows in {results['cache_build_s']} s",
             f"- **top-1 agreement with the local fp32 teacher's argmax: {results['top1_agreement']:.1%}** of {total} positions "
             f"(the local argmax is in the API's top 5 at {results['local_argmax_in_api_top5']:.1%})",
             f"- distilled {run.steps} steps from the cache: validation KL to teacher {run.before.get('kl_to_teacher', float('nan')):.3f} "
             f"-> {run.after.get('kl_to_teacher', float('nan')):.3f}, CE {run.before['ce']:.3f} -> {run.after['ce']:.3f}", ""]
    (out / "greybox_agreement.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
