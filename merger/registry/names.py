"""Entry names and references (`NAME`, `NAME@VERSION`, `registry:NAME[@VERSION]`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from merger.common.errors import MergerError, shown
from merger.common.references import REGISTRY_PREFIX as REFERENCE_PREFIX
from merger.common.references import is_registry_reference

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,17}")  # ASCII digits only, no leading zero: one spelling per version
NAME_RULE = "1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, without '..'"


@dataclass(frozen=True)
class Reference:
    """A parsed reference; `version` is None for "the latest version"."""

    name: str
    version: int | None = None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def validate_name(name: str) -> str:
    """Return `name` if it is a valid entry name, else raise a MergerError naming the rule."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise MergerError(f"invalid registry name {name!r}: use {NAME_RULE}")
    return name


def parse_reference(text: str) -> Reference:
    """Parse `NAME`, `NAME@VERSION` or `registry:NAME[@VERSION]`, validating both parts."""
    if not isinstance(text, str) or not text:
        raise MergerError(f"invalid registry reference {text!r}: expected NAME or NAME@VERSION")
    body = text[len(REFERENCE_PREFIX) :] if is_registry_reference(text) else text
    name, separator, version_text = body.partition("@")
    validate_name(name)
    if not separator:
        return Reference(name)
    if not VERSION_PATTERN.fullmatch(version_text):
        raise MergerError(
            f"invalid version {shown(version_text)} in registry reference {shown(text)}: "
            "expected a positive integer written in ASCII digits without leading zeros"
        )
    return Reference(name, int(version_text))
