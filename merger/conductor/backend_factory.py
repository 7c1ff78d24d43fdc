"""Building a pool member's backend (local or remote): beside the backends, which import the protocol and
failures from merger.conductor.backends."""

from __future__ import annotations

from pathlib import Path

from merger.common.errors import MergerError
from merger.conductor.backends import Backend
from merger.conductor.local_backend import LocalBackend
from merger.conductor.remote_backend import RemoteBackend
from merger.router.members import member_checkpoint
from merger.router.pool import Member


def build_backend(
    member: Member, registry_root: Path | None = None, exports_dir: Path | None = None
) -> Backend:
    """A member's backend: its remote endpoint, or its checkpoint loaded here."""
    if member.remote is not None:
        return RemoteBackend(member)
    try:
        checkpoint = member_checkpoint(member, registry_root, exports_dir)
        return LocalBackend(member.name, checkpoint, member.chat_template)
    except MergerError:
        raise
    except Exception as error:
        raise MergerError(f"member {member.name!r} could not be loaded: {error}") from error
