"""Build step: the top-level evals/ and recipes/ go into the wheel as merger/_bundled/ (package data).

Metadata lives in pyproject.toml; merger.common.bundled.bundled_dir finds these files installed or in a checkout.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

BUNDLED = ("evals", "recipes")


class BuildWithBundledData(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads them from the checkout
        here = Path(__file__).resolve().parent
        for name in BUNDLED:
            target = Path(self.build_lib) / "merger" / "_bundled" / name
            shutil.rmtree(target, ignore_errors=True)  # no stale files from an earlier build
            shutil.copytree(here / name, target, ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": BuildWithBundledData})
