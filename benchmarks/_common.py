"""Helpers shared by the benchmarks: machine and versions, date, peak RSS, matmul peak, FLOP model.

Kept small and free of kdlm imports at module level, so that a worker process imports only what it uses.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import resource
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine_info() -> dict:
    """CPU model (from /proc/cpuinfo), core counts, memory, and torch's intra-op thread count."""
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
               platform.processor() or "unknown")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    mem_kib = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal:")), 0) if Path("/proc/meminfo").is_file() else 0
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "torch_threads": torch.get_num_threads(),
        "bf16_flags": sorted(f for f in flags if "bf16" in f or f.startswith("amx")),
    }


def versions(*packages: str) -> dict:
    """Python and package versions (None when not installed), and the kdlm git commit (+ '-dirty')."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kdlm"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        out["kdlm_git"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        out["kdlm_git"] = None
    return out


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def peak_rss_mb() -> dict:
    """Peak resident memory of this process (kdlm.memory: VmHWM on Linux, which, unlike ru_maxrss, does not
    start at the parent's peak) and of its largest waited-for child, in MiB (Linux ru_maxrss is KiB)."""
    from kdlm.memory import peak_rss_mb as own_peak

    own = own_peak()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"self": own, "children": children, "total": own + children}


def matmul_gflops(dtype_name: str, n: int = 2048, seconds: float = 2.0) -> float:
    """Sustained GFLOP/s of an n x n @ n x n matmul loop (2 n^3 FLOP each), after a warmup, at torch's thread count."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    count, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b, out=out)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and count >= 3:
            return 2 * n**3 * count / elapsed / 1e9


# ----------------------------------------------------------------------------- FLOP model


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP model needs of a decoder: matmul weights of the blocks and of the LM head, depth, attention width."""

    body_params: int  # >= 2-D weights inside the decoder blocks (the per-token matmuls)
    head_params: int  # LM-head weight (tied or not); the embedding lookup costs no FLOP
    n_layers: int
    attn_dim: int  # num_attention_heads * head_dim

    def as_dict(self) -> dict:
        return asdict(self)


def model_shape(folder: str | Path) -> ModelShape:
    """Read a HF folder's config and count its weights on the meta device (nothing is loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kdlm.models.init_student import decoder_layers

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = decoder_layers(model)
    body = sum(p.numel() for p in layers.parameters() if p.ndim >= 2)
    head = model.get_output_embeddings().weight.numel()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return ModelShape(body, head, len(layers), text.num_attention_heads * head_dim)


def step_flops(teacher: ModelShape, student: ModelShape, rows: int, width: int, head_tokens: int) -> dict:
    """Matmul FLOP of one distillation micro-batch of `rows` x `width` computed positions (padding included).

    teacher forward: 2 * body * rows*width + 2 * head * head_tokens + attention
    student fwd+bwd: 3 x (the same forward with the student's shape)
    attention forward: 2 * 2 * n_layers * width * attn_dim per position (QK^T and AV over the full width,
    as SDPA computes it with a mask). `head_tokens` is where the LM head runs: every position for a
    full-logit loss, the scored positions only for kdlm's fused loss. Elementwise work (softmax, KL) is not counted.
    """
    positions = rows * width

    def forward(shape: ModelShape) -> float:
        return (2.0 * shape.body_params * positions + 2.0 * shape.head_params * head_tokens
                + 4.0 * shape.n_layers * shape.attn_dim * width * positions)

    t, s = forward(teacher), 3 * forward(student)
    return {"teacher": t, "student": s, "total": t + s}


def setting_line(report: dict) -> str:
    """'CPU, N cores; versions; date.' for a results file's first paragraph (report: machine, versions, date)."""
    m = report["machine"]
    packages = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    return f"{m.get('cpu')}, {m.get('cores')} cores; {packages}; {report['date']}."
