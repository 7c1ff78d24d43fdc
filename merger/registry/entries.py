"""What a registry holds: its on-disk names, one entry's record, and checking an entry's files."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from merger.registry.files import (
    FileRecord,
    relative_files,
    sha256_file,
    weights_digest_from_records,
)
from merger.registry.index import Parent

ENVIRONMENT_VARIABLE = "MERGER_REGISTRY"
INDEX_FILE = "index.sqlite"
ENTRIES_DIR = "entries"
STAGING_DIR = ".staging"
MERGEKIT_CONFIG_FILE = "mergekit_config.yml"
RECIPE_FILE = "recipe.yaml"
SUMMARY_FILE = "summary.json"
WRITTEN_BY_REGISTRY = (MERGEKIT_CONFIG_FILE, RECIPE_FILE, SUMMARY_FILE)


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
        return damaged(self.ref, self.problems())


def damaged(ref: EntryRef, problems: list[str]) -> str:
    return f"registry entry {ref} at {ref.path} is damaged: " + "; ".join(problems)


def verify_files(ref: EntryRef, expected: dict[str, FileRecord]) -> Verification:
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
