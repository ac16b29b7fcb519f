"""Peak memory and time of the LM-head loss: fused/chunked vs naive full logits.

    python benchmarks/loss_memory.py                       # the full run (CPU, ~15 min on 2 cores)
    python benchmarks/loss_memory.py --tokens 1024 2048    # a subset

Setup (SmolLM2-135M-sized head): V = 49,152, H = 576, fp32 on CPU, forward_kl at T = 2,
student hidden [N, H] and weight [V, H] require grad, teacher hidden/weight random, no grad.

    naive: student_logits = h_s @ W_s.T; teacher_logits = h_t @ W_t.T  (no grad)   # [N, V] fp32
           divergence(student_logits, teacher_logits, "forward_kl").backward()
    fused: fused_divergence(h_s, W_s, h_t, W_t, "forward_kl").backward()

Every (method, N) runs in a FRESH subprocess: extra peak memory = VmHWM after the runs
minus VmRSS once the inputs are allocated, so it counts everything the loss allocates
(logits, intermediates, gradients incl. W_s.grad [V, H]). Time: median of 3 forward+backward
after one warmup. FLOP model: 2 forward matmuls (student + teacher) and 2 backward matmuls
(grad of h_s and of W_s), 2*N*H*V each: 8*N*H*V in all.

A naive configuration whose estimated need does not fit in the free memory is not run
(reported as skipped), and every worker runs under RLIMIT_AS so that it fails with an
allocation error instead of waking the OOM killer on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VOCAB, HIDDEN, TEMPERATURE, KIND = 49_152, 576, 2.0, "forward_kl"
TOKENS = (1024, 2048, 4096, 8192)
NAIVE_BYTES_PER_ELEMENT = 40  # estimate of the naive peak per token x vocab entry (measured 37.4 at N = 1k)
RESULTS = Path(__file__).resolve().parent / "results"


def _meminfo(key: str) -> int:
    """A /proc/meminfo or /proc/self/status field, in bytes."""
    path = "/proc/meminfo" if key.startswith("Mem") else "/proc/self/status"
    for line in Path(path).read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


# ----------------------------------------------------------------------------- worker (one config)


def worker(method: str, n_tokens: int, chunk_bytes: int, memory_limit: int) -> dict:
    import torch

    from kdlm.losses import divergence
    from kdlm.losses.fused import fused_divergence

    g = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(n_tokens, HIDDEN, generator=g).requires_grad_()  # [N, H] fp32
    student_weight = (0.05 * torch.randn(VOCAB, HIDDEN, generator=g)).requires_grad_()  # [V, H] fp32
    teacher_hidden = torch.randn(n_tokens, HIDDEN, generator=g)  # [N, H] fp32
    teacher_weight = 0.05 * torch.randn(VOCAB, HIDDEN, generator=g)  # [V, H] fp32

    def naive():
        student_logits = student_hidden @ student_weight.T  # [N, V] fp32
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.T  # [N, V] fp32
        divergence(student_logits, teacher_logits, KIND, temperature=TEMPERATURE).backward()

    def fused():
        fused_divergence(
            student_hidden, student_weight, teacher_hidden, teacher_weight, KIND,
            temperature=TEMPERATURE, chunk_bytes=chunk_bytes,
        ).backward()

    step = naive if method == "naive" else fused
    baseline = _meminfo("VmRSS")  # inputs allocated
    # address-space cap: fail with an allocation error rather than swap/OOM-kill neighbours
    resource.setrlimit(resource.RLIMIT_AS, (_meminfo("VmSize") + memory_limit, resource.RLIM_INFINITY))
    times = []
    try:
        for i in range(4):  # 1 warmup + 3 timed
            student_hidden.grad = student_weight.grad = None
            start = time.perf_counter()
            step()
            if i > 0:
                times.append(time.perf_counter() - start)
    except RuntimeError as error:  # "DefaultCPUAllocator: can't allocate memory"
        return {"method": method, "tokens": n_tokens, "status": f"out of memory: {str(error).splitlines()[0][:120]}"}
    peak = _meminfo("VmHWM")  # this process's own high-water mark (ru_maxrss may start at the parent's)
    median = statistics.median(times)
    return {
        "method": method,
        "tokens": n_tokens,
        "status": "ok",
        "extra_peak_bytes": peak - baseline,
        "bytes_per_token_vocab": (peak - baseline) / (n_tokens * VOCAB),
        "times_s": times,
        "median_s": median,
        "gflops": 8 * n_tokens * HIDDEN * VOCAB / median / 1e9,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- driver


def run_config(method: str, n_tokens: int, chunk_bytes: int) -> dict:
    available = _meminfo("MemAvailable")
    margin = 1536 * 2**20  # leave room for the neighbours and the inputs
    if method == "naive" and NAIVE_BYTES_PER_ELEMENT * n_tokens * VOCAB > available - margin:
        need = NAIVE_BYTES_PER_ELEMENT * n_tokens * VOCAB
        return {"method": method, "tokens": n_tokens, "status":
                f"skipped: needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"}
    cmd = [sys.executable, __file__, "--worker", method, str(n_tokens), str(chunk_bytes), str(available - margin)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        return {"method": method, "tokens": n_tokens, "status": f"failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(_meminfo("MemTotal") / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# LM-head loss: fused vs naive (forward + backward)",
        "",
        f"V = {VOCAB:,}, H = {HIDDEN}, fp32, {KIND} at T = {TEMPERATURE:g}, fused chunk_bytes = "
        f"{report['chunk_bytes'] / 2**20:g} MiB ({report['rows_per_chunk']} rows per chunk).",
        f"{m['cpu']}, {m['cores_usable']} usable cores ({m['cores']} listed), {m['memory_gib']} GiB RAM; "
        f"torch {m['torch']}, Python {m['python']}; {m['date']}. Benchmark wall time {report['wall_s'] / 60:.1f} min.",
        "",
        "Extra peak memory = peak RSS minus RSS with the inputs allocated (fresh process per row). "
        "Time = median of 3 after a warmup. GFLOP/s from 8·N·H·V FLOP per step.",
        "",
        "| tokens N | naive extra peak | fused extra peak | fused / naive | naive time | fused time | naive GFLOP/s | fused GFLOP/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in report["tokens"]:
        naive, fused = report["results"][f"naive/{n}"], report["results"][f"fused/{n}"]

        def mem(r):
            return f"{r['extra_peak_bytes'] / 2**30:.2f} GiB" if r["status"] == "ok" else r["status"]

        def cell(r, key, fmt):
            return fmt.format(r[key]) if r["status"] == "ok" else "–"

        both = naive["status"] == "ok" and fused["status"] == "ok"
        ratio = f"{100 * fused['extra_peak_bytes'] / naive['extra_peak_bytes']:.1f}%" if both else "–"
        lines.append(
            f"| {n:,} | {mem(naive)} | {mem(fused)} | {ratio} | {cell(naive, 'median_s', '{:.2f} s')} | "
            f"{cell(fused, 'median_s', '{:.2f} s')} | {cell(naive, 'gflops', '{:.0f}')} | {cell(fused, 'gflops', '{:.0f}')} |"
        )
    naive_per_entry = [r["bytes_per_token_vocab"] for k, r in report["results"].items()
                       if k.startswith("naive/") and r["status"] == "ok"]
    if naive_per_entry:
        lines += ["", f"Naive: {min(naive_per_entry):.1f}–{max(naive_per_entry):.1f} bytes per token × vocab entry."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--chunk-bytes", type=int, default=None, help="fused budget (default: DEFAULT_CHUNK_BYTES)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for loss_memory.json / .md")
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "N", "CHUNK_BYTES", "MEMORY_LIMIT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, n, chunk_bytes, limit = args.worker
        print(json.dumps(worker(method, int(n), int(chunk_bytes), int(limit))))
        return

    from kdlm.losses.fused import DEFAULT_CHUNK_BYTES, chunk_rows

    chunk_bytes = args.chunk_bytes or DEFAULT_CHUNK_BYTES
    start = time.perf_counter()
    results = {}
    for n in args.tokens:
        for method in ("fused", "naive"):
            results[f"{method}/{n}"] = result = run_config(method, n, chunk_bytes)
            print(json.dumps(result), flush=True)
    report = {
        "machine": machine_info(),
        "vocab": VOCAB, "hidden": HIDDEN, "kind": KIND, "temperature": TEMPERATURE, "dtype": "float32",
        "chunk_bytes": chunk_bytes,
        "rows_per_chunk": chunk_rows(VOCAB, [KIND], chunk_bytes=chunk_bytes),
        "tokens": args.tokens,
        "results": results,
        "wall_s": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loss_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "loss_memory.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
