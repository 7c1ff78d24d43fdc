"""The local registry: versioned, hashed, lineage-aware model entries under one root directory.

Layout of a registry root:
    index.sqlite              which versions exist, their files' sha256, parents and scores
    entries/NAME/VERSION/     one loadable checkpoint per version (weights, config, tokenizer,
                              README.md model card, mergekit_config.yml, recipe.yaml, summary.json)
    .staging/                 private directories of writers in progress (see staging.py)

A version is visible only through its committed index row (publishing: `publishing.py`), so a crash
anywhere leaves either the whole version or an invisible leftover that the next writer removes. Running
out of space anywhere is one MergerError (merger/common/diskspace.py) that leaves the registry as it was.
This module opens a registry and reads it; publishing and export live beside it.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from pathlib import Path

from merger.common.diskspace import full_disk_is_an_error
from merger.common.errors import MergerError
from merger.registry import index as idx
from merger.registry.entries import (
    ENTRIES_DIR,
    INDEX_FILE,
    STAGING_DIR,
    Entry,
    EntryRef,
    Verification,
    default_root,
    verify_files,
)
from merger.registry.index import EntryRow, Index
from merger.registry.names import Reference, parse_reference, validate_name
from merger.registry.staging import clean_orphans


class Store:
    """A registry's entries and index rooted at `root` (default: `default_root()`): reading, resolving,
    verifying and removing entries; safe to use from several processes. Publishing and exporting build on
    it (merger.registry.registry.Registry)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root).expanduser().resolve() if root is not None else default_root().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.index = Index(self.root / INDEX_FILE)
        except (OSError, sqlite3.DatabaseError) as error:
            raise MergerError(f"cannot open the registry at {self.root}: {error}") from error

    # ----------------------------------------------------------------- paths
    @property
    def staging_root(self) -> Path:
        return self.root / STAGING_DIR

    def entry_path(self, name: str, version: int) -> Path:
        return self.root / ENTRIES_DIR / name / str(version)

    def ref(self, name: str, version: int) -> EntryRef:
        return EntryRef(name, version, self.entry_path(name, version))

    # ----------------------------------------------------------------- reads
    def pin(self, reference: Reference) -> Reference:
        """The same reference with its version made explicit (the latest when omitted)."""
        if reference.version is not None:
            return reference
        with self.index.reading() as connection:
            latest = idx.latest_version(connection, reference.name)
        if latest is None:
            raise MergerError(f"unknown registry entry {reference.name!r}{self._known_names_hint()}")
        return Reference(reference.name, latest)

    def _known_names_hint(self) -> str:
        with self.index.reading() as connection:
            names = sorted({name for name, _ in idx.list_keys(connection)})
        return f" (known: {', '.join(names)})" if names else " (the registry is empty)"

    def load(self, reference: Reference) -> Entry:
        reference = self.pin(reference)
        with self.index.reading() as connection:
            row = idx.load_entry(connection, reference.name, reference.version)
            children = [f"{name}@{version}" for name, version in idx.children_of(connection, str(reference))]
            versions = idx.versions_of(connection, reference.name)
        if row is None and not versions:
            raise MergerError(f"registry has no entry named {reference.name!r}{self._known_names_hint()}")
        if row is None:
            available = ", ".join(str(version) for version in versions)
            raise MergerError(
                f"registry entry {reference} not found (versions of {reference.name}: {available})"
            )
        return self._entry(row, children)

    def _entry(self, row: EntryRow, children: list[str]) -> Entry:
        return Entry(
            ref=self.ref(row.name, row.version),
            created_at=row.created_at,
            method=row.method,
            fitness=row.fitness,
            files=row.files,
            parents=row.parents,
            scores=row.scores,
            summary=row.summary,
            children=children,
        )

    def entries(self, name: str | None = None) -> list[Entry]:
        """Every visible version (of `name` only, if given), sorted by name then version."""
        if name is not None:
            validate_name(name)
        with self.index.reading() as connection:
            rows = [idx.load_entry(connection, *key) for key in idx.list_keys(connection, name)]
        return [self._entry(row, []) for row in rows if row is not None]

    def show(self, reference: str) -> Entry:
        """The index record of `NAME[@VERSION]` (latest when omitted); does not read the files."""
        return self.load(parse_reference(reference))

    def lookup(self, reference: str) -> Entry:
        """Like `show`, but the files are verified first (MergerError naming every damaged file)."""
        entry = self.show(reference)
        verification = verify_files(entry.ref, entry.files)
        if not verification.ok:
            raise MergerError(verification.message())
        return entry

    def resolve(self, reference: str) -> Path:
        """The directory of a verified `[registry:]NAME[@VERSION]`, ready for `from_pretrained` or as a
        merge source (recipes and pools resolve through `merger.sources.resolve.resolve_path`)."""
        return self.lookup(reference).path

    def verify(self, reference: str | None = None) -> list[Verification]:
        """Recompute the hashes of every version (of `NAME`, or of one `NAME@VERSION`)."""
        if reference is None:
            entries = self.entries()
        else:
            parsed = parse_reference(reference)
            entries = [self.load(parsed)] if parsed.version is not None else self.entries(parsed.name)
            if not entries:
                raise MergerError(f"unknown registry entry {parsed.name!r}{self._known_names_hint()}")
        return [verify_files(entry.ref, entry.files) for entry in entries]

    # -------------------------------------------------------- removal, cleanup
    def remove(self, reference: str) -> EntryRef:
        """Delete one explicit `NAME@VERSION`; its number is never reused."""
        parsed = parse_reference(reference)
        if parsed.version is None:
            raise MergerError(f"removing needs an explicit version: {parsed.name}@VERSION")
        doing = f"removing {parsed} from the index {self.index.path}"
        with full_disk_is_an_error(doing), self.index.transaction() as connection:
            if not idx.delete_entry(connection, parsed.name, parsed.version):
                raise MergerError(f"registry entry {parsed} not found")
        ref = self.ref(parsed.name, parsed.version)
        # Invisible from here on; if this is interrupted, the next writer removes the rest.
        shutil.rmtree(ref.path, ignore_errors=True)
        return ref

    def remove_unrecorded_versions(self, connection: sqlite3.Connection, name: str) -> list[Path]:
        """Delete version directories that have no index row (left by a crash); needs the write lock."""
        name_dir = self.root / ENTRIES_DIR / name
        if not name_dir.is_dir():
            return []
        recorded = {str(version) for version in idx.versions_of(connection, name)}
        removed = []
        for directory in name_dir.iterdir():
            if directory.is_dir() and directory.name not in recorded:
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(directory)
        return removed

    def remove_unrecorded_versions_of(self, name: str) -> None:
        with contextlib.suppress(sqlite3.Error), self.index.transaction() as connection:
            self.remove_unrecorded_versions(connection, name)

    def collect_garbage(self) -> list[Path]:
        """Remove leftovers of crashed writers (staging directories, unrecorded versions)."""
        removed = clean_orphans(self.staging_root)
        entries_dir = self.root / ENTRIES_DIR
        with self.index.transaction() as connection:
            names = sorted(path.name for path in entries_dir.iterdir()) if entries_dir.is_dir() else []
            for name in names:
                removed += self.remove_unrecorded_versions(connection, name)
        return removed
