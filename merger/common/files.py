"""Durable, atomic writes: the one way merger puts a file or a directory in place.

A reader sees the old content or the new, never a part, and once a write returns its bytes and its
name survive a crash: the data is fsynced before the rename, and the directory after it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def fsync_directory(path: Path) -> None:
    """Persist a directory's entries (new names, renames) on POSIX filesystems."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory, deepest first."""
    paths = sorted(root.rglob("*"), key=lambda path: len(path.parts), reverse=True)
    for path in paths:
        if path.is_file():
            fsync_file(path)
    for path in paths:
        if path.is_dir():
            fsync_directory(path)
    fsync_directory(root)


def write_durably(path: Path, data: bytes) -> None:
    """Write `data` to a new file at `path` and fsync it (no rename: for files inside a staging dir)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to `path` for a library to write into (torch.save, safetensors); on a clean
    exit it is fsynced and renamed over `path`, on an error removed."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temporary
        fsync_file(temporary)
        os.replace(temporary, path)
        fsync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)  # a failed write (a full disk) leaves no partial file behind


def write_atomic(path: Path, data: bytes) -> None:
    """Replace the file at `path` with `data`, atomically and durably."""
    with atomic_path(path) as temporary:
        write_durably(temporary, data)


def staging_dir(directory: Path) -> Path:
    """Where a directory is written before `publish_directory` renames it into place."""
    return directory.with_name(directory.name + PARTIAL_SUFFIX)


def publish_directory(staging: Path, final: Path, *, keep_existing: bool = False) -> Path:
    """Rename a fully written `staging` directory to `final`, durably (its contents fsynced first).

    `keep_existing`: when `final` appeared meanwhile (a concurrent writer won), keep it and drop ours.
    """
    fsync_tree(staging)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(final)
    except OSError:
        if not (keep_existing and final.exists()):
            raise
        shutil.rmtree(staging, ignore_errors=True)
    fsync_directory(final.parent)
    return final
