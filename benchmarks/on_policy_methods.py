"""Off-policy forward KL, GKD, MiniLLM and TAID side by side at an equal wall-clock budget (CPU, bundled teacher).

    python benchmarks/on_policy_methods.py                    # 4 methods x 240 s, then kdlm eval on 64 SelfInst items
    python benchmarks/on_policy_methods.py --budget 30 --eval-limit 8   # smoke test (figures not representative)
    python benchmarks/on_policy_methods.py --json             # the same, the results object as the last stdout line
    python benchmarks/on_policy_methods.py --methods off_policy_fkl,fkl_hint,fkl_relation \
        --student '{"keep_layers": 15, "prune": {"method": "block_influence"}}' \
        --budget 150 --out benchmarks/results/feature_methods \
        --title "Logit, hint and attention-relation terms at an equal wall-clock budget (CPU, bundled teacher)"

Teacher: the bundled SmolLM2-135M-Instruct. Student: 10 of its 30 layers (the quickstart's initialisation), fresh
for every method. Data: the quickstart's 360 project-written instructions with the teacher's greedy answers
(`kdlm.quickstart.run.teacher_answers`, cached), 10% held out; every method reads the same prompts, and the
on-policy ones sample their own completions for them. Every method: batch 8, AdamW lr 3e-4 constant after 5 warmup
steps, bf16 autocast where the CPU has it, stopped by train.max_seconds = --budget (the step that crosses it is
the last), so each gets the same wall time whatever its cost per step.

    off_policy_fkl  source static,  forward_kl                       (token-level KD on the teacher's answers)
    gkd             source mixed,   lmbda 0.5, jsd beta 0.5, sampling temperature 0.9 (TRL GKDTrainer's defaults)
    minillm         source student, teacher_mix 0.2, reverse_kl + pg (clip 0.2, length-normalised) on samples,
                    ce on the dataset's answers (weight 0.5: MiniLLM's lm term, source.data_rows)
    taid            source static,  taid (t from 0.4, alpha 5e-4, momentum 0.99)
    fkl_hint        source static,  forward_kl + hint (layer map kept: every student layer to the teacher layer it
                    was copied from; normalised_mse; weight 1)
    fkl_relation    source static,  forward_kl + attention_relation (kept; qq/kk/vv over 3 relation heads; weight 1)

Reported per method: steps done in the budget, held-out CE and KL to the teacher (kdlm's validation at the end,
the teacher's answers of the 36 held-out prompts), and SelfInst ROUGE-L from `kdlm eval` on the first
--eval-limit items of ../shared/data (greedy), with retention against the teacher's own score.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, utc_now, versions  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DATA_DIR = REPO.parent / "shared" / "data"
TEACHER = "smollm2-135m-instruct"

BASE = {
    "teacher": {"model": TEACHER},
    "student": {"model": TEACHER, "keep_layers": 10},
    "data": {"format": "messages", "max_length": 256, "validation_fraction": 0.1},
    "sampling": {"max_new_tokens": 64},
    "train": {"max_steps": 10_000, "batch_size": 8, "learning_rate": 3e-4, "lr_scheduler": "constant_with_warmup",
              "warmup_steps": 5, "log_every": 1, "save_every": 0, "report_to": [], "mixed_precision": "auto"},
}
METHODS = {
    "off_policy_fkl": {"loss": {"terms": [{"name": "forward_kl"}]}},
    "gkd": {"source": {"kind": "mixed", "lmbda": 0.5}, "sampling": {"max_new_tokens": 64, "temperature": 0.9},
            "loss": {"terms": [{"name": "jsd", "beta": 0.5}]}},
    "minillm": {"source": {"kind": "student", "data_rows": True},
                "sampling": {"max_new_tokens": 64, "temperature": 1.0, "teacher_mix": 0.2},
                "loss": {"pg_clip": 0.2, "pg_length_normalise": True,
                         "terms": [{"name": "reverse_kl", "rows": "samples"}, {"name": "pg", "rows": "samples"},
                                   {"name": "ce", "rows": "data", "weight": 0.5}]}},
    "taid": {"loss": {"terms": [{"name": "taid"}]}},
    # feature terms (docs/concepts/features.md) on top of the same forward KL, layer map `kept`
    "fkl_hint": {"loss": {"terms": [{"name": "forward_kl"},
                                    {"name": "hint", "weight": 1.0, "metric": "normalised_mse", "layers": "kept"}]}},
    "fkl_relation": {"loss": {"terms": [{"name": "forward_kl"},
                                        {"name": "attention_relation", "weight": 1.0, "layers": "kept"}]}},
}


def _merge(base: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(base))
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def train(method: str, data: Path, workdir: Path, budget: float, student: dict | None = None) -> dict:
    """One method, in this process; returns its run figures. `student`: fields replacing BASE's student ones."""
    from kdlm.config import Recipe, from_dict
    from kdlm.training import distill

    raw = _merge(BASE, METHODS[method])
    raw["student"].update(student or {})
    raw["data"]["train"] = str(data)
    raw["train"]["max_seconds"] = budget
    raw["output"] = {"dir": str(workdir / method), "overwrite": True}
    start = time.perf_counter()
    result = distill(from_dict(Recipe, raw), show_progress=False)
    wall = time.perf_counter() - start
    history = result.history
    gen = sum(r.get("gen/seconds", 0.0) for r in history)
    train_s = sum(r.get("time/step_s", 0.0) for r in history)
    return {"method": method, "steps": result.steps, "train_wall_s": wall, "loop_s": train_s,
            "generation_share": gen / train_s if train_s else 0.0,
            "counted_tokens": sum(r["counted_tokens"] for r in history),
            "val_ce_before": result.before.get("ce"), "val_kl_before": result.before.get("kl_to_teacher"),
            "val_ce": result.after.get("ce"), "val_kl_to_teacher": result.after.get("kl_to_teacher"),
            "val_top1_agreement": result.after.get("top1_agreement"), "teacher_ce": result.after.get("teacher_ce"),
            "final_t": history[-1].get("taid/t") if history else None, "model": str(result.model_dir),
            "recipe": raw}


def reuse(method: str, workdir: Path) -> dict:
    """A finished run's figures, read back from its folder (--reuse-runs)."""
    run = workdir / method
    final = json.loads((run / "final_metrics.json").read_text())
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss/total"' in line]
    gen = sum(r.get("gen/seconds", 0.0) for r in history)
    loop_s = sum(r.get("time/step_s", 0.0) for r in history)
    before, after = final["before"], final["after"]
    return {"method": method, "steps": final["steps"], "train_wall_s": None, "loop_s": loop_s,
            "generation_share": gen / loop_s if loop_s else 0.0,
            "counted_tokens": sum(r["counted_tokens"] for r in history),
            "val_ce_before": before.get("ce"), "val_kl_before": before.get("kl_to_teacher"), "val_ce": after.get("ce"),
            "val_kl_to_teacher": after.get("kl_to_teacher"), "val_top1_agreement": after.get("top1_agreement"),
            "teacher_ce": after.get("teacher_ce"), "final_t": history[-1].get("taid/t") if history else None,
            "model": str(run / "model"), "recipe": None}


def evaluate(models: dict[str, str], out: Path, limit: int) -> dict:
    """kdlm eval on SelfInst: the teacher first (the reference for retention), then every student."""
    specs = [TEACHER] + [str(Path(m).parent) for m in models.values()]  # run folders: labelled by their names
    cmd = [sys.executable, "-m", "kdlm", "eval", *specs, "--task", "selfinst", "--data-dir", str(DATA_DIR),
           "--limit", str(limit), "--output", str(out), "--no-progress"]
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads((out / "summary.json").read_text())


def rouge_of(summary: dict, label: str) -> tuple:
    """(ROUGE-L, retention %) of one model in kdlm eval's summary.json; a run folder's label is its name."""
    rouge = summary["results"][label]["selfinst"]["rouge_l"]
    return rouge, summary.get("retention", {}).get(label, {}).get("selfinst", {}).get("rouge_l")


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# {report.get('title', 'On-policy methods at an equal wall-clock budget (CPU, bundled teacher)')}", "",
        f"{m.get('cpu')}, {m.get('cores')} cores; {', '.join(f'{k} {v}' for k, v in report['versions'].items())}; "
        f"{report['date']}. Budget {report['budget_s']:.0f} s of training per method; SelfInst ROUGE-L on the first "
        f"{report['eval_limit']} items (greedy).", "",
        "| method | steps | generation share | held-out CE | held-out KL to teacher | top-1 agreement | SelfInst ROUGE-L | retention |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["methods"]:
        rouge = f"{r['rougeL']:.4f}" if r.get("rougeL") is not None else "n/a"
        keep = f"{r['retention']:.1f}%" if r.get("retention") is not None else "n/a"
        lines.append(f"| {r['method']} | {r['steps']} | {100 * r['generation_share']:.0f}% | {r['val_ce']:.3f} | "
                     f"{r['val_kl_to_teacher']:.3f} | {r['val_top1_agreement']:.3f} | {rouge} | {keep} |")
    t = report["teacher"]
    lines += ["", f"Teacher: SelfInst ROUGE-L {t['rougeL']:.4f}; its CE on the held-out answers {t['teacher_ce']:.3f} "
              f"(its own greedy answers). Student before training: CE {report['before']['ce']:.3f}, KL "
              f"{report['before']['kl']:.3f}.", "",
              "Held-out CE and KL are measured on the teacher's greedy answers to held-out prompts, which favours "
              "methods trained on exactly those answers (off-policy forward KL); on-policy methods spend their budget "
              "on their own samples. ROUGE-L scores free generation against SelfInst references. Read both."]
    for r in report["methods"]:
        if r.get("final_t") is not None:
            lines += ["", f"TAID's t after the budget: {r['final_t']:.4f}. Its linear floor spans train.max_steps "
                      f"({BASE['train']['max_steps']:,}), so within a short budget t moves by its adaptive term only."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds per method (default 240)")
    parser.add_argument("--eval-limit", type=int, default=64, help="SelfInst items for kdlm eval (default 64)")
    parser.add_argument("--methods", default="off_policy_fkl,gkd,minillm,taid", help="comma-separated subset of "
                        + ", ".join(METHODS))
    parser.add_argument("--student", type=json.loads, default=None, help="JSON of student fields replacing the "
                        "10-layer uniform student's, e.g. the quickstart's width-pruned one: "
                        "'{\"keep_layers\": 15, \"prune\": {\"method\": \"block_influence\"}}'")
    parser.add_argument("--title", default="On-policy methods at an equal wall-clock budget (CPU, bundled teacher)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kdlm-on-policy-methods"))
    parser.add_argument("--out", type=Path, default=RESULTS / "on_policy_methods", help="results path without suffix")
    parser.add_argument("--json", action="store_true", help="print the results object as the last stdout line")
    parser.add_argument("--reuse-runs", action="store_true", help="read the trained runs back from --workdir")
    parser.add_argument("--eval-dirs", nargs="+", metavar="EVAL_DIR",
                        help="read SelfInst scores from these kdlm eval folders instead of running kdlm eval (the "
                             "teacher's and the students', same items and settings); retention = student / teacher")
    args = parser.parse_args()
    from kdlm.quickstart.run import teacher_answers

    started = time.perf_counter()
    runs = []
    for method in args.methods.split(","):
        if args.reuse_runs:
            runs.append(reuse(method, args.workdir))
            continue
        print(f"[on_policy_methods] {method}: training for {args.budget:.0f} s", file=sys.stderr, flush=True)
        runs.append(train(method, teacher_answers(show_progress=False), args.workdir, args.budget, args.student))
    if args.eval_dirs:
        def rouge(label: str):  # None when no folder holds this model's scores (its eval did not finish)
            found = [Path(d) / label / "selfinst" / "metrics.json" for d in args.eval_dirs]
            path = next((f for f in found if f.is_file()), None)
            return json.loads(path.read_text())["metrics"]["rouge_l"] if path else None

        teacher_rouge = rouge(TEACHER)
        for r in runs:
            r["rougeL"] = rouge(r["method"])
            r["retention"] = 100 * r["rougeL"] / teacher_rouge if r["rougeL"] is not None else None
    else:
        print("[on_policy_methods] kdlm eval", file=sys.stderr, flush=True)
        summary = evaluate({r["method"]: r["model"] for r in runs}, args.workdir / "eval", args.eval_limit)
        teacher_rouge, _ = rouge_of(summary, TEACHER)
        for r in runs:
            r["rougeL"], r["retention"] = rouge_of(summary, r["method"])  # the run folder is named after the method
    report = {"date": utc_now(), "machine": machine_info(), "versions": versions("torch", "transformers", "kdlm"),
              "budget_s": args.budget, "eval_limit": args.eval_limit, "title": args.title,
              "student": {**BASE["student"], **(args.student or {})}, "wall_s": time.perf_counter() - started,
              "teacher": {"rougeL": teacher_rouge, "teacher_ce": runs[0]["teacher_ce"]},
              "before": {"ce": runs[0]["val_ce_before"], "kl": runs[0]["val_kl_before"]},
              "methods": [{k: v for k, v in r.items() if k != "recipe"} for r in runs],
              "recipes": {r["method"]: r["recipe"] or _merge(BASE, METHODS[r["method"]]) for r in runs}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    if args.json:
        print(json.dumps({r["method"]: {k: r[k] for k in ("steps", "val_ce", "val_kl_to_teacher", "rougeL")}
                          for r in report["methods"]}))


if __name__ == "__main__":
    main()
