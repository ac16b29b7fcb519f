"""How the student is cut from the teacher, before and after the quickstart's training (CPU, bundled teacher).

    python benchmarks/student_init.py                       # every construction below, the quickstart's steps
    python benchmarks/student_init.py --only bi10,uniform10 --steps 10   # a subset, shorter (not representative)

Teacher and source model: the bundled SmolLM2-135M-Instruct (30 layers). Data: the quickstart's teacher answers
(`kdlm.quickstart.run.teacher_answers`), the quickstart recipe unchanged except for `student.*` (and --steps).
Calibration for the importance scores: the first 64 training examples (the run's own encoded rows).

    uniform10   10 layers, uniform stride (DistilBERT; kdlm's old default)
    bi10/15/20  10 / 15 / 20 layers by block influence (ShortGPT), first layer kept
    rl10        10 layers by removal loss (Minitron's depth ranking)
    width       all 30 layers, MLP 1536 -> 704 neurons and 3 -> 2 KV groups (Minitron width), about the 15-layer size

Reported: parameters, held-out CE / KL to the teacher / top-1 agreement before training (the pruned model as
built) and after the quickstart's budget, the wall time of the pruning and of the training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, setting_line, utc_now, versions  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
CONSTRUCTIONS = {
    "uniform10": {"keep_layers": 10, "prune": {"method": "uniform"}},
    "bi10": {"keep_layers": 10, "prune": {"method": "block_influence"}},
    "rl10": {"keep_layers": 10, "prune": {"method": "removal_loss"}},
    "bi15": {"keep_layers": 15, "prune": {"method": "block_influence"}},
    "bi20": {"keep_layers": 20, "prune": {"method": "block_influence"}},
    "width": {"keep_layers": None, "prune": {"method": "uniform", "intermediate_size": 704, "num_key_value_heads": 2}},
}


def run(name: str, steps: int | None, workdir: Path, extra: list[str]) -> dict:
    from kdlm.config import load_recipe
    from kdlm.models.init_student import parameter_count
    from kdlm.quickstart.run import recipe_path, teacher_answers
    from kdlm.training import distill
    from kdlm.models.loading import load_model, resolve_source

    spec = CONSTRUCTIONS[name]
    overrides = [f"data.train={teacher_answers(show_progress=False)}", f"output.dir={workdir / name}",
                 f"student.keep_layers={json.dumps(spec['keep_layers'])}", "train.save_every=0", "train.report_to=[]"]
    widths = {"intermediate_size": None, "num_key_value_heads": None, "hidden_size": None}  # the recipe's own: off
    overrides += [f"student.prune.{k}={json.dumps(v)}" for k, v in {**widths, **spec["prune"]}.items()]
    if steps:
        overrides.append(f"train.max_steps={steps}")
    recipe = load_recipe(recipe_path(), overrides + extra)
    start = time.perf_counter()
    result = distill(recipe, show_progress=False)
    wall = time.perf_counter() - start
    history = result.history
    import torch

    model = load_model(resolve_source(str(result.model_dir)), dtype=torch.float32, device=torch.device("cpu"), frozen=True)
    prune = json.loads((result.output_dir / "prune_report.json").read_text()) if (
        result.output_dir / "prune_report.json").is_file() else {}
    return {"construction": name, "spec": spec, "parameters": parameter_count(model), "kept_layers": result.kept_layers,
            "prune_seconds": prune.get("seconds"), "steps": result.steps, "wall_s": wall,
            "loop_s": sum(r.get("time/step_s", 0.0) for r in history),
            "before": {k: result.before.get(k) for k in ("ce", "kl_to_teacher", "top1_agreement")},
            "after": {k: result.after.get(k) for k in ("ce", "kl_to_teacher", "top1_agreement")},
            "teacher_ce": result.after.get("teacher_ce")}


def markdown(report: dict) -> str:
    lines = ["# Student construction: importance-based pruning against a uniform stride", "",
             f"{setting_line(report)} Bundled SmolLM2-135M-Instruct teacher (30 layers); the quickstart recipe with only "
             f"the student changed; held-out split of the quickstart answers.", "",
             "| student | parameters | kept layers | CE before | KL before | CE after | KL after | top-1 after | prune s | train s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        b, a = r["before"], r["after"]
        layers = ",".join(map(str, r["kept_layers"])) if r["kept_layers"] and len(r["kept_layers"]) < 30 else "all 30"
        prune_s = f"{r['prune_seconds']:.0f}" if r.get("prune_seconds") is not None else "-"
        lines.append(f"| {r['construction']} | {r['parameters'] / 1e6:.1f}M | {layers} | {b['ce']:.2f} | "
                     f"{b['kl_to_teacher']:.2f} | {a['ce']:.2f} | {a['kl_to_teacher']:.2f} | "
                     f"{a['top1_agreement']:.1%} | {prune_s} | {r['wall_s']:.0f} |")
    lines += ["", f"Steps: {report['runs'][0]['steps']} (the quickstart's budget). The teacher's own CE on the held-out "
              f"answers: {report['runs'][0]['teacher_ce']:.3f}. 'train s' is the whole `distill` call (load, prune, "
              f"validation before and after, training, export)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(CONSTRUCTIONS), help="comma-separated subset")
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the quickstart's)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="more recipe overrides")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kdlm-student-init"))
    parser.add_argument("--out", type=Path, default=RESULTS / "student_init", help="results path without suffix")
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="earlier results JSON files (same script, same machine) whose runs join the table")
    args = parser.parse_args()
    started = time.perf_counter()
    runs = [r for path in args.merge for r in json.loads(path.read_text())["runs"]]
    for name in args.only.split(","):
        print(f"[student_init] {name}", file=sys.stderr, flush=True)
        runs.append(run(name, args.steps, args.workdir, args.extra))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    report = {"date": utc_now(), "machine": machine_info(), "versions": versions("torch", "transformers", "kdlm"),
              "wall_s": time.perf_counter() - started, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
