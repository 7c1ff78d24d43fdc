"""Where the zoo keeps its checkpoints, and how a directory is published atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import platformdirs

CACHE_ENV = "MERGER_CACHE"


def zoo_cache_root(cache_dir: Path | None = None) -> Path:
    """`cache_dir` if given, else `$MERGER_CACHE/zoo`, else the user cache dir's `merger/zoo`."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("merger")
    return Path(root) / "zoo"


def publish_dir(staging: Path, final: Path) -> Path:
    """Move a fully written `staging` dir to `final`; a concurrent winner is kept, ours dropped."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return final
