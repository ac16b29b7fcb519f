"""`kdlm report FOLDER ... -o DIR`: the argument parser and the command, for kdlm/cli.py to wire in.

    from kdlm.report.cli import add_report_parser, run_report_command
    add_report_parser(sub)                 # registers the `report` sub-command
    COMMANDS["report"] = run_report_command
"""

from __future__ import annotations

import argparse


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `report` sub-command to an argparse sub-parsers object; returns its parser."""
    p = subparsers.add_parser(
        "report",
        help="write a Markdown + self-contained HTML report from eval, run and compare folders",
        description="Write DIR/report.md (with PNG charts beside it) and DIR/report.html (one self-contained page) "
                    "from evaluation folders (summary.json, from `kdlm eval`), distillation run folders "
                    "(resolved_config.yaml + metrics.jsonl, from `kdlm distill`) and compare folders "
                    "(compare.json, from `kdlm compare`). Several evaluation folders are merged: models by label, "
                    "tasks by name, later folders adding to earlier ones. A compare folder becomes the report's "
                    "first section, Method comparison (every variant against the baseline, with 95% intervals "
                    "and its runs' training curves); its per-variant eval folders are not merged into the others.",
    )
    p.add_argument("inputs", nargs="+", metavar="FOLDER",
                   help="evaluation folder, distillation run folder or compare folder (repeatable)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="folder to write report.md, its PNGs and report.html to (created if missing; "
                        "an existing report there is replaced once the new one is fully rendered)")
    p.add_argument("--title", default="kdlm report", help="report title (default: kdlm report)")
    return p


def run_report_command(args: argparse.Namespace) -> int:
    """Build and write the report; bad input raises a KdlmError (DataError/OutputError) naming the path."""
    from kdlm.report.build import make_report

    md_path, html_path = make_report(args.inputs, args.output, title=args.title)
    print(f"kdlm: report written to {md_path} and {html_path}")
    return 0
