"""`merger import-evolve CONFIG.yml [-o recipe.yaml]`: a mergekit-evolve configuration as a recipe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from merger.common.errors import MergerError, shown


def register(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser(
        "import-evolve",
        help="turn a mergekit-evolve configuration into a recipe with the same search space",
    )
    command.add_argument("config", type=Path, help="the mergekit-evolve YAML")
    command.add_argument("-o", "--output", type=Path, help="write the recipe here (default: print it)")
    command.add_argument(
        "--task-search-path", action="append", default=[], metavar="DIR",
        help="mergekit-evolve's --task-search-path: the recipe's task_paths (repeatable)",
    )
    command.add_argument(
        "--num-layers", type=int, default=None,
        help="the models' layer count, for layer_granularity 0 when the first model's config is not local",
    )
    command.add_argument("--trust-remote-code", action="store_true", help="as mergekit-evolve's flag")
    command.set_defaults(handler=import_evolve_command)


def import_evolve_command(args: argparse.Namespace) -> int:
    from merger.recipe import load_recipe
    from merger.recipe.evolve_import import import_evolve, recipe_yaml, validated

    if args.num_layers is not None and args.num_layers < 1:
        raise MergerError(f"--num-layers must be at least 1, got {args.num_layers}")
    if not args.config.is_file():
        raise MergerError(f"{shown(str(args.config))} is not a file")
    task_paths = [str(Path(p).resolve()) for p in args.task_search_path]
    imported = import_evolve(
        args.config, num_layers=args.num_layers, task_paths=task_paths, trust_remote_code=args.trust_remote_code
    )
    validated(imported, str(args.config))
    text = recipe_yaml(imported, args.config)
    if args.output is None:
        print(text, end="")
    else:
        if args.output.exists():
            raise MergerError(f"{shown(str(args.output))} already exists; remove it or name another file")
        args.output.write_text(text)
        load_recipe(args.output)  # the file as `merger run` will read it
        print(f"wrote {args.output}", file=sys.stderr)
    if imported.implied:
        print("import-evolve: " + "; ".join(imported.implied), file=sys.stderr)
    if imported.unmapped:
        print("import-evolve: no equivalent in merger: " + "; ".join(imported.unmapped), file=sys.stderr)
    return 0
