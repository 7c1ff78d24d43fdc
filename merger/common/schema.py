"""The strict pydantic bases every schema builds on (recipe, pool, HTTP API), and the one way a validation
error becomes a user's message: one line, naming where and what, values echoed bounded."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from merger.common.errors import MAX_SHOWN_CHARS, clip, shown

MAX_PROBLEMS_SHOWN = 5
# pydantic's location parts that say how a union or validator was tried, not where: "function-after[...]",
# "list[TextPart]", "function-plain[...]"
_VALIDATOR_TAG = re.compile(r"^(function-\w+\[.*\]|\w+\[.*\])$")


class StrictModel(BaseModel):
    """A settings file's block: unknown fields refused, values frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StrictRequestModel(BaseModel):
    """A request body: unknown fields refused and no coercion (`"yes"` is not a bool, `1.5` not an int)."""

    model_config = ConfigDict(strict=True, extra="forbid")


def _location(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc if not _VALIDATOR_TAG.match(str(part)))


def _problem(detail: Mapping[str, Any]) -> str:
    where = clip(_location(detail.get("loc", ())), MAX_SHOWN_CHARS)
    message = clip(str(detail.get("msg", "invalid")).removeprefix("Value error, "), MAX_SHOWN_CHARS * 4)
    value = detail.get("input")
    # a value error's message names the value itself; a mapping is the block the problem is in
    echoed = detail.get("type") == "value_error" or isinstance(value, Mapping) or "input" not in detail
    got = "" if echoed else f" (got {shown(value)})"
    return f"{where + ': ' if where else ''}{message}{got}"


def format_errors(errors: Sequence[Mapping[str, Any]], origin: str) -> str:
    """`errors` (pydantic's `.errors()`) as one line: `ORIGIN: WHERE: WHAT (got VALUE); ...`."""
    problems = list(dict.fromkeys(_problem(detail) for detail in errors))  # union branches repeat
    text = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
    more = f" (and {len(problems) - MAX_PROBLEMS_SHOWN} more)" if len(problems) > MAX_PROBLEMS_SHOWN else ""
    return clip(f"{origin}: {text or 'invalid'}{more}").replace("\n", " ")


def format_validation_error(error: ValidationError, origin: str) -> str:
    return format_errors(error.errors(), origin)
