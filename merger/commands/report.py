"""`merger report RUN_DIR`: an HTML page with PNG plots of a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from merger.common.extras import require_extra


def register(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser(
        "report", help="write an HTML report with plots of a run (finished or not)"
    )
    report.add_argument("run_dir", type=Path, help="the run directory")
    report.add_argument(
        "--out", type=Path, help="where to write report.html and its PNGs (default: the run directory)"
    )
    report.set_defaults(handler=report_command)


def report_command(args: argparse.Namespace) -> int:
    require_extra("report", "merger report")
    from merger.report.report import write_report

    files = write_report(args.run_dir, args.out)
    print(files.html)
    return 0
