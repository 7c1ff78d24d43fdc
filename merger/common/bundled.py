"""Where the bundled lm-eval tasks (`evals/`) and recipes (`recipes/`) are, installed or in a checkout.

A wheel carries them as package data under `merger/_bundled/` (setup.py copies the top-level `evals/`
and `recipes/` there at build time); a source checkout or an editable install has them next to the
package. Both keep `evals/` and `recipes/` side by side, so the recipes' relative paths into the tasks
(`../evals/zoo`) and the tasks' data paths (`evals/zoo/data/...`, anchored at the bundle root) hold in
either layout.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Literal

from merger.common.errors import MergerError, shown

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # merger/
INSTALLED_ROOT = PACKAGE_DIR / "_bundled"  # what setup.py's build step writes into the wheel
CHECKOUT_ROOT = PACKAGE_DIR.parent
RECIPE_SUFFIXES = (".yaml", ".yml")
Bundle = Literal["evals", "recipes"]


def bundled_dir(kind: Bundle) -> Path:
    """The bundled `evals/` or `recipes/` directory: the installed package data, else the checkout's.

    The returned path may not exist (a package built without its data); callers check `is_dir()`.
    """
    installed = INSTALLED_ROOT / kind
    return installed if installed.is_dir() else CHECKOUT_ROOT / kind


def bundled_recipes() -> dict[str, Path]:
    """Recipe name (file name without suffix) -> its file, sorted by name."""
    folder = bundled_dir("recipes")
    files = sorted(p for p in folder.glob("*") if p.suffix in RECIPE_SUFFIXES) if folder.is_dir() else []
    return {path.stem: path for path in files}


def bundled_recipe(name: str) -> Path:
    recipes = bundled_recipes()
    stem = name.removesuffix(".yaml").removesuffix(".yml")
    if stem not in recipes:
        known = ", ".join(recipes) or "none (this install has no bundled recipes)"
        raise MergerError(f"no bundled recipe {shown(name)}; the bundled recipes are: {known}")
    return recipes[stem]


_RELATIVE_PATH = re.compile(r"""(?<![\w./])\.\.?/[^\s"'#,}\]]+""")


def portable_recipe_text(recipe: Path) -> str:
    """The recipe's text with its relative paths into the bundled tasks made absolute, so that a copy
    works from any directory (other relative paths, e.g. a run or work dir, stay relative to the copy)."""
    evals = bundled_dir("evals").resolve()

    def absolute(match: re.Match[str]) -> str:
        target = (recipe.parent / match[0]).resolve()
        return str(target) if target == evals or evals in target.parents else match[0]

    return _RELATIVE_PATH.sub(absolute, recipe.read_text())


def copy_recipe(name: str, destination: Path) -> Path:
    """Write the bundled recipe `name` into `destination` (a directory, or a file name) and return it.

    An existing file is never overwritten."""
    source = bundled_recipe(name)
    target = destination / source.name if destination.is_dir() else destination
    if target.exists():
        raise MergerError(f"{shown(str(target))} already exists; remove it or name another destination")
    if not target.parent.is_dir():
        raise MergerError(f"{shown(str(target.parent))} is not a directory")
    target.write_text(portable_recipe_text(source))
    shutil.copymode(source, target)
    return target
