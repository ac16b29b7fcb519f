"""`kdlm eval --harness TASKS`: run lm-evaluation-harness tasks on the same models and fold the results in.

lm-evaluation-harness (`pip install lm-eval`) is optional and not a dependency of kdlm; its tasks download their data
from the Hugging Face hub. Each model is run through its Python API,

    lm_eval.simple_evaluate(model="hf", model_args="pretrained=PATH[,gguf_file=F][,dtype=D]", tasks=[...],
                            limit=N, device=DEVICE, batch_size=B)

and its `results[task]` entries are folded into summary.json under `harness[label][task][metric]`. A harness metric
key `name,filter` becomes `name` for the default filter `none` and `name_filter` otherwise (`exact_match,strict-match`
-> `exact_match_strict-match`); standard errors (`*_stderr`) and non-numeric entries (`alias`) are left out.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from kdlm.errors import KdlmError


def require_lm_eval():
    """The lm_eval module, or a KdlmError telling how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise KdlmError("--harness needs lm-evaluation-harness, which is not installed: pip install lm-eval") from None
    if not hasattr(lm_eval, "simple_evaluate"):
        raise KdlmError("--harness: the installed lm_eval has no simple_evaluate(); pip install -U lm-eval")
    return lm_eval


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise KdlmError(f"--harness {text!r}: give comma-separated lm-evaluation-harness task names")
    return tasks


def metric_name(key: str) -> str:
    name, _, filt = key.partition(",")
    return name if filt in ("", "none") else f"{name}_{filt}"


def fold_results(raw: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from a simple_evaluate() result (numeric, finite values; no stderr, no alias)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (raw.get("results") or {}).items():
        if not isinstance(metrics, dict):
            continue
        kept = {}
        for key, value in metrics.items():
            name = metric_name(str(key))
            if name.endswith("_stderr") or "_stderr_" in name or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                kept[name] = float(value)
        if kept:
            out[str(task)] = kept
    return out


def run_harness(models: list[tuple[str, str, Optional[str]]], tasks: list[str], *, limit: Optional[int],
                device: str, batch_size: int, dtype: Optional[str] = None) -> dict[str, dict[str, dict[str, float]]]:
    """Run the harness tasks on each (label, local path or hub id, gguf file) and fold the results per label."""
    lm_eval = require_lm_eval()
    folded = {}
    for label, path, gguf_file in models:
        args = f"pretrained={path}" + (f",gguf_file={gguf_file}" if gguf_file else "") + (f",dtype={dtype}" if dtype else "")
        try:
            raw = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=list(tasks), limit=limit, device=device,
                                          batch_size=batch_size)
        except KdlmError:
            raise
        except Exception as err:  # an unknown task, no network for its data: one line naming the model
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise KdlmError(f"--harness on {label}: lm-evaluation-harness failed: {text}") from None
        folded[label] = fold_results(raw or {})
    return folded
