"""`kdlm cache-teacher`: the sub-command as kdlm/cli.py will wire it."""

from __future__ import annotations

import argparse
import json

from kdlm.cache.cli import add_cache_parser, run_cache_command


def _parse(argv):
    parser = argparse.ArgumentParser(prog="kdlm")
    add_cache_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cache_teacher_command_on_a_tiny_recipe(make_recipe, tmp_path, capsys):
    make_recipe()  # writes tmp_path/recipe.yaml
    recipe_file = tmp_path / "recipe.yaml"
    args = _parse(["cache-teacher", str(recipe_file), "--set", "teacher.cache_top_k=16", "--set",
                   f"teacher.cache_dir={tmp_path / 'c16'}", "--shard-rows", "80", "--batch-size", "3", "--no-progress"])
    assert args.command == "cache-teacher"
    assert run_cache_command(args) == 0
    manifest = json.loads((tmp_path / "c16" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["k"] == 16 and manifest["bytes_per_position"] == 64
    assert manifest["layout"]["shards"] > 1
    assert "bytes/position" in capsys.readouterr().out
    assert run_cache_command(args) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_default_folder_is_under_the_run(make_recipe, tmp_path):
    make_recipe()
    args = _parse(["cache-teacher", str(tmp_path / "recipe.yaml"), "--set", "teacher.cache_dir=null", "--no-progress"])
    assert run_cache_command(args) == 0
    assert (tmp_path / "run" / "teacher_cache" / "manifest.json").is_file()
