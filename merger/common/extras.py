"""Optional extras (pyproject's optional-dependencies): a command that needs one says which to install.

Commands call `require_extra(...)` before importing the extra's libraries, so that a missing one ends
in one line naming `pip install 'merger[EXTRA]'` (exit code 2) instead of a ModuleNotFoundError traceback.
"""

from __future__ import annotations

import importlib.util

from merger.common.errors import MergerError

# Each extra's import names (not its distribution names: sentence-transformers imports as sentence_transformers).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "router": ("fastapi", "uvicorn", "sentence_transformers", "openai"),
    "report": ("matplotlib",),
    "ray": ("ray",),
}


class MissingExtra(MergerError):
    """An optional extra that a command needs is not installed."""


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails, or a module whose spec is unset
        return False


def missing_modules(extra: str) -> list[str]:
    """The extra's modules that cannot be imported here (without importing any of them)."""
    return [module for module in EXTRA_MODULES[extra] if not _importable(module)]


def install_hint(extra: str) -> str:
    return f"pip install 'merger[{extra}]'"


def require_extra(extra: str, needed_by: str) -> None:
    """Raise MissingExtra, naming the install command, when any of the extra's modules is missing."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtra(
            f"{needed_by} needs the '{extra}' extra (missing: {', '.join(missing)}); "
            f"install it with: {install_hint(extra)}"
        )
