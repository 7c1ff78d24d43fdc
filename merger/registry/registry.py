"""`Registry`: the store (merger.registry.store) with publishing and exporting, which build on it and so
live beside it rather than inside it (the store imports neither)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from merger.registry.entries import EntryRef
from merger.registry.export import export_entry, push_entry
from merger.registry.finished_run import read_run
from merger.registry.publishing import publish_run
from merger.registry.store import Store

if TYPE_CHECKING:
    from merger.recipe import Recipe


class Registry(Store):
    def publish(self, run_dir: Path, name: str, recipe: Recipe | None = None) -> EntryRef:
        """Register the winner of a finished run as the next version of `name`.

        `recipe` is the run's typed recipe when the caller holds it; otherwise recipe.yaml is parsed.
        """
        return publish_run(self, read_run(Path(run_dir), recipe), name)

    def export(self, reference: str, destination: Path) -> Path:
        """Copy a verified entry to `destination` (absent or empty); the copy is checked byte for byte."""
        return export_entry(self, reference, destination)

    def push(self, reference: str, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
        """Upload a verified entry to the Hugging Face Hub model repo `repo_id`; return the repo URL."""
        return push_entry(self, reference, repo_id, private=private, token=token)
