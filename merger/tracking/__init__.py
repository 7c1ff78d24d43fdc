"""Experiment tracking (`tracking:` in a recipe; the `track` extra): a run's candidates, generations and
final tables logged live to MLflow, read from the ledger, which stays the source of truth."""

from merger.tracking.sync import sync_run
from merger.tracking.tracker import RunTracker, note_published, open_tracker

__all__ = ["RunTracker", "note_published", "open_tracker", "sync_run"]
