"""A full disk (or an exhausted quota) reported as one line naming what ran out and what was being written.

Operations that write (publishing, exporting, removing, a run writing its directory) run inside
`full_disk_is_an_error(...)`; every other error still propagates unchanged.
"""

from __future__ import annotations

import errno
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from merger.common.errors import MergerError

OUT_OF_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
SQLITE_FULL = 13  # sqlite3.SQLITE_FULL from Python 3.11
SQLITE_FULL_MESSAGE = "database or disk is full"
# How Rust libraries (safetensors, tokenizers) show an OS error: "No space left on device (os error 28)".
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def out_of_space(error: BaseException) -> str | None:
    """What ran out when `error` is a full disk or an exhausted quota; None for any other error."""
    if isinstance(error, OSError):
        return OUT_OF_SPACE.get(error.errno or 0)
    if isinstance(error, sqlite3.OperationalError):
        full = getattr(error, "sqlite_errorcode", None) == SQLITE_FULL or str(error) == SQLITE_FULL_MESSAGE
        return f"no space left on device (SQLite: {SQLITE_FULL_MESSAGE})" if full else None
    rust_os_error = RUST_OS_ERROR.search(str(error))
    return OUT_OF_SPACE.get(int(rust_os_error.group(1))) if rust_os_error else None


def _file_of(error: BaseException) -> str:
    """The file being written, when the error names it (a copy names its destination second)."""
    written = getattr(error, "filename2", None) or getattr(error, "filename", None)
    return f" ({written})" if written else ""


@contextmanager
def full_disk_is_an_error(doing: str) -> Iterator[None]:
    """Turn running out of space inside the block into a MergerError: '<what ran out> while <doing>'."""
    try:
        yield
    except MergerError:
        raise
    except Exception as error:
        lack = out_of_space(error)
        if lack is None:
            raise
        raise MergerError(
            f"{lack} while {doing}{_file_of(error)}; free some space and run it again"
        ) from error
