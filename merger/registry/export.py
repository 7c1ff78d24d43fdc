"""Copies of a verified entry leaving the registry: to a local directory or to the Hugging Face Hub."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from merger.common.diskspace import full_disk_is_an_error
from merger.common.errors import MergerError
from merger.common.files import publish_directory, staging_dir
from merger.registry.entries import Entry, damaged
from merger.registry.files import copy_durably, relative_files

if TYPE_CHECKING:
    from merger.registry.store import Store


def export_entry(registry: Store, reference: str, destination: Path) -> Path:
    """Copy a verified entry to `destination` (absent or empty); the copy is checked byte for byte."""
    entry = registry.show(reference)
    destination = Path(destination).expanduser().resolve()
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise MergerError(f"export destination {destination} already exists and is not an empty directory")
    partial = staging_dir(destination)
    with full_disk_is_an_error(f"exporting {entry.ref} to {destination}"):
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by an export that was killed
        try:
            _copy_verified(entry, partial)
            publish_directory(partial, destination)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return destination


def _copy_verified(entry: Entry, target: Path) -> None:
    present = set(relative_files(entry.path)) if entry.path.is_dir() else set()
    missing = sorted(entry.files.keys() - present)
    if missing:
        raise MergerError(damaged(entry.ref, [f"missing file {name}" for name in missing]))
    corrupt = [
        name for name, record in entry.files.items() if copy_durably(entry.path / name, target / name) != record
    ]
    if corrupt:
        raise MergerError(damaged(entry.ref, [f"corrupt file {name} (sha256 differs)" for name in corrupt]))


def push_entry(
    registry: Store, reference: str, repo_id: str, *, private: bool = False, token: str | None = None
) -> str:
    """Upload a verified entry to the Hugging Face Hub model repo `repo_id`; return the repo URL."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise MergerError(f"invalid Hugging Face repo id {repo_id!r}: {error}") from error
    entry = registry.lookup(reference)
    token = token or get_token()
    if not token:
        raise MergerError("no Hugging Face token: set HF_TOKEN (or log in with `hf auth login`) to push")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=entry.path,
            repo_type="model",
            commit_message=f"Upload {entry.ref} from the merger registry",
        )
    except Exception as error:  # transport errors differ across huggingface_hub versions
        raise MergerError(f"pushing {entry.ref} to {repo_id} failed: {error}") from error
    return str(url)
