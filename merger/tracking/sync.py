"""`merger track sync RUN_DIR`: a finished or interrupted run's ledger into its tracker, after the fact (the
tracker was off, unreachable, or broke part way): what the store lacks is logged, nothing twice."""

from __future__ import annotations

from pathlib import Path

from merger.common.errors import MergerError
from merger.recipe import load_recipe
from merger.recipe.schema import TrackingSpec
from merger.rundir.layout import RunDir
from merger.rundir.ledger import Ledger
from merger.tracking.tracker import RunTracker, open_tracker


def sync_run(run_dir: Path, uri: str | None = None, experiment: str | None = None) -> RunTracker:
    """Log what `run_dir`'s ledger holds and the tracker does not. The store and experiment: the arguments,
    else the run's `tracking:` block, else a store beside the run directory; the run directory's MLflow run
    in that store is continued, else one is made in `experiment` (default: the run directory's name)."""
    layout = RunDir(run_dir)
    ledger = Ledger.open_existing(run_dir)
    if ledger is None or not layout.recipe.is_file():
        raise MergerError(f"{run_dir}: not a run directory (no ledger.sqlite and recipe.yaml)")
    try:
        recipe = load_recipe(layout.recipe)
        given = {key: value for key, value in (("uri", uri), ("experiment", experiment)) if value is not None}
        spec = (recipe.tracking or TrackingSpec()).model_copy(update=given)
        tracker = open_tracker(spec, recipe, run_dir, experiment=run_dir.resolve().name)
        tracker.start(ledger)
        tracker.search(ledger)
        summary = layout.read_summary()
        if summary is not None:
            tracker.finish(summary)
        else:
            tracker.stopped()
    finally:
        ledger.close()
    if tracker.broken:
        raise MergerError("tracking: the sync stopped part way (the warning above says why); run it again")
    return tracker
