"""Run (or collect) a shipped `kdlm compare` grid and commit its table: results/compare_<grid>.{json,md}.

    python benchmarks/compare_grids.py smollm2            # runs benchmarks/grids/smollm2.yaml into runs/compare_smollm2
    python benchmarks/compare_grids.py gemma3 --collect   # only rebuild the results from a finished folder

The JSON is compare.json (every variant's metrics as value, ci_low, ci_high) plus the machine, versions, the
wall-clock time of each step (from each variant's status.json) and the date. Evaluation data: ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, utc_now, versions  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", choices=sorted(p.stem for p in (REPO / "benchmarks" / "grids").glob("*.yaml")))
    parser.add_argument("--collect", action="store_true", help="do not run anything; collect what has finished")
    parser.add_argument("--output", help="comparison folder (default: runs/compare_<grid>)")
    args = parser.parse_args()
    grid = REPO / "benchmarks" / "grids" / f"{args.grid}.yaml"
    out = Path(args.output or REPO / "runs" / f"compare_{args.grid}")
    cmd = [sys.executable, "-m", "kdlm", "compare", str(grid.relative_to(REPO)), "-o", str(out)]
    if args.collect:
        cmd.append("--collect-only")
    code = subprocess.run(cmd, cwd=REPO).returncode
    result_file = out / "compare.json"
    if not result_file.is_file():
        print(f"no {result_file}: the comparison did not get far enough", file=sys.stderr)
        return code or 1

    from kdlm.compare.report import render_summary

    result = json.loads(result_file.read_text())
    seconds = {}
    for status in sorted(out.glob("variants/*/seed*/status.json")):
        seconds[f"{status.parent.parent.name}/{status.parent.name}"] = json.loads(status.read_text())
    result["environment"] = {"machine": machine_info(), "versions": versions("torch", "transformers", "accelerate"),
                             "date": utc_now(), "steps": seconds}
    dest = REPO / "benchmarks" / "results" / f"compare_{args.grid}"
    dest.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# kdlm compare: {args.grid}", "", f"{result['environment']['machine']['cpu']}, "
          f"{result['environment']['machine']['cores']} cores; {result['environment']['date']}; "
          f"kdlm {result['environment']['versions'].get('kdlm_git')}.", "",
          f"Grid `benchmarks/grids/{args.grid}.yaml`: {result['description']}.", "", "```text",
          render_summary(result, groups=("task", "robustness", "ood", "efficiency", "training")), "```", ""]
    dest.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {dest.with_suffix('.json')} and {dest.with_suffix('.md')}")
    return code


if __name__ == "__main__":
    sys.exit(main())
