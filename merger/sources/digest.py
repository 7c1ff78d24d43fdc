"""A checkpoint's weights digest, remembered while its weight files keep their names, sizes and times.

The one memo of `weights_digest`: the run's lineage keeps its records in the ledger's meta, the
router's pool in a JSON file; both hold `{"path", "stamp", "sha256"}` per checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from merger.registry.files import weight_files, weights_digest


def weights_stamp(model_dir: Path) -> list[list[Any]]:
    """The weight files' names, sizes and modification times: what a recorded digest is valid for."""
    stamp = []
    for name in weight_files(model_dir):
        status = (model_dir / name).stat()
        stamp.append([name, status.st_size, status.st_mtime_ns])
    return stamp


def remembered_digest(
    model_dir: Path,
    recorded: Mapping[str, Any] | None,
    digest: Callable[[Path], str] = weights_digest,
) -> dict[str, Any]:
    """`{"path", "stamp", "sha256"}` of `model_dir`: the recorded digest while path and stamp are
    unchanged, else `digest(model_dir)` computed now."""
    stamp = weights_stamp(model_dir)
    recorded = recorded or {}
    unchanged = recorded.get("path") == str(model_dir) and recorded.get("stamp") == stamp and recorded.get("sha256")
    sha256 = recorded["sha256"] if unchanged else digest(model_dir)
    return {"path": str(model_dir), "stamp": stamp, "sha256": sha256}
