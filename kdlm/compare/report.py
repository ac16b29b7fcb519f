"""The terminal table of a comparison and its `kdlm report` page (kdlm.report renders compare.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def _cell(cell: Optional[dict]) -> str:
    if not cell or cell.get("value") is None:
        return "n/a"
    text = f"{cell['value']:.4g}"
    if cell.get("ci_low") is not None:
        text += f" [{cell['ci_low']:.3g}, {cell['ci_high']:.3g}]"
    if cell.get("std") is not None:
        text += f" ±{cell['std']:.2g}"
    return text


def render_summary(result: dict, groups: tuple[str, ...] = ("task", "robustness", "ood")) -> str:
    """A plain-text table: variants x the task, robustness and OOD metrics, value [95% interval], and `*` where
    the paired difference to the baseline is significant."""
    metrics = [m for m in result["metrics"] if m["group"] in groups]
    lines = [f"{result['grid']}: budget {result['budget']['description']}, seeds {result['seeds']}, "
             f"baseline {result['baseline']} (* = paired-bootstrap 95% interval of the difference excludes 0)"]
    for m in metrics:
        lines.append(f"\n{m['label']} ({'higher' if m['higher_is_better'] else 'lower'} is better)")
        for v in result["variants"]:
            name = v["name"]
            if v["status"] != "done":
                lines.append(f"  {name:<22} {v['status']}" + (f": {v['error']}" if v.get("error") else ""))
                continue
            cell = result["table"].get(name, {}).get(m["key"])
            if cell is None:
                continue
            diff = result["differences"].get(name, {}).get(m["key"])
            mark = ""
            if diff and diff.get("diff") is not None:
                mark = f"  {diff['diff']:+.3g} vs {diff['vs']}{' *' if diff['significant'] else ' n.s.'}"
            best = " (best)" if result["best"].get(m["key"]) == name else ""
            lines.append(f"  {name:<22} {_cell(cell)}{mark}{best}")
    return "\n".join(lines)


def write_compare_report(out: Path, result: dict) -> Optional[Path]:
    """OUT/report/report.html through `kdlm report`; None (with a note printed) when the report fails."""
    import sys

    from kdlm.errors import KdlmError
    from kdlm.report.build import make_report

    try:
        _, html = make_report([out], out / "report", title=f"kdlm compare: {result['grid']}")
    except KdlmError as err:
        print(f"kdlm: the report could not be written ({err}); compare.json is complete", file=sys.stderr)
        return None
    return html
