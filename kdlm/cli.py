"""The `kdlm` command line.

    kdlm distill RECIPE.yaml [--set key=value ...] [--resume]
    kdlm generate RECIPE.yaml [--set ...] [--dry-run]  the teacher writes training data (black-box KD)
    kdlm init-student --teacher MODEL --layers N [--method M] [width flags] --output DIR
    kdlm cache-teacher RECIPE.yaml                   run the teacher once, store its top-k log-probs
    kdlm quickstart [--output DIR]
    kdlm check RECIPE.yaml [--set key=value ...]     validate and print the resolved recipe
    kdlm plan RECIPE.yaml [--set key=value ...]      estimate peak memory and speed before a run
    kdlm eval MODEL ... --task TASK --output DIR     task metrics, retention, robustness, efficiency
    kdlm report RUN_OR_EVAL_DIR ... -o DIR           Markdown + HTML report of runs and evaluations
    kdlm compare GRID.yaml -o DIR [--print-commands] methods side by side at an equal budget, with intervals
    kdlm config-reference [--output FILE]            the generated recipe reference (Markdown)

Bad input ends with one line `kdlm: error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from kdlm import __version__
from kdlm.errors import KdlmError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdlm", description="Knowledge distillation for large language models.")
    parser.add_argument("--version", action="version", version=f"kdlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("distill", help="distil a student from a teacher as a recipe describes")
    p.add_argument("recipe", help="recipe YAML file")
    _add_set(p)
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")

    p = sub.add_parser("plan", help="estimate a run's peak memory and speed on this device, and suggest settings")
    p.add_argument("recipe", help="recipe YAML file")
    _add_set(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser("check", help="validate a recipe and print it fully resolved; loads no model")
    p.add_argument("recipe", help="recipe YAML file")
    _add_set(p)

    p = sub.add_parser("init-student", help="make a student from a model: keep some decoder layers (uniformly or by "
                       "importance) and optionally prune its width")
    p.add_argument("--teacher", required=True, help="model to take layers from: hub id, folder, .gguf or bundled alias")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--layers", type=int, help="number of layers to keep, chosen by --method")
    group.add_argument("--layer-list", help="explicit comma-separated layer indices, e.g. 0,3,6,9 (no scoring)")
    p.add_argument("--method", choices=("uniform", "block_influence", "removal_loss"), default="uniform",
                   help="how --layers picks layers: uniform stride (first and last kept), block influence "
                        "(ShortGPT) or calibration loss without the layer (Minitron); default uniform")
    p.add_argument("--iterative", action="store_true", help="drop one layer at a time and re-score the rest")
    p.add_argument("--no-keep-first", dest="keep_first", action="store_false",
                   help="allow dropping the first layer (block_influence / removal_loss)")
    p.add_argument("--keep-last", action="store_true", help="never drop the last layer (block_influence / removal_loss)")
    p.add_argument("--intermediate-size", type=int, help="width: MLP neurons kept per layer, by activation")
    p.add_argument("--kv-heads", type=int, help="width: KV groups (with their query heads) kept per layer")
    p.add_argument("--hidden-size", type=int, help="width: embedding channels kept, by activation")
    p.add_argument("--calibration", help="calibration data file (text, prompt/completion or messages rows); "
                                         "default: the quickstart prompts")
    p.add_argument("--calibration-samples", type=int, help="calibration rows to score with (default 64)")
    p.add_argument("--calibration-length", type=int, help="tokens per calibration row (default 256)")
    p.add_argument("--output", required=True, help="folder to write the student to (must not exist or be empty)")
    p.add_argument("--gguf-file", help="GGUF file name inside --teacher when it is a folder of GGUF files")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repository's own code")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on calibration passes")

    p = sub.add_parser("quickstart", help="distil the bundled SmolLM2-135M-Instruct into 15 of its layers, chosen by block influence (CPU, minutes)")
    p.add_argument("--output", default="runs/quickstart", help="run folder (default: runs/quickstart)")
    _add_set(p)

    from kdlm.cache.cli import add_cache_parser
    from kdlm.evaluation.cli import add_eval_parser
    from kdlm.generation.cli import add_generate_parser
    from kdlm.report.cli import add_report_parser

    add_generate_parser(sub)
    add_cache_parser(sub)
    add_eval_parser(sub)
    add_report_parser(sub)
    from kdlm.compare.cli import add_compare_parser

    add_compare_parser(sub)

    p = sub.add_parser("config-reference", help="print the recipe reference generated from the config classes")
    p.add_argument("--output", help="write to this file instead of stdout")

    p = sub.add_parser("cli-reference", help="print this command line's reference (Markdown), generated from the parser")
    p.add_argument("--output", help="write to this file instead of stdout")
    return parser


def cli_reference() -> str:
    """Markdown reference of every subcommand, generated from the argparse parser (docs/reference/cli.md)."""
    width = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; fix the width so the docs are reproducible
    try:
        parser = build_parser()
        return _reference_text(parser)
    finally:
        if width is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = width


def _reference_text(parser: argparse.ArgumentParser) -> str:
    lines = ["# Command-line reference", "", "Generated by `kdlm cli-reference`; do not edit by hand.", "",
             "```text", parser.format_help().strip(), "```", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        lines += [f"## `kdlm {name}`", "", "```text", p.format_help().strip(), "```", ""]
    return "\n".join(lines)


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.max_steps=50 (repeatable)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.command](args)
    except KdlmError as err:
        print(f"kdlm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdlm: interrupted; `kdlm distill RECIPE --resume` continues from the latest checkpoint", file=sys.stderr)
        return 130


def cmd_distill(args: argparse.Namespace) -> int:
    from kdlm.config import load_recipe
    from kdlm.training import distill

    recipe = load_recipe(args.recipe, args.overrides)
    result = distill(recipe, resume=args.resume, show_progress=not args.no_progress)
    _print_result(result)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from kdlm.config import load_recipe
    from kdlm.training.plan import estimate, render, to_json

    plan = estimate(load_recipe(args.recipe, args.overrides))
    print(to_json(plan) if args.json else render(plan))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from kdlm.config import dump_yaml, load_recipe

    print(dump_yaml(load_recipe(args.recipe, args.overrides)), end="")
    return 0


def cmd_init_student(args: argparse.Namespace) -> int:
    import json

    from kdlm.config.load import from_dict
    from kdlm.config.schema import PruneConfig
    from kdlm.errors import ConfigError, OutputError
    from kdlm.models.loading import load_model, load_tokenizer, resolve_source
    from kdlm.models.prune import load_calibration, prune_student
    from kdlm.training.export import save_student_folder

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        raise OutputError(f"{out}: output folder is not empty")
    keep: int | list[int] = args.layers
    if args.layer_list:
        try:
            keep = [int(x) for x in args.layer_list.split(",")]
        except ValueError:
            raise ConfigError(f"--layer-list {args.layer_list!r}: expected comma-separated integers") from None
    settings = {"method": args.method, "iterative": args.iterative, "keep_first": args.keep_first,
                "keep_last": args.keep_last, "intermediate_size": args.intermediate_size,
                "num_key_value_heads": args.kv_heads, "hidden_size": args.hidden_size,
                "calibration": args.calibration, "calibration_samples": args.calibration_samples,
                "calibration_length": args.calibration_length}
    cfg = from_dict(PruneConfig, {k: v for k, v in settings.items() if v is not None}, "student.prune.")
    import torch

    source = resolve_source(args.teacher, args.gguf_file)
    model = load_model(source, dtype=torch.float32, device=torch.device("cpu"), trust_remote_code=args.trust_remote_code)
    tokenizer = load_tokenizer(source, trust_remote_code=args.trust_remote_code)
    widths = any(v is not None for v in (cfg.intermediate_size, cfg.num_key_value_heads, cfg.hidden_size))
    needs_calibration = widths or (isinstance(keep, int) and cfg.method != "uniform")
    calibration = load_calibration(tokenizer, cfg) if needs_calibration else []
    report = prune_student(model, keep, cfg, calibration, show_progress=not args.no_progress)
    before, after = report.parameters
    card = (f"# Student initialised from `{args.teacher}`\n\nMade with `kdlm init-student`: decoder layers "
            f"{report.kept_layers} kept ({after / 1e6:.1f}M of {before / 1e6:.1f}M parameters). "
            f"Distil it before use.\n\n{report.markdown()}")
    save_student_folder(model, tokenizer, out, card)
    # `source` lets a recipe whose teacher is this same model map layers with `layers: kept`
    (out / "prune_report.json").write_text(json.dumps({**report.to_dict(), "source": args.teacher}, indent=2) + "\n")
    print(f"kdlm: {report.summary()} -> {out}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from kdlm.quickstart.run import run_quickstart

    run_quickstart(Path(args.output), overrides=args.overrides)
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from kdlm.config import config_reference

    _write_or_print(config_reference() + "\n", args.output)
    return 0


def cmd_cli_reference(args: argparse.Namespace) -> int:
    _write_or_print(cli_reference() + "\n", args.output)
    return 0


def _write_or_print(text: str, output: Optional[str]) -> None:
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
    else:
        print(text, end="")


def _print_result(result) -> None:
    print(f"kdlm: {result.steps} steps; student saved to {result.model_dir}")
    if result.after:
        # a run with no teacher (ce / redi only) validates CE alone
        columns = [(k, label, fmt) for k, label, fmt in (("ce", "CE", "8.4f"), ("kl_to_teacher", "KL", "8.4f"),
                                                         ("top1_agreement", "top-1", "7.2%")) if k in result.after]
        print(f"{'':18} " + " ".join(f"{label:>{8 if fmt != '7.2%' else 7}}" for _, label, fmt in columns))
        for name, m in (("initial student", result.before), ("distilled student", result.after)):
            print(f"{name:18} " + " ".join(format(m[k], fmt) for k, _, fmt in columns))


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from kdlm.cache.cli import run_cache_command

    return run_cache_command(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from kdlm.evaluation.cli import run_eval_command

    return run_eval_command(args)


def cmd_generate(args: argparse.Namespace) -> int:
    from kdlm.generation.cli import run_generate_command

    return run_generate_command(args)


def cmd_report(args: argparse.Namespace) -> int:
    from kdlm.report.cli import run_report_command

    return run_report_command(args)


def cmd_compare(args: argparse.Namespace) -> int:
    from kdlm.compare.cli import run_compare_command

    return run_compare_command(args)


COMMANDS = {
    "distill": cmd_distill,
    "compare": cmd_compare,
    "generate": cmd_generate,
    "eval": cmd_eval,
    "report": cmd_report,
    "cache-teacher": cmd_cache_teacher,
    "check": cmd_check,
    "plan": cmd_plan,
    "init-student": cmd_init_student,
    "quickstart": cmd_quickstart,
    "config-reference": cmd_config_reference,
    "cli-reference": cmd_cli_reference,
}

if __name__ == "__main__":
    sys.exit(main())
