"""The `merger` command: argument parsing, exit codes, and user-facing errors."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from merger.common.errors import MergerError, clip

# One module per area under merger/commands/, each with `register(subparsers)`.
COMMAND_MODULES: tuple[str, ...] = (
    "run", "status", "router", "pool", "registry", "zoo", "report", "recipes", "import_evolve", "track",
)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command killed by it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="merger", description="Evolutionary model merging: search, publish, route."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"merger.commands.{name}").register(subparsers)
    return parser


def _quiet_libraries(verbose: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not verbose:  # library progress bars (lm-eval, datasets, transformers) drown ours; tqdm reads this at import
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # else mlflow logs INFO lines at import
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    if not verbose:
        for noisy in ("lm_eval", "lm-eval", "mergekit", "transformers", "datasets", "accelerate", "mlflow", "alembic"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    # Before any command module is imported: tqdm and the HF libraries read these at import time.
    _quiet_libraries(verbose="-v" in arguments or "--verbose" in arguments)
    args = build_parser().parse_args(arguments)
    try:
        return int(args.handler(args) or 0)
    except MergerError as error:
        print(f"merger: error: {clip(str(error))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("merger: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`merger recipes | head -1`): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # flushing at exit must not fail again
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
