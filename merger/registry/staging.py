"""Private staging directories inside the registry root, and cleaning up after crashed writers.

A writer holds an exclusive `flock` on `.staging/<id>.lock` for as long as `.staging/<id>/` is
in use. The kernel drops the lock when the process dies (even by SIGKILL), so a lock that can be
taken means its directory is an orphan that nobody will ever finish.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_SUFFIX = ".lock"


def _try_lock(lock_path: Path) -> int | None:
    """A descriptor holding the lock, or None if a live process holds it (or the file is gone)."""
    try:
        descriptor = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


def _create_locked(staging_root: Path) -> tuple[Path, int]:
    while True:
        lock_path = staging_root / f"{uuid.uuid4().hex}{LOCK_SUFFIX}"
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        # A cleaner may have taken the lock between our create and flock, and unlinked the file.
        if os.fstat(descriptor).st_nlink > 0:
            return lock_path, descriptor
        os.close(descriptor)


@contextmanager
def staging_directory(staging_root: Path) -> Iterator[Path]:
    """A fresh, locked, empty directory; removed on exit unless the caller renamed it away."""
    staging_root.mkdir(parents=True, exist_ok=True)
    lock_path, descriptor = _create_locked(staging_root)
    directory = lock_path.with_suffix("")
    try:
        directory.mkdir()
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        lock_path.unlink(missing_ok=True)
        os.close(descriptor)


def clean_orphans(staging_root: Path) -> list[Path]:
    """Remove staging directories of dead writers; return what was removed."""
    if not staging_root.is_dir():
        return []
    removed = []
    for lock_path in sorted(staging_root.glob(f"*{LOCK_SUFFIX}")):
        descriptor = _try_lock(lock_path)
        if descriptor is None:
            continue
        try:
            directory = lock_path.with_suffix("")
            if directory.exists():
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(directory)
            lock_path.unlink(missing_ok=True)
        finally:
            os.close(descriptor)
    for directory in sorted(staging_root.iterdir()):
        # A live writer creates its lock file before its directory, so a directory without one is dead.
        if directory.is_dir() and not directory.with_name(directory.name + LOCK_SUFFIX).exists():
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed
