"""`kdlm cache-teacher RECIPE [--set k=v]...`: the argument parser and the command, for kdlm/cli.py to wire in.

    from kdlm.cache.cli import add_cache_parser, run_cache_command
    add_cache_parser(sub)                        # registers the `cache-teacher` sub-command
    COMMANDS["cache-teacher"] = run_cache_command
"""

from __future__ import annotations

import argparse
from typing import Optional


def add_cache_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `cache-teacher` sub-command to an argparse sub-parsers object; returns its parser."""
    p = subparsers.add_parser(
        "cache-teacher",
        help="run the teacher once over the recipe's data and store its top-k log-probabilities",
        description="Run the recipe's teacher once over its train and validation data and write its top-k "
                    "log-probabilities (teacher.cache_top_k, at teacher.cache_temperature) to teacher.cache_dir "
                    "(default <output.dir>/teacher_cache), for training with teacher.source: cache. An interrupted "
                    "capture resumes where it stopped; an identical complete cache is left as it is; a folder "
                    "holding a different cache is refused.",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set teacher.cache_top_k=32 (repeatable)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="examples per teacher forward (default: train.batch_size)")
    p.add_argument("--shard-rows", type=int, default=None, metavar="N",
                   help="positions per shard file of a new cache (default: 1048576, 256 MiB at k=64)")
    p.add_argument("--from-logprobs", action="store_true",
                   help="grey-box KD: build the cache from the top-k log-probs that `kdlm generate` (generate.logprobs) "
                        "stored in the data rows (an API or vLLM teacher), without loading the teacher's weights")
    p.add_argument("--teacher", default=None, metavar="NAME",
                   help="multi-teacher recipes (teachers:): cache the teacher of this name (default: the first)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run_cache_command(args: argparse.Namespace) -> int:
    """Load the recipe and capture (or finish, or confirm) its teacher cache. Bad input raises a KdlmError."""
    from kdlm.cache.capture import capture_teacher
    from kdlm.config import load_recipe

    recipe = single_teacher(load_recipe(args.recipe, args.overrides), args.teacher)
    capture_teacher(recipe, show_progress=not args.no_progress, batch_size=args.batch_size,
                    shard_rows=args.shard_rows, from_logprobs=args.from_logprobs)
    return 0


def single_teacher(recipe, name: Optional[str]):
    """The recipe as seen by one of its teachers (`teachers:` by name; the first when None)."""
    import dataclasses

    from kdlm.errors import ConfigError

    if not recipe.multi_teacher:
        if name is not None:
            raise ConfigError(f"--teacher {name}: the recipe has a single teacher (no `teachers:` list)")
        return recipe
    names = recipe.teacher_names()
    if name is not None and name not in names:
        raise ConfigError(f"--teacher {name}: no teacher of that name; the recipe's teachers are {', '.join(names)}")
    return dataclasses.replace(recipe, teacher=recipe.teachers[names.index(name) if name else 0], teachers=[])
