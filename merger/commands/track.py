"""`merger track sync RUN_DIR`: back-fill a tracker from a run's ledger (merger.tracking)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    track = subparsers.add_parser("track", help="experiment tracking (MLflow) of runs")
    commands = track.add_subparsers(dest="track_command", required=True, metavar="COMMAND")
    sync = commands.add_parser(
        "sync", help="log what a finished or interrupted run's ledger holds and its MLflow run lacks"
    )
    sync.add_argument("run_dir", type=Path, help="run directory")
    sync.add_argument("--uri", help="tracking URI (default: the run's tracking.uri, else sqlite beside the run)")
    sync.add_argument("--experiment", help="experiment for a run not tracked yet (default: the run's name)")
    sync.set_defaults(handler=sync_command)


def sync_command(args: argparse.Namespace) -> int:
    from merger.tracking import sync_run

    tracker = sync_run(args.run_dir, uri=args.uri, experiment=args.experiment)
    print(f"synced {args.run_dir} to MLflow run {tracker.run_id} in {tracker.store.uri}")
    return 0
