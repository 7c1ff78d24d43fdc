"""`merger recipes`: list the bundled recipes, print one, or copy one out to run or edit it."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    recipes = subparsers.add_parser("recipes", help="the bundled recipes: list, show, copy")
    recipes.set_defaults(handler=list_command)
    commands = recipes.add_subparsers(dest="recipes_command", metavar="RECIPES_COMMAND")

    listing = commands.add_parser("list", help="each bundled recipe's name and first comment line (default)")
    listing.set_defaults(handler=list_command)

    show = commands.add_parser("show", help="print a bundled recipe (its paths into the bundled tasks absolute)")
    show.add_argument("name", help="a name from `merger recipes list`")
    show.set_defaults(handler=show_command)

    copy = commands.add_parser("copy", help="copy a bundled recipe into DEST (default: the current directory)")
    copy.add_argument("name", help="a name from `merger recipes list`")
    copy.add_argument("dest", nargs="?", type=Path, default=Path("."), help="a directory or a new file name")
    copy.set_defaults(handler=copy_command)


def _summary(path: Path) -> str:
    """The recipe's first comment line, without the '#'."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def list_command(args: argparse.Namespace) -> int:
    from merger.common.bundled import bundled_dir, bundled_recipes

    recipes = bundled_recipes()
    if not recipes:
        print(f"no bundled recipes under {bundled_dir('recipes')}")
        return 0
    width = max(len(name) for name in recipes)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {_summary(path)}")
    print(f"(under {bundled_dir('recipes')}; `merger recipes copy NAME [DEST]` writes one where you can run it)")
    return 0


def show_command(args: argparse.Namespace) -> int:
    from merger.common.bundled import bundled_recipe, portable_recipe_text

    print(portable_recipe_text(bundled_recipe(args.name)), end="")
    return 0


def copy_command(args: argparse.Namespace) -> int:
    from merger.common.bundled import copy_recipe

    target = copy_recipe(args.name, args.dest)
    print(f"wrote {target}")
    return 0
