"""File-level helpers: hashing and durable copies (the writes themselves: merger.common.files)."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from merger.common.files import fsync_file, write_durably

CHUNK_BYTES = 8 * 1024 * 1024
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    size: int


def sha256_file(path: Path) -> FileRecord:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return FileRecord(digest.hexdigest(), size)


def copy_durably(source: Path, destination: Path) -> FileRecord:
    """Copy one file (kernel-side, `copy_file_range`/`sendfile`), fsync it, and hash the copy.

    Hashing the destination rather than the source means the record describes the bytes that
    the entry actually holds.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)
    fsync_file(destination)
    return sha256_file(destination)


def write_hashed(destination: Path, content: bytes) -> FileRecord:
    """Write a new file durably and return its record."""
    write_durably(destination, content)
    return FileRecord(hashlib.sha256(content).hexdigest(), len(content))



def relative_files(root: Path) -> list[str]:
    """Every regular file under `root`, as sorted POSIX paths relative to it."""
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())


def weight_files(model_dir: Path) -> list[str]:
    """The checkpoint's weight files (what `weights_digest` hashes), as sorted relative POSIX paths."""
    return [name for name in relative_files(model_dir) if name.endswith(WEIGHT_SUFFIXES)]


def weights_digest(model_dir: Path) -> str:
    """One sha256 over a checkpoint's weight files (their names and content hashes, sorted).

    This is the "content hash" of a source model that lineage records: it ignores the config,
    tokenizer and card, so re-saving those does not change a model's identity.
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for name in weight_files(model_dir):
        digest.update(f"{name}\0{sha256_file(model_dir / name).sha256}\n".encode())
    return digest.hexdigest()


def weights_digest_from_records(records: dict[str, FileRecord]) -> str:
    """`weights_digest` computed from already known per-file hashes (an entry's index rows)."""
    digest = hashlib.sha256()
    for name in sorted(records):
        if name.endswith(WEIGHT_SUFFIXES):
            digest.update(f"{name}\0{records[name].sha256}\n".encode())
    return digest.hexdigest()
