"""A LoRA student against full fine-tuning of the same student (CPU, bundled teacher): trainable parameters,
peak memory, time per step and the held-out KL after a short fixed budget.

    python benchmarks/lora_student.py                      # both runs, 8 steps each
    python benchmarks/lora_student.py --steps 60 --only lora

Teacher: the bundled SmolLM2-135M-Instruct. Student: all 30 of its layers, width-pruned as in
benchmarks/student_init.py's `width` construction (MLP 1536 -> 704 neurons, 3 -> 2 KV groups, 82.5M parameters):
a student cut from the teacher but left unpruned would *be* the teacher (KL 0 before any training), so there
would be nothing to distil. Data: the quickstart's teacher answers (`kdlm.quickstart.run.teacher_answers`),
batch 4, max_length 256, forward_kl 0.9 + ce 0.1 (the quickstart's objective without its hint term); the
width ranking is calibrated on 16 training examples (the construction only has to be the same for both runs).
The default budget (8 steps) is short: it compares cost per step and the first steps' progress, not where
either method converges.

    full    every student parameter trains (AdamW, lr 3e-4: the quickstart's)
    lora    LoRA r=16, alpha 32 on q/k/v/o/gate/up/down (AdamW, lr 2e-3: adapters usually want a higher rate)

Each run is its own subprocess, so its peak RSS (os.wait4's ru_maxrss of that child) is its own. Reported: the
trainable and total parameters, the peak RSS, kdlm plan's estimate of it, seconds per optimizer step (steps 2..N,
the first one includes warm-up), and the validation KL(teacher || student) before and after (the same 4
validation batches for both).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, setting_line, utc_now, versions  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
RUNS = {
    "full": ["student.lora.enabled=false", "train.learning_rate=3.0e-4"],
    "lora": ["student.lora.enabled=true", "student.lora.r=16", "student.lora.alpha=32", "train.learning_rate=2.0e-3"],
}


def overrides(name: str, steps: int, workdir: Path) -> list[str]:
    from kdlm.quickstart.run import teacher_answers

    return [f"data.train={teacher_answers(show_progress=False)}", f"output.dir={workdir / name}",
            "student.keep_layers=null", "student.prune.method=uniform", "student.prune.intermediate_size=704",
            "student.prune.num_key_value_heads=2", "student.prune.calibration_samples=16",
            "loss.terms=[{name: forward_kl, weight: 0.9}, {name: ce, weight: 0.1}]",
            f"train.max_steps={steps}", "train.batch_size=4", "data.max_length=256", "train.warmup_steps=2",
            "train.save_every=0", "train.eval_batches=4", "train.report_to=[]", "train.log_every=1",
            *RUNS[name]]


def worker(name: str, steps: int, workdir: Path, out: Path) -> None:
    """One run in this process; its figures (but not its peak RSS, which the parent reads) go to `out`."""
    import torch

    from kdlm.config import load_recipe
    from kdlm.models.lora import trainable_parameters
    from kdlm.quickstart.run import recipe_path
    from kdlm.training import distill
    from kdlm.training import plan as planner
    from kdlm.training import trainer

    recipe = load_recipe(recipe_path(), overrides(name, steps, workdir))
    planned = planner.estimate(recipe, device=torch.device("cpu"))
    counts: dict = {}
    original = trainer.objective_stage

    def spy(recipe, models, terms):  # the student as trained (the export merges the adapters in place)
        counts["trainable"], counts["total"] = trainable_parameters(models.student)
        return original(recipe, models, terms)

    trainer.objective_stage = spy
    stamps: list[float] = []
    start = time.perf_counter()
    result = distill(recipe, on_step=lambda step: stamps.append(time.perf_counter()), show_progress=False)
    wall = time.perf_counter() - start
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    out.write_text(json.dumps({
        "run": name, "overrides": RUNS[name], "steps": result.steps, "trainable": counts["trainable"],
        "total": counts["total"], "s_per_step": per_step, "wall_s": wall,
        "plan_peak_mb": planned.total_mb, "plan_trainable": planned.trainable_params,
        "before": {k: result.before.get(k) for k in ("ce", "kl_to_teacher", "top1_agreement")},
        "after": {k: result.after.get(k) for k in ("ce", "kl_to_teacher", "top1_agreement")},
        "exported": sorted(p.name for p in result.model_dir.iterdir())}))


def launch(name: str, steps: int, workdir: Path) -> dict:
    """Run `name` in a child process; its figures plus its own peak RSS."""
    out = workdir / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, "--worker", name, "--steps", str(steps),
                             "--workdir", str(workdir)], cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"[lora_student] {name} failed with exit code {proc.returncode}")
    return {**json.loads(out.read_text()), "peak_rss_mb": usage.ru_maxrss / 1024}


def markdown(report: dict) -> str:
    lines = ["# LoRA student against full fine-tuning", "",
             f"{setting_line(report)} Bundled SmolLM2-135M-Instruct teacher; a 30-layer width-pruned student "
             f"(MLP 704, 2 KV groups) cut from it; the quickstart answers, batch 4, max_length 256, "
             f"{report['runs'][0]['steps']} steps; each run in its own process.", "",
             "| student | trainable params | of total | peak RSS MiB | plan MiB | s/step | val KL before | val KL after "
             "| top-1 after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        lines.append(f"| {r['run']} | {r['trainable'] / 1e6:.2f}M | {r['total'] / 1e6:.1f}M | {r['peak_rss_mb']:,.0f} | "
                     f"{r['plan_peak_mb']:,.0f} | {r['s_per_step']:.2f} | {r['before']['kl_to_teacher']:.3f} | "
                     f"{r['after']['kl_to_teacher']:.3f} | {r['after']['top1_agreement']:.1%} |")
    lines += ["", "Learning rates: " + "; ".join(f"{r['run']} {next(o for o in r['overrides'] if 'learning_rate' in o)}"
                                                for r in report["runs"]) +
              ". KL is KL(teacher || student) at temperature 1 per counted token on 4 validation batches (16 "
              "held-out answers). 'plan MiB' is `kdlm plan`'s estimate of the peak; s/step is the mean of steps "
              "2..N (the teacher's forward is included in both)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    parser.add_argument("--steps", type=int, default=8, help="train.max_steps of each run")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kdlm-lora-student"))
    parser.add_argument("--out", type=Path, default=RESULTS / "lora_student", help="results path without suffix")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.workdir, args.workdir / f"{args.worker}.json")
        return
    started = time.perf_counter()
    runs = []
    for name in args.only.split(","):
        print(f"[lora_student] {name}", file=sys.stderr, flush=True)
        runs.append(launch(name, args.steps, args.workdir))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    report = {"date": utc_now(), "machine": machine_info(), "versions": versions("torch", "transformers", "peft", "kdlm"),
              "wall_s": time.perf_counter() - started, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
