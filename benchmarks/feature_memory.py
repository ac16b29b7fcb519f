"""Extra peak memory of hint and attention-relation terms over a logit-only step, chunked vs unchunked.

    python benchmarks/feature_memory.py                 # 2,048 tokens, every configuration (~5 min on 2 cores)
    python benchmarks/feature_memory.py --tokens 512    # a quick look

Setup: the bundled SmolLM2-135M-Instruct teacher (30 layers, fp32) and a 10-layer student cut from it by block
influence (layers 0,1,20-24,27-29: the quickstart's), one row of --tokens random tokens, every position counted,
fp32, no autocast. One optimizer-free training step of the real DistillationModule: teacher forward with
hooks on the mapped layers only, student forward, the objective, backward.

    logit            forward_kl (fused, chunked LM head)
    + hint           + hint, layer map `kept` (10 pairs), normalised_mse
    + relation c128  + attention_relation, `kept` (10 pairs), qq/kk/vv, 3 relation heads, 128 query rows per chunk
    + relation full  the same with one chunk of all rows (chunk_rows = tokens): the whole [B, R, L, L]
    + both c128      hint and relation together

Each configuration runs in a FRESH subprocess: one warm-up step (so parameter gradients exist), then the peak
resident memory is reset (/proc/self/clear_refs) and one more step measured: extra peak = VmHWM after the step
minus VmRSS before it. glibc is told to return freed blocks (MALLOC_MMAP_THRESHOLD_=65536), so RSS follows
what torch holds. Reported: that extra peak, its difference from the logit-only step, and the step's time.
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
KEPT = [0, 1, 20, 21, 22, 23, 24, 27, 28, 29]
HINT = {"name": "hint", "weight": 1.0, "layers": "kept", "metric": "normalised_mse"}
RELATION = {"name": "attention_relation", "weight": 1.0, "layers": "kept", "relation_heads": 3}
CONFIGS = {
    "logit": ([], 128),
    "+ hint": ([HINT], 128),
    "+ relation c128": ([RELATION], 128),
    "+ relation full": ([RELATION], None),  # None: chunk_rows = tokens
    "+ both c128": ([HINT, RELATION], 128),
}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def worker(name: str, tokens: int) -> dict:
    import torch

    from kdlm.config import load_recipe
    from kdlm.losses.features import ModelDims, feature_layers, resolve_feature_terms
    from kdlm.losses.fused import TOTAL_KEY
    from kdlm.losses.objective import resolve_terms
    from kdlm.models import bundled
    from kdlm.models.init_student import keep_layers
    from kdlm.models.loading import load_model, resolve_source
    from kdlm.training.step import DistillationModule, Teacher, teacher_signal

    torch.manual_seed(0)
    extra, chunk = CONFIGS[name]
    terms_raw = [{"name": "forward_kl"}] + extra
    recipe = load_recipe(None, ["data.train=x.jsonl", f"loss.terms={json.dumps(terms_raw)}",
                                f"loss.feature_chunk_rows={chunk or tokens}"])
    source = resolve_source(str(bundled.materialize("smollm2-135m-instruct")))
    teacher_model = load_model(source, dtype=torch.float32, device=torch.device("cpu"), frozen=True)
    student = load_model(source, dtype=torch.float32, device=torch.device("cpu"))
    keep_layers(student, KEPT)
    student.config.use_cache = False
    student.train()
    vocab = student.get_output_embeddings().weight.shape[0]
    terms = resolve_feature_terms(resolve_terms(recipe.loss), student=ModelDims(student.config),
                                  teacher=ModelDims(teacher_model.config), kept=KEPT)
    _, t_hidden, _, t_attn = feature_layers(terms)
    teacher = Teacher(teacher_model, vocab, hidden_layers=sorted(t_hidden, key=str), attention_layers=sorted(t_attn))
    module = DistillationModule(student, terms, vocab)
    ids = torch.randint(0, vocab, (1, tokens))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def step() -> dict:
        signal = teacher_signal(teacher, batch)
        sums = module(input_ids=batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
                      teacher=signal)
        sums[TOTAL_KEY].backward()
        return {k: float(v) for k, v in sums.items() if k != TOTAL_KEY}

    step()  # warm-up: gradients allocated, oneDNN primitives built
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    values = step()
    seconds = time.perf_counter() - start
    return {"config": name, "tokens": tokens, "chunk_rows": chunk or tokens, "extra_peak_mb": (_status("VmHWM") - before) / 2**20,
            "step_s": seconds, "terms": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--only", default=",".join(CONFIGS), help="comma-separated subset (names as above)")
    parser.add_argument("--out", type=Path, default=RESULTS / "feature_memory", help="results path without suffix")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for name in args.only.split(","):
        print(f"[feature_memory] {name}", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--worker", name, "--tokens", str(args.tokens)], env=env,
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = next((r["extra_peak_mb"] for r in rows if r["config"] == "logit"), None)
    for r in rows:
        r["over_logit_mb"] = r["extra_peak_mb"] - base if base is not None else None
    report = {"date": utc_now(), "machine": machine_info(), "versions": versions("torch", "transformers", "kdlm"),
              "tokens": args.tokens, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = ["# Feature terms: extra peak memory of one training step", "",
             f"{setting_line(report)} SmolLM2-135M teacher (30 layers) -> 10-layer student, one row of "
             f"{report['tokens']:,} tokens, fp32, fresh process per row (see the script's docstring).", "",
             "| configuration | query rows per chunk | extra peak of the step (MiB) | over logit-only (MiB) | step s |",
             "|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        over = f"{r['over_logit_mb']:+,.0f}" if r.get("over_logit_mb") is not None else "-"
        chunk = r["chunk_rows"] if "relation" in r["config"] or "both" in r["config"] else "-"
        lines.append(f"| {r['config']} | {chunk} | {r['extra_peak_mb']:,.0f} | {over} | {r['step_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
