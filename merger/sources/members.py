"""Where a pool member's weights live, and a key that changes exactly when they change."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from merger.common.errors import MergerError
from merger.registry.files import WEIGHT_SUFFIXES, weight_files, weights_digest
from merger.router.pool import Member


def member_checkpoint(member: Member, registry_root: Path | None = None) -> Path:
    """The local checkpoint directory of a `path:`, `registry:` or `zoo:` member."""
    if member.path is not None:
        if not member.path.is_dir():
            raise MergerError(f"member {member.name!r}: path {member.path} is not a directory")
        return member.path
    if member.registry is not None:
        try:
            from merger.registry import resolve_source
        except ImportError as error:
            raise MergerError(
                f"member {member.name!r} names registry entry {member.registry!r}, "
                f"but the registry is unavailable: {error}"
            ) from None
        return Path(resolve_source(member.registry, root=registry_root))
    if member.zoo is not None:
        from merger.sources.resolve import resolve_path

        return resolve_path(f"zoo:{member.zoo}")
    raise MergerError(f"member {member.name!r} is remote and has no local checkpoint")


def memoized_weights_digest(checkpoint: Path, memo_file: Path | None = None) -> str:
    """The registry's `weights_digest` of a checkpoint, remembered by its weight files' (path, size, mtime)."""
    files = [checkpoint / name for name in weight_files(checkpoint)]
    if not files:
        raise MergerError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {checkpoint}")
    stamp = [[str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] for path in files]
    stamp_key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()
    memo: dict[str, str] = {}
    if memo_file is not None and memo_file.is_file():
        memo = json.loads(memo_file.read_text())
        if stamp_key in memo:
            return memo[stamp_key]
    result = weights_digest(checkpoint)
    if memo_file is not None:
        memo[stamp_key] = result
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        memo_file.write_text(json.dumps(memo))
    return result


def member_content_key(
    member: Member, memo_file: Path | None = None, registry_root: Path | None = None
) -> str:
    """Weights hash for local members; endpoint + model for remote ones (a remote may change unseen)."""
    if member.remote is not None:
        return (
            "remote:" + hashlib.sha256(f"{member.remote.base_url}|{member.remote.model}".encode()).hexdigest()
        )
    return "weights:" + memoized_weights_digest(member_checkpoint(member, registry_root), memo_file)
