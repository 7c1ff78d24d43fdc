"""Publishing a finished run's winner as the next version of a registry entry.

The run's files are staged (fsynced) in the registry's `.staging/`; then, holding SQLite's write lock,
the version is allocated, the copy renamed to `entries/NAME/VERSION` and the index rows committed.
"""

from __future__ import annotations

import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merger.common.diskspace import full_disk_is_an_error
from merger.common.errors import MergerError
from merger.common.files import fsync_directory, publish_directory
from merger.common.references import is_registry_reference
from merger.registry import index as idx
from merger.registry.entries import (
    ENTRIES_DIR,
    MERGEKIT_CONFIG_FILE,
    RECIPE_FILE,
    SUMMARY_FILE,
    WRITTEN_BY_REGISTRY,
    EntryRef,
)
from merger.registry.files import (
    FileRecord,
    copy_durably,
    relative_files,
    weights_digest,
    write_hashed,
)
from merger.registry.finished_run import FinishedRun
from merger.registry.index import EntryRow, Parent
from merger.registry.names import Reference, parse_reference, validate_name
from merger.registry.staging import clean_orphans, staging_directory
from merger.rundir.layout import CARD_FILE
from merger.rundir.render import model_card

if TYPE_CHECKING:
    from merger.registry.store import Store


def publish_run(registry: Store, run: FinishedRun, name: str) -> EntryRef:
    """Register the winner of a finished run as the next version of `name`."""
    validate_name(name)
    parents = lineage_parents(registry, run)
    with full_disk_is_an_error(f"publishing {run.path} as {name} in the registry at {registry.root}"):
        clean_orphans(registry.staging_root)
        with staging_directory(registry.staging_root) as staging:
            files = _stage(run, staging)
            try:
                return _install(registry, name, run, parents, staging, files)
            except sqlite3.Error:
                # A failed COMMIT (a full disk) leaves the renamed copy behind, invisible: free its space.
                registry.remove_unrecorded_versions_of(name)
                raise


def lineage_parents(registry: Store, run: FinishedRun) -> list[Parent]:
    """Parents from the summary's lineage, falling back on the recipe's sources."""
    lineage = {name: entry.model_dump() for name, entry in run.summary.lineage.items()}
    declared = {source.name: source.path for source in run.recipe.sources}
    parents = []
    for source in dict.fromkeys([*declared, *lineage]):
        info = lineage.get(source) or {}
        path = info.get("path") or declared.get(source)
        registry_reference = info.get("registry") or (
            path if isinstance(path, str) and is_registry_reference(path) else None
        )
        if registry_reference:
            parents.append(_registry_parent(registry, source, parse_reference(registry_reference), info))
        elif path:
            parents.append(Parent(source, "path", str(path), info.get("sha256") or _digest(path)))
    return parents


def _registry_parent(registry: Store, source: str, reference: Reference, info: dict[str, Any]) -> Parent:
    if reference.version is None and info.get("path"):
        # The run resolved `registry:NAME` to entries/NAME/VERSION: that is the version it merged.
        used = Path(info["path"]).resolve()
        if used.parent == registry.root / ENTRIES_DIR / reference.name and used.name.isdigit():
            reference = Reference(reference.name, int(used.name))
    reference = registry.pin(reference)
    try:
        recorded = info.get("sha256") or registry.load(reference).weights_sha256
    except MergerError:  # removed since the run used it: the lineage still names it
        recorded = None
    return Parent(source, "registry", str(reference), recorded)


def _digest(path: str) -> str | None:
    return weights_digest(Path(path)) if Path(path).is_dir() else None


def _stage(run: FinishedRun, staging: Path) -> dict[str, FileRecord]:
    files = {
        name: copy_durably(run.final / name, staging / name)
        for name in relative_files(run.final)
        if name not in WRITTEN_BY_REGISTRY
    }
    if CARD_FILE not in files:  # a run finished before its card was the published one
        files[CARD_FILE] = write_hashed(staging / CARD_FILE, model_card(run.summary, run.best_text).encode())
    files[MERGEKIT_CONFIG_FILE] = write_hashed(staging / MERGEKIT_CONFIG_FILE, run.best_text.encode())
    files[RECIPE_FILE] = write_hashed(staging / RECIPE_FILE, run.recipe_text.encode())
    files[SUMMARY_FILE] = copy_durably(run.layout.summary, staging / SUMMARY_FILE)
    return files


def _install(
    registry: Store,
    name: str,
    run: FinishedRun,
    parents: list[Parent],
    staging: Path,
    files: dict[str, FileRecord],
) -> EntryRef:
    with registry.index.transaction() as connection:
        version = idx.allocate_version(connection, name)
        target = registry.entry_path(name, version)
        registry.remove_unrecorded_versions(connection, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        fsync_directory(registry.root)
        fsync_directory(target.parent.parent)
        publish_directory(staging, target)
        try:
            idx.insert_entry(connection, _row(name, version, run, parents, files))
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)  # still under the write lock: nobody sees it
            raise
    return registry.ref(name, version)


def _row(name: str, version: int, run: FinishedRun, parents: list[Parent], files: dict[str, FileRecord]) -> EntryRow:
    return EntryRow(
        name=name,
        version=version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        method=run.method,
        fitness=run.fitness,
        summary=run.summary.model_dump(mode="json", exclude_unset=True),
        files=files,
        parents=parents,
        scores=run.winner.by_split(),
    )
