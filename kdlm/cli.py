"""The `kdlm` command line.

    kdlm distill RECIPE.yaml [--set key=value ...] [--resume]
    kdlm init-student --teacher MODEL --layers N --output DIR
    kdlm quickstart [--output DIR]
    kdlm check RECIPE.yaml [--set key=value ...]     validate and print the resolved recipe
    kdlm config-reference [--output FILE]            the generated recipe reference (Markdown)

Bad input ends with one line `kdlm: error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
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

    p = sub.add_parser("check", help="validate a recipe and print it fully resolved; loads no model")
    p.add_argument("recipe", help="recipe YAML file")
    _add_set(p)

    p = sub.add_parser("init-student", help="make a student by keeping a subset of a model's decoder layers")
    p.add_argument("--teacher", required=True, help="model to take layers from: hub id, folder, .gguf or bundled alias")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--layers", type=int, help="number of layers to keep, spread uniformly (first and last kept)")
    group.add_argument("--layer-list", help="explicit comma-separated layer indices, e.g. 0,3,6,9")
    p.add_argument("--output", required=True, help="folder to write the student to (must not exist or be empty)")
    p.add_argument("--gguf-file", help="GGUF file name inside --teacher when it is a folder of GGUF files")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repository's own code")

    p = sub.add_parser("quickstart", help="distil the bundled SmolLM2-135M-Instruct into a 10-layer student (CPU, minutes)")
    p.add_argument("--output", default="runs/quickstart", help="run folder (default: runs/quickstart)")
    _add_set(p)

    p = sub.add_parser("config-reference", help="print the recipe reference generated from the config classes")
    p.add_argument("--output", help="write to this file instead of stdout")
    return parser


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


def cmd_check(args: argparse.Namespace) -> int:
    from kdlm.config import dump_yaml, load_recipe

    print(dump_yaml(load_recipe(args.recipe, args.overrides)), end="")
    return 0


def cmd_init_student(args: argparse.Namespace) -> int:
    from kdlm.errors import ConfigError, OutputError
    from kdlm.models.init_student import keep_layers, parameter_count
    from kdlm.models.loading import load_model, load_tokenizer, resolve_source
    from kdlm.training.export import save_student_folder

    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise OutputError(f"{out}: output folder is not empty")
    keep: int | list[int] = args.layers
    if args.layer_list:
        try:
            keep = [int(x) for x in args.layer_list.split(",")]
        except ValueError:
            raise ConfigError(f"--layer-list {args.layer_list!r}: expected comma-separated integers") from None
    import torch

    source = resolve_source(args.teacher, args.gguf_file)
    model = load_model(source, dtype=torch.float32, device=torch.device("cpu"), trust_remote_code=args.trust_remote_code)
    before = parameter_count(model)
    kept = keep_layers(model, keep)
    tokenizer = load_tokenizer(source, trust_remote_code=args.trust_remote_code)
    card = (f"# Student initialised from `{args.teacher}`\n\nMade with `kdlm init-student`: decoder layers {kept} "
            f"kept ({parameter_count(model) / 1e6:.1f}M of {before / 1e6:.1f}M parameters). Distil it before use.\n")
    save_student_folder(model, tokenizer, out, card)
    print(f"kdlm: kept layers {kept}: {parameter_count(model) / 1e6:.1f}M parameters (from {before / 1e6:.1f}M) -> {out}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from kdlm.quickstart.run import run_quickstart

    run_quickstart(Path(args.output), overrides=args.overrides)
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from kdlm.config import config_reference

    text = config_reference() + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text, end="")
    return 0


def _print_result(result) -> None:
    print(f"kdlm: {result.steps} steps; student saved to {result.model_dir}")
    if result.after:
        print(f"{'':18} {'CE':>8} {'KL':>8} {'top-1':>7}")
        for name, m in (("initial student", result.before), ("distilled student", result.after)):
            print(f"{name:18} {m['ce']:8.4f} {m['kl_to_teacher']:8.4f} {m['top1_agreement']:7.2%}")


COMMANDS = {
    "distill": cmd_distill,
    "check": cmd_check,
    "init-student": cmd_init_student,
    "quickstart": cmd_quickstart,
    "config-reference": cmd_config_reference,
}

if __name__ == "__main__":
    sys.exit(main())
