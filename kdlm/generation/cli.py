"""`kdlm generate RECIPE.yaml`: the command line of black-box data generation."""

from __future__ import annotations

import argparse


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="have a teacher write training data (responses, self_instruct, cot, "
                                        "step_by_step, context) into a dataset folder")
    p.add_argument("recipe", help="generation recipe YAML file (sections teacher, generate, output)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set generate.n=4 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the number of requests and a token estimate; send nothing")
    p.add_argument("--max-requests", type=int, metavar="N", help="send at most N new requests, then stop (re-run to continue)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="stop sending once N prompt + completion tokens are used")
    p.add_argument("--max-cost", type=float, metavar="X", help="stop sending once the cost ledger reaches X "
                   "(needs teacher.price_input_per_1m / price_output_per_1m)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_generate_command(args: argparse.Namespace) -> int:
    from kdlm.config.generation import load_generate_recipe
    from kdlm.errors import ConfigError
    from kdlm.generation.run import Limits, generate

    recipe = load_generate_recipe(args.recipe, args.overrides)
    for flag in ("max_requests", "max_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be >= 1")
    if args.max_cost is not None and not (recipe.teacher.price_input_per_1m or recipe.teacher.price_output_per_1m):
        raise ConfigError("--max-cost: set teacher.price_input_per_1m and/or teacher.price_output_per_1m first")
    result = generate(recipe, limits=Limits(args.max_requests, args.max_tokens, args.max_cost), dry_run=args.dry_run,
                      show_progress=not args.no_progress)
    return 3 if result.summary.get("stopped") else 0
