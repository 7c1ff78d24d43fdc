"""The local registry: versioned, hashed, lineage-aware model entries under one root directory.

Layout of a registry root:
    index.sqlite              which versions exist, their files' sha256, parents and scores
    entries/NAME/VERSION/     one loadable checkpoint per version (weights, config, tokenizer,
                              README.md model card, mergekit_config.yml, recipe.yaml, summary.json)
    .staging/                 private directories of writers in progress (see staging.py)

Publishing stages a complete copy (fsynced) in `.staging/`, then, holding SQLite's write lock,
allocates the version, renames the copy to `entries/NAME/VERSION` and commits the index rows. A
version is visible only through its committed row, so a crash anywhere leaves either the whole
version or an invisible leftover that the next writer removes. Running out of space anywhere is one
MergerError (merger/diskspace.py) that leaves the registry as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import platformdirs

from merger.common.diskspace import full_disk_is_an_error
from merger.common.errors import MergerError
from merger.common.files import fsync_directory, fsync_tree
from merger.registry import index as idx
from merger.registry.card import render_card
from merger.registry.files import (
    FileRecord,
    copy_durably,
    relative_files,
    sha256_file,
    weights_digest,
    weights_digest_from_records,
    write_hashed,
)
from merger.registry.finished_run import FinishedRun, read_run
from merger.registry.index import EntryRow, Index, Parent
from merger.registry.names import Reference, is_registry_reference, parse_reference, validate_name
from merger.registry.staging import clean_orphans, staging_directory

ENVIRONMENT_VARIABLE = "MERGER_REGISTRY"
INDEX_FILE = "index.sqlite"
ENTRIES_DIR = "entries"
STAGING_DIR = ".staging"
CARD_FILE = "README.md"
MERGEKIT_CONFIG_FILE = "mergekit_config.yml"
RECIPE_FILE = "recipe.yaml"
SUMMARY_FILE = "summary.json"
WRITTEN_BY_REGISTRY = (CARD_FILE, MERGEKIT_CONFIG_FILE, RECIPE_FILE, SUMMARY_FILE)


def default_root() -> Path:
    """`$MERGER_REGISTRY` if set, else `<user data dir>/merger/registry`."""
    configured = os.environ.get(ENVIRONMENT_VARIABLE)
    if configured:
        return Path(configured).expanduser()
    return Path(platformdirs.user_data_dir("merger")) / "registry"


@dataclass(frozen=True)
class EntryRef:
    name: str
    version: int
    path: Path

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Entry:
    """Everything the index knows about one version."""

    ref: EntryRef
    created_at: str
    method: str | None
    fitness: float | None
    files: dict[str, FileRecord]
    parents: list[Parent]
    scores: dict[str, dict[str, float]]
    summary: dict[str, Any]
    children: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def version(self) -> int:
        return self.ref.version

    @property
    def path(self) -> Path:
        return self.ref.path

    @property
    def weights_sha256(self) -> str:
        """The same digest as `weights_digest(self.path)`, from the recorded hashes."""
        return weights_digest_from_records(self.files)


@dataclass(frozen=True)
class Verification:
    ref: EntryRef
    missing: list[str]
    corrupt: list[str]
    unexpected: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.unexpected)

    def problems(self) -> list[str]:
        return (
            [f"missing file {name}" for name in self.missing]
            + [f"corrupt file {name} (sha256 differs from the index)" for name in self.corrupt]
            + [f"unexpected file {name} (not in the index)" for name in self.unexpected]
        )

    def message(self) -> str:
        return f"registry entry {self.ref} at {self.ref.path} is damaged: " + "; ".join(self.problems())


def _verify_files(ref: EntryRef, expected: dict[str, FileRecord]) -> Verification:
    present = set(relative_files(ref.path)) if ref.path.is_dir() else set()
    corrupt = []
    for name in sorted(present & expected.keys()):
        path = ref.path / name
        record = expected[name]
        if path.stat().st_size != record.size or sha256_file(path).sha256 != record.sha256:
            corrupt.append(name)
    return Verification(
        ref,
        missing=sorted(expected.keys() - present),
        corrupt=corrupt,
        unexpected=sorted(present - expected.keys()),
    )


class Registry:
    """A registry rooted at `root` (default: `default_root()`); safe to use from several processes."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root).expanduser().resolve() if root is not None else default_root().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._index = Index(self.root / INDEX_FILE)
        except (OSError, sqlite3.DatabaseError) as error:
            raise MergerError(f"cannot open the registry at {self.root}: {error}") from error

    # ----------------------------------------------------------------- paths
    @property
    def _staging_root(self) -> Path:
        return self.root / STAGING_DIR

    def _entry_path(self, name: str, version: int) -> Path:
        return self.root / ENTRIES_DIR / name / str(version)

    def _ref(self, name: str, version: int) -> EntryRef:
        return EntryRef(name, version, self._entry_path(name, version))

    # --------------------------------------------------------------- publish
    def publish(self, run_dir: Path, name: str) -> EntryRef:
        """Register the winner of a finished run as the next version of `name`."""
        validate_name(name)
        run = read_run(Path(run_dir))
        parents = self._lineage(run)
        with full_disk_is_an_error(f"publishing {run.path} as {name} in the registry at {self.root}"):
            clean_orphans(self._staging_root)
            with staging_directory(self._staging_root) as staging:
                files = self._stage(run, staging)
                try:
                    return self._install(name, run, parents, staging, files)
                except sqlite3.Error:
                    # A failed COMMIT (a full disk) leaves the renamed copy behind, invisible: free its space.
                    self._remove_unrecorded_versions_of(name)
                    raise

    def _lineage(self, run: FinishedRun) -> list[Parent]:
        """Parents from the summary's lineage, falling back on the recipe's sources."""
        lineage = {name: entry.model_dump() for name, entry in run.summary.lineage.items()}
        declared = {str(source["name"]): source.get("path") for source in run.sources}
        parents = []
        for source in dict.fromkeys([*declared, *lineage]):
            info = lineage.get(source) or {}
            path = info.get("path") or declared.get(source)
            registry_reference = info.get("registry") or (
                path if isinstance(path, str) and is_registry_reference(path) else None
            )
            if registry_reference:
                parents.append(self._registry_parent(source, parse_reference(registry_reference), info))
            elif path:
                parents.append(Parent(source, "path", str(path), info.get("sha256") or self._digest(path)))
        return parents

    def _registry_parent(self, source: str, reference: Reference, info: dict[str, Any]) -> Parent:
        if reference.version is None and info.get("path"):
            # The run resolved `registry:NAME` to entries/NAME/VERSION: that is the version it merged.
            used = Path(info["path"]).resolve()
            if used.parent == self.root / ENTRIES_DIR / reference.name and used.name.isdigit():
                reference = Reference(reference.name, int(used.name))
        reference = self._pin(reference)
        try:
            recorded = info.get("sha256") or self._load(reference).weights_sha256
        except MergerError:  # removed since the run used it: the lineage still names it
            recorded = None
        return Parent(source, "registry", str(reference), recorded)

    @staticmethod
    def _digest(path: str) -> str | None:
        return weights_digest(Path(path)) if Path(path).is_dir() else None

    def _pin(self, reference: Reference) -> Reference:
        """The same reference with its version made explicit (the latest when omitted)."""
        if reference.version is not None:
            return reference
        with self._index.reading() as connection:
            latest = idx.latest_version(connection, reference.name)
        if latest is None:
            raise MergerError(f"unknown registry entry {reference.name!r}{self._known_names_hint()}")
        return Reference(reference.name, latest)

    def _stage(self, run: FinishedRun, staging: Path) -> dict[str, FileRecord]:
        files = {
            name: copy_durably(run.final / name, staging / name)
            for name in relative_files(run.final)
            if name not in WRITTEN_BY_REGISTRY
        }
        files[MERGEKIT_CONFIG_FILE] = write_hashed(staging / MERGEKIT_CONFIG_FILE, run.best_text.encode())
        files[RECIPE_FILE] = write_hashed(staging / RECIPE_FILE, run.recipe_text.encode())
        files[SUMMARY_FILE] = copy_durably(run.layout.summary, staging / SUMMARY_FILE)
        return files

    def _install(
        self, name: str, run: FinishedRun, parents: list[Parent], staging: Path, files: dict[str, FileRecord]
    ) -> EntryRef:
        with self._index.transaction() as connection:
            version = idx.allocate_version(connection, name)
            card = render_card(name, version, run, parents)
            files[CARD_FILE] = write_hashed(staging / CARD_FILE, card.encode())
            fsync_tree(staging)
            target = self._entry_path(name, version)
            self._remove_unrecorded_versions(connection, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            fsync_directory(self.root)
            fsync_directory(target.parent.parent)
            os.rename(staging, target)
            try:
                fsync_directory(target.parent)
                idx.insert_entry(connection, self._row(name, version, run, parents, files))
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)  # still under the write lock: nobody sees it
                raise
        return self._ref(name, version)

    @staticmethod
    def _row(
        name: str, version: int, run: FinishedRun, parents: list[Parent], files: dict[str, FileRecord]
    ) -> EntryRow:
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

    def _remove_unrecorded_versions(self, connection: sqlite3.Connection, name: str) -> list[Path]:
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

    def _remove_unrecorded_versions_of(self, name: str) -> None:
        with contextlib.suppress(sqlite3.Error), self._index.transaction() as connection:
            self._remove_unrecorded_versions(connection, name)

    def collect_garbage(self) -> list[Path]:
        """Remove leftovers of crashed writers (staging directories, unrecorded versions)."""
        removed = clean_orphans(self._staging_root)
        entries_dir = self.root / ENTRIES_DIR
        with self._index.transaction() as connection:
            names = sorted(path.name for path in entries_dir.iterdir()) if entries_dir.is_dir() else []
            for name in names:
                removed += self._remove_unrecorded_versions(connection, name)
        return removed

    # ----------------------------------------------------------------- reads
    def _known_names_hint(self) -> str:
        with self._index.reading() as connection:
            names = sorted({name for name, _ in idx.list_keys(connection)})
        return f" (known: {', '.join(names)})" if names else " (the registry is empty)"

    def _load(self, reference: Reference) -> Entry:
        reference = self._pin(reference)
        with self._index.reading() as connection:
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
            ref=self._ref(row.name, row.version),
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
        with self._index.reading() as connection:
            rows = [idx.load_entry(connection, *key) for key in idx.list_keys(connection, name)]
        return [self._entry(row, []) for row in rows if row is not None]

    def show(self, reference: str) -> Entry:
        """The index record of `NAME[@VERSION]` (latest when omitted); does not read the files."""
        return self._load(parse_reference(reference))

    def lookup(self, reference: str) -> Entry:
        """Like `show`, but the files are verified first (MergerError naming every damaged file)."""
        entry = self.show(reference)
        verification = _verify_files(entry.ref, entry.files)
        if not verification.ok:
            raise MergerError(verification.message())
        return entry

    def resolve(self, reference: str) -> Path:
        """The directory of a verified entry, ready for `from_pretrained` or as a merge source."""
        return self.lookup(reference).path

    def verify(self, reference: str | None = None) -> list[Verification]:
        """Recompute the hashes of every version (of `NAME`, or of one `NAME@VERSION`)."""
        if reference is None:
            entries = self.entries()
        else:
            parsed = parse_reference(reference)
            entries = [self._load(parsed)] if parsed.version is not None else self.entries(parsed.name)
            if not entries:
                raise MergerError(f"unknown registry entry {parsed.name!r}{self._known_names_hint()}")
        return [_verify_files(entry.ref, entry.files) for entry in entries]

    # ---------------------------------------------------------------- writes
    def export(self, reference: str, destination: Path) -> Path:
        """Copy a verified entry to `destination` (absent or empty); the copy is checked byte for byte."""
        entry = self.show(reference)
        destination = Path(destination).expanduser().resolve()
        if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
            raise MergerError(
                f"export destination {destination} already exists and is not an empty directory"
            )
        partial = destination.with_name(f".{destination.name}.partial-{uuid.uuid4().hex}")
        with full_disk_is_an_error(f"exporting {entry.ref} to {destination}"):
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._copy_verified(entry, partial)
                os.replace(partial, destination)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        return destination

    @staticmethod
    def _copy_verified(entry: Entry, target: Path) -> None:
        present = set(relative_files(entry.path)) if entry.path.is_dir() else set()
        missing = sorted(entry.files.keys() - present)
        if missing:
            raise MergerError(_damaged(entry, [f"missing file {name}" for name in missing]))
        corrupt = [
            name
            for name, record in entry.files.items()
            if copy_durably(entry.path / name, target / name) != record
        ]
        if corrupt:
            raise MergerError(_damaged(entry, [f"corrupt file {name} (sha256 differs)" for name in corrupt]))
        fsync_tree(target)

    def remove(self, reference: str) -> EntryRef:
        """Delete one explicit `NAME@VERSION`; its number is never reused."""
        parsed = parse_reference(reference)
        if parsed.version is None:
            raise MergerError(f"removing needs an explicit version: {parsed.name}@VERSION")
        doing = f"removing {parsed} from the index {self._index.path}"
        with full_disk_is_an_error(doing), self._index.transaction() as connection:
            if not idx.delete_entry(connection, parsed.name, parsed.version):
                raise MergerError(f"registry entry {parsed} not found")
        ref = self._ref(parsed.name, parsed.version)
        # Invisible from here on; if this is interrupted, the next writer removes the rest.
        shutil.rmtree(ref.path, ignore_errors=True)
        return ref

    def push(self, reference: str, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
        """Upload a verified entry to the Hugging Face Hub model repo `repo_id`; return the repo URL."""
        from huggingface_hub import HfApi, get_token
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            raise MergerError(f"invalid Hugging Face repo id {repo_id!r}: {error}") from error
        entry = self.lookup(reference)
        token = token or get_token()
        if not token:
            raise MergerError("no Hugging Face token: set HF_TOKEN (or log in with `hf auth login`) to push")
        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=entry.path,
                repo_type="model",
                commit_message=f"Upload {entry.ref} from the merger registry",
            )
        except Exception as error:  # transport errors differ across huggingface_hub versions
            raise MergerError(f"pushing {entry.ref} to {repo_id} failed: {error}") from error
        return str(url)


def _damaged(entry: Entry, problems: list[str]) -> str:
    return f"registry entry {entry.ref} at {entry.path} is damaged: " + "; ".join(problems)



def resolve_source(reference: str, root: Path | None = None) -> Path:
    """For the recipe loader: the verified directory of `registry:NAME[@VERSION]` (or `NAME[@VERSION]`)."""
    return Registry(root).resolve(reference)
