"""Where a pool member's weights live, and a key that changes exactly when they change."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from merger.common.errors import MergerError
from merger.common.references import REGISTRY_PREFIX, ZOO_PREFIX
from merger.registry.files import WEIGHT_SUFFIXES, weight_files
from merger.router.pool import Member
from merger.sources.digest import remembered_digest
from merger.sources.resolve import resolve_path


def member_reference(member: Member) -> str:
    """The source reference of a `path:`, `registry:` or `zoo:` member."""
    if member.path is not None:
        return str(member.path)
    if member.registry is not None:
        return REGISTRY_PREFIX + member.registry.removeprefix(REGISTRY_PREFIX)
    if member.zoo is not None:
        return ZOO_PREFIX + member.zoo
    raise MergerError(f"member {member.name!r} is remote and has no local checkpoint")


def member_checkpoint(member: Member, registry_root: Path | None = None) -> Path:
    """The local checkpoint directory of a `path:`, `registry:` or `zoo:` member."""
    if member.path is not None and not member.path.is_dir():
        raise MergerError(f"member {member.name!r}: path {member.path} is not a directory")
    return resolve_path(member_reference(member), registry_root=registry_root)


def memoized_weights_digest(checkpoint: Path, memo_file: Path | None = None) -> str:
    """The registry's `weights_digest` of a checkpoint, remembered in `memo_file` per checkpoint."""
    if not weight_files(checkpoint):
        raise MergerError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {checkpoint}")
    checkpoint = checkpoint.resolve()
    memo: dict[str, dict] = {}
    if memo_file is not None and memo_file.is_file():
        memo = json.loads(memo_file.read_text())
    recorded = memo.get(str(checkpoint))
    remembered = remembered_digest(checkpoint, recorded if isinstance(recorded, dict) else None)
    if memo_file is not None and remembered != recorded:
        memo[str(checkpoint)] = remembered
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        memo_file.write_text(json.dumps(memo))
    return remembered["sha256"]


def member_content_key(
    member: Member, memo_file: Path | None = None, registry_root: Path | None = None
) -> str:
    """Weights hash for local members; endpoint + model for remote ones (a remote may change unseen)."""
    if member.remote is not None:
        return (
            "remote:" + hashlib.sha256(f"{member.remote.base_url}|{member.remote.model}".encode()).hexdigest()
        )
    return "weights:" + memoized_weights_digest(member_checkpoint(member, registry_root), memo_file)
