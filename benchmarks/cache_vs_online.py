"""Training from the offline teacher cache vs with the live teacher (issue: cache >= 1.5x live tokens/s).

Both runs use the quickstart pair (SmolLM2-135M-Instruct teacher, 10-of-30-layer student) and
the quickstart's teacher-answered instructions, kdlm's defaults (fused loss, bf16 autocast
where the CPU has it, here with packing), the same steps and data order; only
`teacher.source` differs. Each run is a fresh process; the capture is timed on its own.

    python benchmarks/cache_vs_online.py [--steps 10] [--k 64]
Writes benchmarks/results/cache_vs_online.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, matmul_gflops, model_shape, step_flops, utc_now, versions  # noqa: E402


def kdlm(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "kdlm", *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])


def timed_speed(run: Path) -> dict:
    """Counted tokens/s over steps 2..N (the first step warms up) from metrics.jsonl, and rows x width per step."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r]
    seconds = steps[-1]["time"] - steps[0]["time"]
    counted = sum(r["counted_tokens"] for r in steps[1:])
    return {"tokens_per_s": counted / seconds, "seconds": seconds, "counted_tokens": counted,
            "steps_timed": len(steps) - 1, "peak_rss_mb": json.loads((run / "final_metrics.json").read_text())["memory"]["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--k", type=int, default=64)
    args = parser.parse_args()

    from kdlm.data import prepare_data
    from kdlm.data.packing import pack_examples
    from kdlm.config import load_recipe
    from kdlm.models.bundled import materialize
    from kdlm.models.loading import load_tokenizer, resolve_source
    from kdlm.quickstart.run import teacher_answers

    data = teacher_answers(show_progress=False)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        common = [f"data.train={data}", "data.validation_fraction=0", "data.packing=true", "data.pack_length=512",
                  "train.batch_size=2", f"train.max_steps={args.steps}", "train.save_every=0", "train.log_every=1",
                  "train.report_to=[]", f"teacher.cache_dir={cache}", f"teacher.cache_top_k={args.k}"]
        flags = [x for s in common for x in ("--set", s)]
        start = time.perf_counter()
        kdlm("cache-teacher", "recipes/quickstart.yaml", *flags, "--no-progress")
        results["capture_seconds"] = time.perf_counter() - start
        manifest = json.loads((cache / "manifest.json").read_text())
        shard_bytes = sum(p.stat().st_size for p in cache.glob("shard-*") if not p.name.endswith(".json"))
        positions = manifest["positions"]
        results["cache_store"] = {"k": args.k, "positions": positions, "shard_bytes": shard_bytes,
                            "bytes_per_token": shard_bytes / positions if positions else None,
                            "index_and_manifest_bytes": sum(p.stat().st_size for p in cache.iterdir()) - shard_bytes}
        for name, source in (("live", "live"), ("cache", "cache")):
            out = Path(tmp) / f"run-{name}"
            kdlm("distill", "recipes/quickstart.yaml", *flags, "--set", f"teacher.source={source}",
                 "--set", f"output.dir={out}", "--no-progress")
            results[name] = timed_speed(out)

    # FLOP model: packed rows of pack_length computed per micro-batch, LM head on counted tokens only
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", common)
    tokenizer = load_tokenizer(resolve_source(recipe.student.model))
    train, _, _ = prepare_data(recipe.data, tokenizer, seed=recipe.train.seed)
    packed = pack_examples(train, 512)
    teacher_shape = model_shape(materialize("smollm2-135m-instruct"))
    student_shape = teacher_shape.__class__(teacher_shape.body_params // 3, teacher_shape.head_params, 10,
                                            teacher_shape.attn_dim)  # 10 of 30 equal blocks
    width = max(len(r.input_ids) for r in packed)
    counted_per_row = sum(sum(l != -100 for l in ex.labels[1:]) for ex in train) / len(packed)
    per_row = step_flops(teacher_shape, student_shape, 1, width, int(counted_per_row))
    peak = {"fp32": matmul_gflops("fp32"), "bf16": matmul_gflops("bf16")}
    for name in ("live", "cache"):
        rows_per_s = results[name]["tokens_per_s"] / counted_per_row
        flop = per_row["total"] if name == "live" else per_row["student"]
        results[name]["achieved_gflops"] = rows_per_s * flop / 1e9
        results[name]["share_of_bf16_peak"] = results[name]["achieved_gflops"] / peak["bf16"]
    results["speedup"] = results["cache"]["tokens_per_s"] / results["live"]["tokens_per_s"]
    results.update({"date": utc_now(), "machine": machine_info(), "matmul_peak_gflops": peak,
                    "versions": versions("torch", "transformers", "accelerate", "kdlm"), "steps": args.steps})
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "cache_vs_online.json").write_text(json.dumps(results, indent=2))
    m, c = results["machine"], results["cache_store"]
    md = [
        "# Training from the teacher cache vs the live teacher", "",
        f"{m['cpu']}, {m['cores_usable']} cores; matmul peak {peak['fp32']:.0f} GFLOP/s fp32, {peak['bf16']:.0f} bf16; "
        f"torch {results['versions']['torch']}; {results['date']}.",
        f"Quickstart pair and data, packed rows of <= 512 tokens, batch 2 rows, {args.steps} steps (first not timed), "
        "kdlm defaults (fused loss, bf16 autocast).", "",
        "| teacher | counted tokens/s | achieved GFLOP/s | share of bf16 matmul peak | peak RSS |", "|---|---:|---:|---:|---:|",
    ]
    for name in ("live", "cache"):
        r = results[name]
        md.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['achieved_gflops']:.0f} | {r['share_of_bf16_peak']:.0%} "
                  f"| {r['peak_rss_mb']:,.0f} MiB |")
    md += ["", f"Speed-up from the cache: **{results['speedup']:.2f}x**. Capture: {results['capture_seconds']:.0f} s "
           f"for {c['positions']:,} positions; **{c['bytes_per_token']:.1f} bytes per cached token** at k = {args.k} "
           f"(V = 49,152; plus {c['index_and_manifest_bytes'] / 1024:.0f} KiB of index and manifest).",
           "", "FLOP model: teacher forward 2N per token + LM head on counted tokens; student forward + backward 3x that "
           "(benchmarks/_common.py). The cached run does no teacher FLOP."]
    (out_dir / "cache_vs_online.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
