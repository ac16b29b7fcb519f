"""Checkpoints: written so that a crash mid-write never leaves a corrupt "latest".

Layout of `RUN/checkpoints/`:
    step-000050/        accelerate state (model.safetensors, optimizer, scheduler, RNG) + trainer_state.json
                        (+ rank-N.pt: a process's own state, e.g. its replay buffer, when it has one)
    latest              text file naming the newest complete checkpoint folder

A checkpoint is written into a hidden temporary folder, then renamed into place, and
only then is `latest` replaced (itself via write-to-temp + os.replace, which is atomic
on POSIX). A crash at any point leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

STATE_FILE = "trainer_state.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see either the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(accelerator, root: Path, step: int, state: dict[str, Any], keep: int,
                    rank_state: Optional[dict] = None) -> Path:
    """Save accelerate's state plus `state` as checkpoint `step`; prune to the newest `keep`. All ranks call this.
    `rank_state`: this process's own state (torch.save'd as rank-N.pt), or None."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if rank_state is not None:
        import torch

        torch.save(rank_state, tmp / f"rank-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()  # every rank's file is in before the folder is renamed
    if accelerator.is_main_process:
        atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", final.name + "\n")
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint that `latest` names, or None when there is none (a half-written one is ignored)."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def load_checkpoint(accelerator, path: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG state; return the trainer state (step, data position)."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


def load_rank_state(accelerator, path: Path) -> Optional[dict]:
    """This process's own state from checkpoint `path` (None when it saved none)."""
    import torch

    file = path / f"rank-{accelerator.process_index}.pt"
    return torch.load(file, weights_only=False) if file.is_file() else None


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
