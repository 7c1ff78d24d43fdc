"""Where each source of a run came from, with its weights digest, hashed once per run.

`open_search` records the lineage in the ledger's meta; the end of the run (summary, final-score
identities) and publishing read it from there instead of hashing the sources again. A later session
of the same run reuses a recorded digest while the source's weight files keep their names, sizes and
modification times.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from merger.recipe import Recipe
from merger.registry import Registry, is_registry_reference, weights_digest
from merger.registry.files import weight_files
from merger.rundir.layout import LineageEntry

LINEAGE_META = "lineage"


def weights_stamp(model_dir: Path) -> list[list[Any]]:
    """The weight files' names, sizes and modification times: what a recorded digest is valid for."""
    stamp = []
    for name in weight_files(model_dir):
        status = (model_dir / name).stat()
        stamp.append([name, status.st_size, status.st_mtime_ns])
    return stamp


def _digest(recipe: Recipe, reference: str, path: Path) -> str:
    if is_registry_reference(reference):
        # resolving verified the entry's files against its index: its recorded digest is theirs
        root = Path(recipe.output.registry) if recipe.output.registry else None
        return Registry(root).show(reference.removeprefix("registry:")).weights_sha256
    return weights_digest(path)


def source_lineage(
    recipe: Recipe, source_paths: dict[str, Path], recorded: dict[str, Any] | None
) -> dict[str, dict[str, Any]]:
    """`{source: LineageEntry fields + stamp}`, hashing only sources not recorded unchanged before."""
    recorded = recorded or {}
    lineage = {}
    for source in recipe.sources:
        path = source_paths[source.name]
        stamp = weights_stamp(path)
        before = recorded.get(source.name) or {}
        unchanged = before.get("path") == str(path) and before.get("stamp") == stamp and before.get("sha256")
        entry = LineageEntry(
            path=str(path),
            registry=source.path.removeprefix("registry:") if is_registry_reference(source.path) else None,
            reference=source.path,
            sha256=before["sha256"] if unchanged else _digest(recipe, source.path, path),
        )
        lineage[source.name] = {**entry.model_dump(), "stamp": stamp}
    return lineage


def recorded_source_paths(recorded: dict[str, Any]) -> dict[str, Path]:
    """Where the run found each source, as `source_lineage` recorded it (nothing resolved or hashed)."""
    return {name: Path(entry["path"]) for name, entry in recorded.items()}


def summary_lineage(recorded: dict[str, Any]) -> dict[str, LineageEntry]:
    """The lineage as the summary holds it (without the stamps)."""
    return {
        name: LineageEntry(**{k: v for k, v in entry.items() if k != "stamp"})
        for name, entry in recorded.items()
    }
