"""The registry's SQLite index: the single source of truth for which versions exist.

A version is visible exactly when its `entries` row is committed. Every write runs in a
`BEGIN IMMEDIATE` transaction, so concurrent publishers serialize on SQLite's write lock and
version numbers come from a per-name counter that never goes back (removed versions are not reused).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merger.common.errors import MergerError
from merger.registry.files import FileRecord

BUSY_TIMEOUT_SECONDS = 300.0
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY,
    last_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    method TEXT,
    fitness REAL,
    summary_json TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS files (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (name, version, path),
    FOREIGN KEY (name, version) REFERENCES entries (name, version) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS parents (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    source TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('registry', 'path')),
    reference TEXT NOT NULL,
    sha256 TEXT,
    PRIMARY KEY (name, version, source),
    FOREIGN KEY (name, version) REFERENCES entries (name, version) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS parents_by_reference ON parents (kind, reference);
CREATE TABLE IF NOT EXISTS scores (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    split TEXT NOT NULL,
    task TEXT NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (name, version, split, task),
    FOREIGN KEY (name, version) REFERENCES entries (name, version) ON DELETE CASCADE
);
"""


@dataclass(frozen=True)
class Parent:
    """One source of an entry: another registry entry (`NAME@VERSION`) or a model directory."""

    source: str
    kind: str
    reference: str
    sha256: str | None


@dataclass
class EntryRow:
    name: str
    version: int
    created_at: str
    method: str | None
    fitness: float | None
    summary: dict[str, Any]
    files: dict[str, FileRecord] = field(default_factory=dict)
    parents: list[Parent] = field(default_factory=list)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)


class Index:
    """Short-lived connections to `index.sqlite`: open one per operation, never share across processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        connection = self._connect()
        try:
            found = connection.execute("PRAGMA user_version").fetchone()[0]
        finally:
            connection.close()
        if found > SCHEMA_VERSION:
            raise MergerError(
                f"{path} was written by a newer merger (index schema {found} > {SCHEMA_VERSION})"
            )
        if found < SCHEMA_VERSION:
            self._create_schema()

    def _create_schema(self) -> None:
        with self.transaction() as connection:
            # statement by statement: executescript() would commit the open transaction first
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute("PRAGMA synchronous = FULL")
        return connection

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding SQLite's write lock from the start (`BEGIN IMMEDIATE`)."""
        connection = self._connect()
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException:
                # After some errors (a full disk, an I/O error) SQLite has already rolled back by itself.
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        finally:
            connection.close()

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        connection = self._connect()
        try:
            connection.execute("BEGIN")  # one consistent snapshot across the several SELECTs
            yield connection
            connection.execute("COMMIT")
        finally:
            connection.close()


def allocate_version(connection: sqlite3.Connection, name: str) -> int:
    row = connection.execute("SELECT last_version FROM names WHERE name = ?", (name,)).fetchone()
    version = (row[0] if row else 0) + 1
    connection.execute(
        "INSERT INTO names (name, last_version) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET last_version = excluded.last_version",
        (name, version),
    )
    return version


def insert_entry(connection: sqlite3.Connection, row: EntryRow) -> None:
    key = (row.name, row.version)
    connection.execute(
        "INSERT INTO entries (name, version, created_at, method, fitness, summary_json) VALUES (?, ?, ?, ?, ?, ?)",
        (*key, row.created_at, row.method, row.fitness, json.dumps(row.summary, sort_keys=True)),
    )
    connection.executemany(
        "INSERT INTO files (name, version, path, sha256, size) VALUES (?, ?, ?, ?, ?)",
        [(*key, path, record.sha256, record.size) for path, record in sorted(row.files.items())],
    )
    connection.executemany(
        "INSERT INTO parents (name, version, source, kind, reference, sha256) VALUES (?, ?, ?, ?, ?, ?)",
        [(*key, parent.source, parent.kind, parent.reference, parent.sha256) for parent in row.parents],
    )
    connection.executemany(
        "INSERT INTO scores (name, version, split, task, score) VALUES (?, ?, ?, ?, ?)",
        [
            (*key, split, task, float(score))
            for split, tasks in sorted(row.scores.items())
            for task, score in sorted(tasks.items())
        ],
    )


def delete_entry(connection: sqlite3.Connection, name: str, version: int) -> bool:
    cursor = connection.execute("DELETE FROM entries WHERE name = ? AND version = ?", (name, version))
    return cursor.rowcount > 0


def latest_version(connection: sqlite3.Connection, name: str) -> int | None:
    row = connection.execute("SELECT MAX(version) FROM entries WHERE name = ?", (name,)).fetchone()
    return row[0]


def versions_of(connection: sqlite3.Connection, name: str) -> list[int]:
    rows = connection.execute("SELECT version FROM entries WHERE name = ? ORDER BY version", (name,))
    return [version for (version,) in rows]


def list_keys(connection: sqlite3.Connection, name: str | None = None) -> list[tuple[str, int]]:
    if name is None:
        rows = connection.execute("SELECT name, version FROM entries ORDER BY name, version")
    else:
        rows = connection.execute(
            "SELECT name, version FROM entries WHERE name = ? ORDER BY version", (name,)
        )
    return [(entry_name, version) for entry_name, version in rows]


def load_entry(connection: sqlite3.Connection, name: str, version: int) -> EntryRow | None:
    key = (name, version)
    row = connection.execute(
        "SELECT created_at, method, fitness, summary_json FROM entries WHERE name = ? AND version = ?", key
    ).fetchone()
    if row is None:
        return None
    created_at, method, fitness, summary_json = row
    entry = EntryRow(name, version, created_at, method, fitness, json.loads(summary_json))
    for path, sha256, size in connection.execute(
        "SELECT path, sha256, size FROM files WHERE name = ? AND version = ? ORDER BY path", key
    ):
        entry.files[path] = FileRecord(sha256, size)
    entry.parents = [
        Parent(*values)
        for values in connection.execute(
            "SELECT source, kind, reference, sha256 FROM parents WHERE name = ? AND version = ? ORDER BY source",
            key,
        )
    ]
    for split, task, score in connection.execute(
        "SELECT split, task, score FROM scores WHERE name = ? AND version = ? ORDER BY split, task", key
    ):
        entry.scores.setdefault(split, {})[task] = score
    return entry


def children_of(connection: sqlite3.Connection, reference: str) -> list[tuple[str, int]]:
    rows = connection.execute(
        "SELECT name, version FROM parents WHERE kind = 'registry' AND reference = ? ORDER BY name, version",
        (reference,),
    )
    return [(name, version) for name, version in rows]
