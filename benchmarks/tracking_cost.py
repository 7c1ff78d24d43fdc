"""What MLflow tracking adds to a run: the tracker's own work, replayed on a finished run's ledger.

    python benchmarks/tracking_cost.py RUN_DIR [RUN_DIR ...]

For each finished run directory (untracked or not), a fresh SQLite store in a temporary directory gets
what a live tracked run would send: the store opened and the MLflow run made (as `merger run` does before
loading weights), the recipe's params, then the tracker's `search` call once per candidate and once per
generation, as `merger run` calls it after each (each call reads the ledger and logs what is new), then
the end (final table, artifacts). Printed: those seconds, the run's own wall time (its phases' seconds
from summary.json, or `wall_seconds.json` beside it when there is one) and the ratio; the load at the
start and the end. The models are not run again, so the ratio is the tracker's work over the run's, not
a side-by-side wall time; the calls are those of a live run. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_runs import WALL_FILE, load

from merger.recipe import load_recipe
from merger.recipe.schema import TrackingSpec
from merger.rundir.layout import RunDir
from merger.rundir.ledger import Ledger
from merger.tracking import open_tracker


def replay(run_dir: Path, store: Path) -> float:
    layout = RunDir(run_dir)
    summary = layout.read_summary()
    if summary is None:
        raise SystemExit(f"{run_dir}: not a finished run")
    recipe = load_recipe(layout.recipe)
    ledger = Ledger(run_dir)
    try:
        started = time.perf_counter()
        tracker = open_tracker(TrackingSpec(uri=f"sqlite:///{store}"), recipe, run_dir, "replay")
        tracker.start(ledger)
        for _ in range(len(ledger.evaluations()) + len(ledger.generations())):
            tracker.search(ledger)
        tracker.finish(summary)
        seconds = time.perf_counter() - started
    finally:
        ledger.close()
    if tracker.broken:
        raise SystemExit(f"{run_dir}: the tracker broke (see the warning above)")
    return seconds


def run_seconds(run_dir: Path) -> float:
    wall = run_dir / WALL_FILE
    if wall.is_file():
        return json.loads(wall.read_text())["seconds"]
    summary = RunDir(run_dir).read_summary()
    assert summary is not None and summary.costs
    return sum(cost.seconds for cost in summary.costs.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    print(f"load at start: {load()}")
    result = {}
    for run_dir in args.run_dirs:
        with tempfile.TemporaryDirectory() as scratch:
            tracking = replay(run_dir, Path(scratch) / "mlflow.db")
        own = run_seconds(run_dir)
        result[str(run_dir)] = {"tracking_seconds": tracking, "run_seconds": own, "ratio": tracking / own}
        print(f"{run_dir}: tracking {tracking:.1f} s against the run's {own:.0f} s: {100 * tracking / own:.2f}%")
    print(f"load at the end: {load()}")
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
