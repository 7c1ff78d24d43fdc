"""The one exception type whose message is meant for the user, and how values are echoed in it."""

from __future__ import annotations

import reprlib


class MergerError(Exception):
    """A problem the user can fix (bad recipe, missing checkpoint, bad name...).

    The CLI prints its message on one line and exits non-zero, without a traceback.
    """


MAX_SHOWN_CHARS = 80
MAX_MESSAGE_CHARS = 1000
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = MAX_SHOWN_CHARS
_SHOWN.maxlevel = 3


def shown(value: object) -> str:
    """A value echoed in an error message: its repr, bounded however large or nested the value is."""
    text = _SHOWN.repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "..."


def clip(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` cut to `limit` characters, saying how much was cut."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}... ({len(message) - limit:,} more characters)"
