"""The terminal summary of `kdlm eval`: plain-text tables from summary.json (the report has the full picture)."""

from __future__ import annotations

from typing import Any, Optional

from kdlm.evaluation.metrics import LOWER_IS_BETTER

REQUIRED_KEYS = ("kdlm_eval_version", "created", "device", "reference", "models", "tasks", "results", "retention",
                 "agreement", "robustness", "ood", "efficiency", "harness")


def fmt(value: Optional[float], digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"


def fmt_count(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[j]) for r in rows)) if rows else len(h) for j, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _get(node: Any, *keys) -> Any:
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def render_table(summary: dict) -> str:
    ref = summary["reference"]
    labels = [m["label"] for m in summary["models"]]
    params = {m["label"]: m.get("parameters") for m in summary["models"]}
    tasks = summary["tasks"]
    blocks = []
    headers = ["model", "params"]
    for t in tasks:
        arrow = "↓" if t["primary_metric"] in LOWER_IS_BETTER else "↑"
        headers += [f"{t['name']} {t['primary_metric']} {arrow}", "ret %"]
    rows = []
    for label in labels:
        row = [label + (" (ref)" if label == ref else ""), fmt_count(params.get(label))]
        for t in tasks:
            row.append(fmt(_get(summary["results"], label, t["name"], t["primary_metric"])))
            ret = _get(summary["retention"], label, t["name"], t["primary_metric"])
            row.append("n/a" if ret is None else f"{ret:.1f}")
        rows.append(row)
    if tasks:
        blocks.append(table(headers, rows))
    if summary.get("agreement"):
        rows = []
        for label, per_task in summary["agreement"].items():
            for task, a in per_task.items():
                rows.append([label, task, fmt(a.get("kl_to_teacher")), fmt(a.get("top1_agreement")), fmt(a.get("ece")),
                             fmt(a.get("tokens"))])
        blocks.append(f"agreement with {ref} (per token):\n" +
                      table(["model", "task", "KL(t||s) ↓", "top-1 ↑", "ECE ↓", "tokens"], rows))
    if summary.get("robustness"):
        rows = []
        for label, per_task in summary["robustness"].items():
            for task, r in per_task.items():
                asr = r.get("asr") or {}
                rows.append([label, task, fmt(r.get("clean_accuracy")), str(r.get("n_correct_clean", "n/a")),
                             *(fmt(asr.get(k)) for k in ("char", "word", "sentence", "overall"))])
        blocks.append("robustness (attack success rate among clean-correct examples):\n" +
                      table(["model", "task", "clean acc", "n correct", "ASR char", "word", "sentence", "overall"], rows))
    if summary.get("ood"):
        rows = []
        for label, per_task in summary["ood"].items():
            for task, o in per_task.items():
                for name, value in (o.get("ood") or {}).items():
                    rows.append([label, task, name, fmt(o.get("in_distribution")), fmt(value), fmt(_get(o, "drop", name)),
                                 fmt(_get(o, "relative_drop", name), 1)])
        blocks.append("out of distribution (primary metric):\n" +
                      table(["model", "task", "set", "in-dist", "OOD", "drop", "drop %"], rows))
    if summary.get("efficiency"):
        rows = []
        for label, e in summary["efficiency"].items():
            ratio = (e.get("ratios") or {}).get("latency_ms_p50")
            rows.append([label, fmt_count(e.get("parameters")), fmt(e.get("disk_mb"), 1), fmt(e.get("peak_memory_mb"), 1),
                         fmt(e.get("latency_ms_p50"), 2), fmt(e.get("latency_ms_p95"), 2), fmt(e.get("throughput_tok_s"), 1),
                         "" if ratio is None else f"{ratio:.2f}x"])
        blocks.append(f"efficiency on {summary['device']}:\n" + table(
            ["model", "params", "disk MiB", "peak MiB", "ms/tok p50", "p95", "tok/s", "p50 vs ref"], rows))
    if summary.get("harness"):
        rows = [[label, task, metric, fmt(v)] for label, per_task in summary["harness"].items()
                for task, ms in per_task.items() for metric, v in ms.items()]
        blocks.append("lm-evaluation-harness:\n" + table(["model", "task", "metric", "value"], rows))
    for note in summary.get("notes") or []:
        blocks.append(f"note: {note}")
    return "\n\n".join(blocks)
