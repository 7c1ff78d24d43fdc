"""Where the zoo keeps its checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

CACHE_ENV = "MERGER_CACHE"


def zoo_cache_root(cache_dir: Path | None = None) -> Path:
    """`cache_dir` if given, else `$MERGER_CACHE/zoo`, else the user cache dir's `merger/zoo`."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("merger")
    return Path(root) / "zoo"
