"""The local model registry: publishing run winners with lineage, hashes and atomic writes.

Other modules call:
    Registry(root=None).publish(run_dir, name, recipe=None) -> EntryRef
    Registry(root=None).resolve("registry:NAME@VERSION") -> Path   (verified; MergerError otherwise)
    weights_digest(model_dir) -> str   (the "sha256" that a run's summary lineage records)
A recipe's `registry:` source is resolved like every other source, by `merger.sources.resolve`.
"""

from merger.registry.entries import ENVIRONMENT_VARIABLE, Entry, EntryRef, Verification, default_root
from merger.registry.files import FileRecord, weights_digest
from merger.registry.index import Parent
from merger.registry.names import (
    REFERENCE_PREFIX,
    Reference,
    is_registry_reference,
    parse_reference,
    validate_name,
)
from merger.registry.registry import Registry

__all__ = [
    "ENVIRONMENT_VARIABLE",
    "REFERENCE_PREFIX",
    "Entry",
    "EntryRef",
    "FileRecord",
    "Parent",
    "Reference",
    "Registry",
    "Verification",
    "default_root",
    "is_registry_reference",
    "parse_reference",
    "validate_name",
    "weights_digest",
]
