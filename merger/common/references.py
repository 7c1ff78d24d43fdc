"""The syntax of a source reference, shared by the recipe loader and the resolver.

A reference is `registry:NAME[@VERSION]` (the local registry), `zoo:NAME` (the bundled zoo), a local
directory, or a Hugging Face id (`owner/name`, looked up in the local cache only). Resolving one into a
checkpoint directory is `merger.sources.resolve.resolve_path`; this module only reads the text.
"""

from __future__ import annotations

REGISTRY_PREFIX = "registry:"
ZOO_PREFIX = "zoo:"


def is_registry_reference(text: str) -> bool:
    """True for `registry:NAME[@VERSION]`."""
    return isinstance(text, str) and text.startswith(REGISTRY_PREFIX)


def has_scheme(text: str) -> bool:
    """True for `SCHEME:...` references (`registry:`, `zoo:`), which are never paths."""
    return ":" in text.split("/")[0]


def could_be_hub_id(text: str) -> bool:
    """True for text shaped like a Hugging Face repo id (`owner/name`), when it is no local path."""
    return text.count("/") == 1 and not text.startswith((".", "/"))
