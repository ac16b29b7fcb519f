"""Per-process memory of a live teacher under 2 processes: a full copy on each (DDP-style) vs FSDP-sharded.

    python benchmarks/sharded_teacher.py              # teacher alone + a 3-step `kdlm distill` per mode (~5 min, 2 cores)
    python benchmarks/sharded_teacher.py --no-distill # the teacher alone

Setup: the bundled SmolLM2-135M-Instruct teacher (134.5M parameters, tied head, fp32 on CPU), 2 processes
started by torchrun (gloo, MULTI_CPU, OMP_NUM_THREADS=1 each), MALLOC_MMAP_THRESHOLD_=65536 so that RSS follows
what torch holds. Sharding is kdlm.training.sharding (torch FSDP2 `fully_shard`: each decoder layer, the body
as root, reshard after forward; the LM head gathered once per teacher forward), forced on CPU with
KDLM_TEACHER_SHARD=always: accelerate itself refuses FSDP on CPU.

Teacher alone, per process: load (kdlm.models.loading.load_model, frozen, as `kdlm distill` does), shard or
not, one warm-up forward and 3 timed ones (Teacher.rows: hidden states at every position of a 2 x 128 batch,
then the logits from the gathered head). Reported: the teacher's local parameter + buffer bytes, peak RSS over
the whole process (ru_maxrss: includes the full copy every process loads before sharding), peak RSS from after
sharding through the forwards (VmHWM reset after sharding), RSS after the forwards split into anonymous and
file-backed pages, and the mean forward time. Read RssFile with care: the unsharded fp32 teacher stays a
read-only mmap of the safetensors file, page-cache pages the 2 processes SHARE on a CPU host (counted in each
RSS, held once); the shards are private anonymous copies. On a GPU each process holds its own copy, and there
the 1/world saving is real memory.

Distill: the same `kdlm distill` (student: the teacher cut to 4 layers; forward_kl + ce; 3 steps of 2 x <=64
tokens; 8 validation examples) in each mode; per process its peak RSS and the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, utc_now, versions  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "sharded_teacher.json"
MiB = 2**20


def teacher_worker(out_dir: str, tokens: int, repeats: int) -> None:
    import torch
    from accelerate import Accelerator

    from kdlm.memory import peak_rss_mb, reset_peak_rss
    from kdlm.models import bundled
    from kdlm.models.loading import load_model, resolve_source
    from kdlm.training.sharding import shard_teacher, teacher_local_bytes
    from kdlm.training.step import Teacher, counted_positions

    acc = Accelerator(cpu=True)
    folder = bundled.materialize("smollm2-135m-instruct")
    model = load_model(resolve_source("smollm2-135m-instruct"), dtype=torch.float32, device=torch.device("cpu"), frozen=True)
    vocab = model.get_output_embeddings().weight.shape[0]
    full_bytes = teacher_local_bytes(model)
    teacher = shard_teacher(Teacher(model, vocab), acc)
    local = teacher_local_bytes(teacher.model)
    import gc

    gc.collect()
    reset_peak_rss()
    g = torch.Generator().manual_seed(acc.process_index)
    ids = torch.randint(0, vocab, (2, tokens), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    mask = counted_positions(ids)[0]
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        logits = teacher.logits(inputs, mask)
        if i:
            times.append(time.perf_counter() - start)
        del logits
    gc.collect()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    rss = {k: round(int(status[k].split()[0]) / 1024, 1) for k in ("VmRSS", "RssAnon", "RssFile") if k in status}
    result = {"rss_mb_after_forward": rss, "rank": acc.process_index, "world": acc.num_processes, "sharded": local < full_bytes,
              "teacher_full_bytes": full_bytes, "teacher_local_bytes": local,
              "peak_rss_mb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "peak_rss_mb_after_shard": peak_rss_mb(), "forward_s": sum(times) / len(times)}
    Path(out_dir, f"teacher-rank{acc.process_index}.json").write_text(json.dumps(result))


def distill_worker(out_dir: str, recipe_path: str) -> None:
    from kdlm.config import load_recipe
    from kdlm.memory import peak_rss_mb
    from kdlm.training.trainer import distill

    start = time.perf_counter()
    result = distill(load_recipe(recipe_path), show_progress=False)
    rank = int(os.environ.get("RANK", "0"))  # torchrun's; the process group may be gone after end_training
    Path(out_dir, f"distill-rank{rank}.json").write_text(json.dumps({
        "rank": rank, "steps": result.steps, "wall_s": time.perf_counter() - start,
        "peak_rss_mb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "vmhwm_mb": peak_rss_mb(), "after": result.after}))


def _torchrun(args: list[str], shard: str, timeout: int = 900) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true",
           "ACCELERATE_MIXED_PRECISION": "no", "MALLOC_MMAP_THRESHOLD_": "65536", "KDLM_TEACHER_SHARD": shard}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")


def _recipe(tmp: Path, output: Path) -> Path:
    words = "the cat sat on a mat and the dog ran to the park while birds sang in green trees".split()
    rows = []
    for i in range(40):
        pick = lambda k, s: " ".join(words[(s * 7 + j * 3) % len(words)] for j in range(k))  # noqa: E731
        rows.append({"messages": [{"role": "user", "content": pick(5 + i % 5, i)},
                                  {"role": "assistant", "content": pick(4 + i % 7, i + 1)}]})
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp / f"recipe-{output.name}.yaml"
    path.write_text(f"""
teacher: {{model: smollm2-135m-instruct, dtype: float32}}
student: {{model: smollm2-135m-instruct, keep_layers: 4, dtype: float32}}
data: {{train: {data}, validation_fraction: 0.2, max_length: 64}}
loss: {{terms: [{{name: forward_kl, weight: 0.9}}, {{name: ce, weight: 0.1}}]}}
train: {{max_steps: 3, batch_size: 2, learning_rate: 3.0e-4, warmup_steps: 0, save_every: 0, log_every: 1,
        eval_batches: 2, lr_scheduler: constant, report_to: []}}
output: {{dir: {output}}}
""")
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=["teacher", "distill"])
    parser.add_argument("--out")
    parser.add_argument("--recipe")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-distill", action="store_true")
    args = parser.parse_args()
    if args.worker == "teacher":
        return teacher_worker(args.out, args.tokens, args.repeats)
    if args.worker == "distill":
        return distill_worker(args.out, args.recipe)

    from kdlm.models import bundled

    bundled.materialize("smollm2-135m-instruct")  # converted once, before two processes race for it
    modes = {"ddp": "never", "fsdp": "always"}
    results = {"date": utc_now(), "machine": machine_info(), "versions": versions("torch", "accelerate", "transformers"),
               "setup": {"teacher": "smollm2-135m-instruct fp32", "processes": 2, "backend": "gloo (CPU)",
                         "batch": f"2 x {args.tokens}", "omp_threads_per_process": 1}, "teacher": {}, "distill": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, shard in modes.items():
            out = tmp / name
            out.mkdir()
            _torchrun(["--worker", "teacher", "--out", str(out), "--tokens", str(args.tokens),
                       "--repeats", str(args.repeats)], shard)
            results["teacher"][name] = [json.loads((out / f"teacher-rank{r}.json").read_text()) for r in (0, 1)]
            if not args.no_distill:
                recipe = _recipe(tmp, tmp / f"run-{name}")
                _torchrun(["--worker", "distill", "--out", str(out), "--recipe", str(recipe)], shard)
                results["distill"][name] = [json.loads((out / f"distill-rank{r}.json").read_text()) for r in (0, 1)]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    lines = ["| mode | rank | teacher local MiB | peak RSS MiB (process) | peak RSS MiB (after shard, 1+3 fwd) | "
             "forward s | distill peak RSS MiB | distill wall s |", "|---|---|---|---|---|---|---|---|"]
    for name, ranks in results["teacher"].items():
        for r in ranks:
            d = next((x for x in results["distill"].get(name, []) if x["rank"] == r["rank"]), None)
            head = (f"| {name} | {r['rank']} | {r['teacher_local_bytes'] / MiB:.1f} | {r['peak_rss_mb_process']:.0f} | "
                    f"{r['peak_rss_mb_after_shard']:.0f} | {r['forward_s']:.2f} |")
            lines.append(head + (f" {d['peak_rss_mb_process']:.0f} | {d['wall_s']:.0f} |" if d else " - | - |"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
