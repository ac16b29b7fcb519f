"""`kdlm compare GRID.yaml -o DIR [--print-commands] [--collect-only]`: the parser and the command."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare",
        help="run distillation variants of one recipe at an equal budget, evaluate each against the teacher, and "
             "report them side by side with bootstrap intervals",
        description="Each variant of GRID (a base recipe plus --set overrides) runs as a plain `kdlm distill`, then "
                    "`kdlm eval` against the teacher, in DIR/variants/<name>/seed<k>/; baselines (the teacher, the "
                    "initial student, SFT on the same data) are added unless the grid turns them off. Finished "
                    "steps are skipped and a half-finished distillation resumes from its checkpoint, so rerunning "
                    "the command continues a comparison. Ends with DIR/compare.json and the report in DIR/report/. "
                    "docs/guides/choosing_a_method.md explains the grid file.")
    p.add_argument("grid", help="grid YAML file")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="comparison folder (created; reused to resume)")
    p.add_argument("--print-commands", action="store_true",
                   help="print the plain kdlm commands (setup, one line per variant job, collect) for a scheduler "
                        "such as a Slurm array or a CI matrix, and run nothing")
    p.add_argument("--collect-only", action="store_true",
                   help="run nothing; rebuild compare.json and the report from what has finished")
    p.add_argument("--resamples", type=int, default=1000, metavar="B", help="bootstrap resamples (default: 1000)")
    return p


def run_compare_command(args: argparse.Namespace) -> int:
    from kdlm.compare.collect import collect
    from kdlm.compare.grid import load_grid
    from kdlm.compare.run import print_commands, run_grid
    from kdlm.errors import ConfigError

    if args.resamples < 100:
        raise ConfigError(f"--resamples must be >= 100 (got {args.resamples})")
    grid = load_grid(args.grid, print_commands=args.print_commands)
    out = Path(args.output)
    if args.print_commands:
        print(print_commands(grid, out))
        return 0
    if not args.collect_only:
        run_grid(grid, out)
    result = collect(grid, out, resamples=args.resamples)
    from kdlm.compare.report import render_summary, write_compare_report

    print(render_summary(result))
    report = write_compare_report(out, result)
    failed = [v["name"] for v in result["variants"] if v["status"] == "failed"]
    print(f"kdlm: comparison written to {out / 'compare.json'}" + (f"; report {report}" if report else ""))
    if failed:
        print(f"kdlm: {len(failed)} variant(s) failed: {', '.join(failed)} (errors in compare.json and {out / 'logs'})")
    return 1 if failed else 0
