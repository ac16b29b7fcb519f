"""`kdlm eval MODEL [MODEL ...] --task TASK ... --output DIR`: the argument parser and the command, for kdlm/cli.py.

    from kdlm.evaluation.cli import add_eval_parser, run_eval_command
    add_eval_parser(sub)                   # registers the `eval` sub-command
    COMMANDS["eval"] = run_eval_command

Also runnable on its own: `python -m kdlm.evaluation.cli MODEL --task selfinst --output DIR` (errors as `kdlm`
prints them: one line `kdlm: error: ...`, exit status 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

DATA_DIR_ENV = "KDLM_DATA_DIR"


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `eval` sub-command to an argparse sub-parsers object; returns its parser."""
    from kdlm.evaluation.tasks import builtin_task_names

    p = subparsers.add_parser(
        "eval",
        help="evaluate a teacher and its students on tasks: quality, retention, agreement, robustness, efficiency",
        description="Evaluate models on evaluation tasks and write OUT/<model>/<task>/predictions.jsonl and metrics.json "
                    "for each, and OUT/summary.json (the input of `kdlm report`). The first MODEL, or --teacher, is the "
                    "reference: every other model's metrics are also given as a percentage of its (retention), "
                    "with the token-level KL and top-1 agreement to it. Built-in tasks: "
                    + ", ".join(builtin_task_names()) + "; or a task .yaml file (docs/reference/task_files.md).",
    )
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="model: hub id, HF folder, .gguf file, bundled alias, or a kdlm run folder (its model/)")
    p.add_argument("--task", dest="tasks", action="append", default=[], metavar="TASK",
                   help="built-in task name or task .yaml file (repeatable; also comma-separated)")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="folder to write predictions, metrics and summary.json to")
    p.add_argument("--teacher", metavar="MODEL",
                   help="reference model for retention and agreement (default: the first MODEL; evaluated too)")
    p.add_argument("--reference-from", metavar="EVAL_DIR",
                   help="reuse the reference model's predictions and figures from an earlier `kdlm eval` folder with "
                        "the same tasks and settings instead of recomputing them (it is still loaded for agreement)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N examples of each data set (default: all)")
    p.add_argument("--data-dir", metavar="DIR",
                   help=f"folder that task data sources are relative to (default: ${DATA_DIR_ENV}, else the current folder)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts per batch (default: 8)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="generation length cap for every task (default: the task's)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of sampling and of perturbations (default: 0)")
    p.add_argument("--robustness", action="store_true",
                   help="also attack each input with char/word/sentence perturbations (attack success rate) and "
                        "evaluate the tasks' OOD and adversarial sets")
    p.add_argument("--efficiency", action="store_true",
                   help="also measure parameters, disk size, peak memory, latency per token and throughput")
    p.add_argument("--harness", metavar="TASKS",
                   help="comma-separated lm-evaluation-harness tasks to run on the same models (needs `pip install lm-eval`)")
    j = p.add_argument_group(
        "LLM-as-judge", "pairwise win rate of each student against the reference on generation tasks, judged by a "
                        "model behind an OpenAI-compatible server; each example is judged twice, positions swapped")
    j.add_argument("--judge-url", metavar="URL",
                   help="the judge server's OpenAI-compatible base URL, e.g. http://127.0.0.1:8765/v1 (default: no judge)")
    j.add_argument("--judge-model", metavar="NAME", help="the judge's served model name (default: the first the server lists)")
    j.add_argument("--judge-api-key-env", metavar="VAR", help="environment variable holding the judge server's API key")
    j.add_argument("--judge-prompt", metavar="FILE",
                   help="judge prompt file with {instruction}, {answer_a}, {answer_b} (default: the shipped "
                        "judge_pairwise_v1.txt)")
    j.add_argument("--judge-max-tokens", type=int, default=256, metavar="N",
                   help="longest judge answer in tokens (default: 256)")
    j.add_argument("--judge-concurrency", type=int, default=4, metavar="N",
                   help="judge requests in flight at once (default: 4)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model weights' dtype (default: auto = bf16 on a GPU that supports it, else fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace an evaluation already in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or status lines")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repository's own code")
    return p


def settings_from_args(args: argparse.Namespace):
    from kdlm.evaluation.harness import parse_tasks
    from kdlm.evaluation.run import EvalSettings

    tasks = [t.strip() for value in args.tasks for t in value.split(",") if t.strip()]
    data_dir = args.data_dir or os.environ.get(DATA_DIR_ENV) or "."
    return EvalSettings(
        models=list(args.models), tasks=tasks, output=Path(args.output), data_dir=Path(data_dir).expanduser(),
        teacher=args.teacher, reference_from=Path(args.reference_from) if args.reference_from else None,
        limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        sample=args.sample, temperature=args.temperature, seed=args.seed, robustness=args.robustness,
        efficiency=args.efficiency, harness=parse_tasks(args.harness) if args.harness else [], device=args.device,
        dtype=args.dtype, show_progress=not args.no_progress, overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code, judge_url=args.judge_url, judge_model=args.judge_model,
        judge_api_key_env=args.judge_api_key_env, judge_prompt=args.judge_prompt, judge_max_tokens=args.judge_max_tokens,
        judge_concurrency=args.judge_concurrency)


def run_eval_command(args: argparse.Namespace) -> int:
    """Run the evaluation, print the summary table; bad input raises a KdlmError (ConfigError/DataError/...)."""
    from kdlm.evaluation.run import run_evaluation
    from kdlm.evaluation.summary import render_table

    settings = settings_from_args(args)
    summary = run_evaluation(settings)
    print(render_table(summary))
    print(f"kdlm: evaluation written to {settings.output / 'summary.json'}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from kdlm.errors import KdlmError

    parser = argparse.ArgumentParser(prog="kdlm")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return run_eval_command(args)
    except KdlmError as err:
        print(f"kdlm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
