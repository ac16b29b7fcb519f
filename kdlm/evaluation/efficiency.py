"""Efficiency figures of a model on the current device (`kdlm eval --efficiency`).

- parameters: distinct parameter tensors' elements (tied input/output embeddings counted once);
- disk_mb: size of the weight files (safetensors, else PyTorch .bin/.pt, or the GGUF file) in MiB;
- latency_ms_p50 / p95: milliseconds per generated token at batch 1, median and 95th percentile over `repeats`
  greedy generations of exactly `new_tokens` tokens (min_new_tokens = max_new_tokens) from a fixed prompt,
  after one warm-up generation;
- throughput_tok_s: generated tokens per second at batch `batch_size` (same prompt repeated, same length);
- peak_memory_mb: memory of the model plus one generation at batch `batch_size`. On CUDA: the model's weight bytes
  plus the rise of torch.cuda.max_memory_allocated during the generation. On CPU: in a fresh subprocess (so that
  other loaded models do not count), the peak resident set after loading the model and generating once, minus the
  resident set just before loading it (after the imports and the tokenizer). On Linux the peak is VmHWM, reset to
  the current size before loading; elsewhere ru_maxrss;
- ratios: each figure of a student divided by the reference model's (latency < 1 and throughput > 1 mean faster).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from kdlm.memory import peak_rss_mb, reset_peak_rss

PROMPT = "Explain in a few sentences how a small student model can learn from a large teacher model."
WEIGHT_GLOBS = (("*.safetensors",), ("*.bin", "*.pt", "*.pth"))
RATIO_KEYS = ("parameters", "disk_mb", "peak_memory_mb", "latency_ms_p50", "latency_ms_p95", "throughput_tok_s")


def parameter_count(model) -> int:
    """Elements of the distinct parameter tensors: a tied embedding/LM head counts once."""
    seen: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    return sum(p.numel() for p in seen.values())


def weight_files(folder: Path, gguf_file: Optional[str] = None) -> list[Path]:
    if gguf_file:
        return [folder / gguf_file]
    for globs in WEIGHT_GLOBS:
        files = sorted({f for g in globs for f in folder.glob(g) if f.is_file()})
        if files:
            return files
    return sorted(folder.glob("*.gguf"))


def disk_mb(path: str, gguf_file: Optional[str] = None) -> Optional[float]:
    """MiB of a model's weight files; for a hub id, of its files in the local HF cache (None when unknown)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, local_files_only=True))
        except Exception:
            return None
    files = weight_files(folder, gguf_file)
    if not files:
        return None
    return sum(f.stat().st_size for f in files) / 2**20


def prompt_ids(tokenizer) -> list[int]:
    from kdlm.evaluation.scoring import context_ids

    return context_ids(tokenizer, [{"role": "user", "content": PROMPT}])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _generate_fixed(model, tokenizer, ids: list[int], batch: int, new_tokens: int) -> torch.Tensor:
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids] * batch, device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                          pad_token_id=pad)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def measure_latency(model, tokenizer, *, new_tokens: int = 32, repeats: int = 5, warmup: int = 1) -> dict:
    """ms per generated token at batch 1: p50 and p95 over `repeats` timed generations."""
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer)
    for _ in range(warmup):
        _generate_fixed(model, tokenizer, ids, 1, new_tokens)
    per_token = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        _generate_fixed(model, tokenizer, ids, 1, new_tokens)
        _sync(device)
        per_token.append((time.perf_counter() - start) * 1000 / new_tokens)
    return {"latency_ms_p50": percentile(per_token, 50), "latency_ms_p95": percentile(per_token, 95)}


def measure_throughput(model, tokenizer, *, batch_size: int = 8, new_tokens: int = 32, repeats: int = 2) -> dict:
    """Generated tokens per second at batch `batch_size` (best of `repeats` after a warm-up), and, on CUDA, the peak
    memory of that generation (weights + the rise of max_memory_allocated)."""
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer)
    _generate_fixed(model, tokenizer, ids, batch_size, new_tokens)
    best = math.inf
    out = {}
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        _sync(device)
        start = time.perf_counter()
        _generate_fixed(model, tokenizer, ids, batch_size, new_tokens)
        _sync(device)
        best = min(best, time.perf_counter() - start)
        if device.type == "cuda":
            weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
            peak = (weights + torch.cuda.max_memory_allocated(device) - base) / 2**20
            out["peak_memory_mb"] = max(out.get("peak_memory_mb", 0.0), peak)
    out["throughput_tok_s"] = batch_size * new_tokens / best
    return out


def probe_cpu_memory(path: str, gguf_file: Optional[str], *, dtype: str = "float32", batch_size: int = 8,
                     new_tokens: int = 32, trust_remote_code: bool = False, timeout: float = 600) -> Optional[float]:
    """Peak RSS rise (MiB) of loading the model and generating once, in a fresh Python process; None if it fails."""
    cmd = [sys.executable, "-m", "kdlm.evaluation.efficiency", path, "--dtype", dtype, "--batch-size", str(batch_size),
           "--new-tokens", str(new_tokens)]
    if gguf_file:
        cmd += ["--gguf-file", gguf_file]
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_memory_mb"])
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError, OSError):
        return None


def measure(model, tokenizer, *, path: str, gguf_file: Optional[str] = None, dtype: str = "float32",
            batch_size: int = 8, new_tokens: int = 32, repeats: int = 5, trust_remote_code: bool = False) -> dict:
    """All efficiency figures of a loaded model (see the module docstring); `ratios` is filled in later."""
    device = next(model.parameters()).device
    figures = {"parameters": parameter_count(model), "disk_mb": disk_mb(path, gguf_file)}
    figures.update(measure_latency(model, tokenizer, new_tokens=new_tokens, repeats=repeats))
    figures.update(measure_throughput(model, tokenizer, batch_size=batch_size, new_tokens=new_tokens))
    if device.type != "cuda":
        figures["peak_memory_mb"] = probe_cpu_memory(path, gguf_file, dtype=dtype, batch_size=batch_size,
                                                     new_tokens=new_tokens, trust_remote_code=trust_remote_code)
    figures["device"] = str(device)
    figures["new_tokens"] = new_tokens
    figures["batch_size"] = batch_size
    figures["ratios"] = {}
    return figures


def ratios(student: dict, reference: dict) -> dict[str, Optional[float]]:
    """student / reference for every figure both have (None where the reference's is 0 or missing)."""
    out: dict[str, Optional[float]] = {}
    for key in RATIO_KEYS:
        s, r = student.get(key), reference.get(key)
        if isinstance(s, (int, float)) and isinstance(r, (int, float)):
            out[key] = s / r if r else None
    return out


def _main(argv=None) -> int:
    """The memory probe run in a subprocess: prints {"peak_memory_mb": ...} as its last line."""
    parser = argparse.ArgumentParser(description="kdlm eval memory probe (internal)")
    parser.add_argument("path")
    parser.add_argument("--gguf-file")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM

    from kdlm.models.loading import DTYPES, ModelSource, load_model, load_tokenizer

    source = ModelSource(args.path, args.gguf_file)
    # import the architecture's code and load the tokenizer first: the baseline then leaves out code, not weights
    config = AutoConfig.from_pretrained(source.path, trust_remote_code=args.trust_remote_code, **source.kwargs)
    try:
        AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, AttributeError):
        pass
    tokenizer = load_tokenizer(source, trust_remote_code=args.trust_remote_code)
    base = reset_peak_rss()
    model = load_model(source, dtype=DTYPES[args.dtype], device=torch.device("cpu"), frozen=True,
                       trust_remote_code=args.trust_remote_code)
    _generate_fixed(model, tokenizer, prompt_ids(tokenizer), args.batch_size, args.new_tokens)
    print(json.dumps({"peak_memory_mb": peak_rss_mb() - base, "baseline_mb": base}))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
