"""How close is `kdlm plan` to what a run then measures? (issue: within +-30% on memory)

For a few settings of the quickstart pair (SmolLM2-135M-Instruct teacher, 10-of-30-layer
student, the quickstart's teacher-answered instructions), run `kdlm plan --json` and then
`kdlm distill` for a few steps, each in its own process, and compare the planned peak
memory with the run's measured peak RSS (final_metrics.json) and the planned speed with
the measured counted tokens/s (steps after the first).

    python benchmarks/plan_accuracy.py [--steps 6]
Writes benchmarks/results/plan_accuracy.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, utc_now, versions  # noqa: E402

SETTINGS = {
    "quickstart (batch 8, fused, bf16 autocast)": [],
    "batch 16, packing, gradient checkpointing": ["train.batch_size=16", "data.packing=true", "data.pack_length=256",
                                                   "train.gradient_checkpointing=true"],
    "batch 4, unfused loss, fp32": ["train.batch_size=4", "loss.fused=false", "train.mixed_precision=no"],
}


def kdlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdlm", *args], capture_output=True, text=True, cwd=REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    from kdlm.quickstart.run import teacher_answers

    data = teacher_answers(show_progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in SETTINGS.items():
            sets = [f"data.train={data}", "data.validation_fraction=0", f"train.max_steps={args.steps}",
                    "train.save_every=0", "train.log_every=1", "train.report_to=[]", *overrides]
            flags = [x for s in sets for x in ("--set", s)]
            plan = kdlm("plan", "recipes/quickstart.yaml", *flags, "--json")
            if plan.returncode:
                raise SystemExit(plan.stderr)
            planned = json.loads(plan.stdout)
            out = Path(tmp) / f"run{len(rows)}"
            run = kdlm("distill", "recipes/quickstart.yaml", *flags, "--set", f"output.dir={out}", "--no-progress")
            if run.returncode:
                raise SystemExit(run.stderr[-2000:])
            measured = json.loads((out / "final_metrics.json").read_text())["memory"]["peak_rss_mb"]
            steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            steps = [r for r in steps if "tokens_per_s" in r]
            timed = steps[1:]  # the first step warms up
            seconds = timed[-1]["time"] - steps[0]["time"]
            speed = sum(r["counted_tokens"] for r in timed) / seconds
            rows.append({"setting": name, "overrides": overrides, "planned_mb": planned["total_mb"],
                         "measured_mb": measured, "memory_error": planned["total_mb"] / measured - 1,
                         "planned_tokens_per_s": planned["tokens_per_s"], "measured_tokens_per_s": speed,
                         "speed_error": planned["tokens_per_s"] / speed - 1, "planned_parts_mb": planned["memory_mb"]})
            print(f"{name}: planned {planned['total_mb']:.0f} MiB, measured {measured:.0f} MiB "
                  f"({rows[-1]['memory_error']:+.0%}); speed planned {planned['tokens_per_s']:.0f}, "
                  f"measured {speed:.0f} tok/s", flush=True)
    result = {"date": utc_now(), "machine": machine_info(), "versions": versions("torch", "transformers", "accelerate"),
              "steps": args.steps, "rows": rows}
    results = REPO / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / "plan_accuracy.json").write_text(json.dumps(result, indent=2))
    m = result["machine"]
    lines = ["# `kdlm plan` against measured runs", "",
             f"{m['cpu']}, {m['cores_usable']} cores; torch {result['versions']['torch']}; {result['date']}. "
             f"Quickstart pair and data, {args.steps} steps per run, each run in its own process.", "",
             "| setting | planned peak | measured peak RSS | error | planned tok/s | measured tok/s | error |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['planned_mb']:,.0f} MiB | {r['measured_mb']:,.0f} MiB | {r['memory_error']:+.0%} "
                     f"| {r['planned_tokens_per_s']:,.0f} | {r['measured_tokens_per_s']:,.0f} | {r['speed_error']:+.0%} |")
    (results / "plan_accuracy.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
