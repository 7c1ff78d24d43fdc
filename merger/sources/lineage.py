"""Where each source of a run came from, with its weights digest, hashed once per run.

`open_run` records the lineage in the ledger's meta; the end of the run (summary, final-score
identities) and publishing read the digests from there instead of hashing the sources again. A later
session of the same run reuses a recorded digest while the source's weight files keep their names,
sizes and modification times (`merger.sources.digest`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from merger.common.references import REGISTRY_PREFIX, is_registry_reference
from merger.recipe import Recipe
from merger.registry import Registry, weights_digest
from merger.rundir.meta import LineageRecord
from merger.sources.digest import remembered_digest
from merger.sources.resolve import registry_root


def _digest(recipe: Recipe, reference: str, path: Path) -> str:
    if is_registry_reference(reference):
        # resolving verified the entry's files against its index: its recorded digest is theirs
        return Registry(registry_root(recipe)).show(reference).weights_sha256
    return weights_digest(path)


def source_lineage(
    recipe: Recipe, source_paths: dict[str, Path], recorded: dict[str, LineageRecord]
) -> dict[str, dict[str, Any]]:
    """`{source: {path, registry, reference, sha256, stamp}}` (`RunMeta.lineage`), hashing only sources not
    recorded unchanged before."""
    lineage = {}
    for source in recipe.sources:
        path = source_paths[source.name]
        before = recorded.get(source.name)
        digest = remembered_digest(
            path, before.model_dump() if before else None, partial(_digest, recipe, source.path)
        )
        lineage[source.name] = {  # the fields of the summary's `LineageEntry`, then the stamp
            "path": digest["path"],
            "registry": source.path.removeprefix(REGISTRY_PREFIX) if is_registry_reference(source.path) else None,
            "reference": source.path,
            "sha256": digest["sha256"],
            "stamp": digest["stamp"],
        }
    return lineage


def recorded_source_paths(recorded: dict[str, LineageRecord]) -> dict[str, Path]:
    """Where the run found each source, as `source_lineage` recorded it (nothing resolved or hashed)."""
    return {name: Path(entry.path) for name, entry in recorded.items() if entry.path is not None}
