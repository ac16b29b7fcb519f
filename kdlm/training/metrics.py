"""Metrics: one JSON object per line in RUN/metrics.jsonl, and the accelerate trackers (TensorBoard, W&B)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only metrics file, written by the main process only; also forwards to accelerate's trackers."""

    def __init__(self, accelerator, path: Path):
        self.accelerator = accelerator
        self.path = path

    def log(self, record: dict[str, Any], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        row = {"step": step, "time": round(time.time(), 3), **record}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.accelerator.log(numeric, step=step)


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process so far (kdlm.memory.peak_rss_mb), and peak CUDA memory if used."""
    import torch

    from kdlm.memory import peak_rss_mb

    out = {"peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
