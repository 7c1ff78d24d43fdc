"""The bundled tasks and recipes: found installed or in a checkout, listed and copied out by `merger recipes`,
and usable from any directory; Ray workers import the installed merger (the wheel itself: .ci/wheel_check.sh)."""

from __future__ import annotations

import site
from pathlib import Path

import pytest

from merger.common import bundled
from merger.common.errors import MergerError
from merger.executors.ray_executor import source_tree_for_workers, worker_runtime_env
from merger.recipe import load_recipe
from merger.router.pool import load_pool
from merger.scoring.fitness import BUNDLED_EVALS
from tests.cli import assert_one_line_error, run_merger

REPO = Path(__file__).resolve().parent.parent


def test_a_checkout_finds_its_top_level_evals_and_recipes() -> None:
    assert bundled.bundled_dir("evals") == BUNDLED_EVALS == REPO / "evals"
    assert {"quickstart", "pool-zoo", "pool.example"} <= set(bundled.bundled_recipes())


def test_installed_package_data_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "evals").mkdir()
    monkeypatch.setattr(bundled, "INSTALLED_ROOT", tmp_path)
    assert bundled.bundled_dir("evals") == tmp_path / "evals"
    assert bundled.bundled_dir("recipes") == REPO / "recipes"  # not in this fake install: the checkout's


def test_a_copied_pool_recipe_finds_the_bundled_tasks_from_another_directory(tmp_path: Path) -> None:
    target = bundled.copy_recipe("pool-zoo", tmp_path)
    pool = load_pool(target)
    assert pool.tasks is not None and pool.tasks.include_path == REPO / "evals" / "zoo"
    assert pool.work_dir == tmp_path / "../.merger-router/zoo"  # not a task path: stays relative to the copy
    with pytest.raises(MergerError, match="already exists"):
        bundled.copy_recipe("pool-zoo", tmp_path)


def test_cli_lists_shows_and_copies(tmp_path: Path) -> None:
    listing = run_merger("recipes", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    listed = [line.split()[0] for line in listing.stdout.splitlines() if not line.startswith("(under ")]
    assert listed == list(bundled.bundled_recipes())
    assert {"pool-zoo", "pool.example", "quickstart"} <= set(listed)
    shown = run_merger("recipes", "show", "quickstart", cwd=tmp_path)
    assert shown.stdout == (REPO / "recipes" / "quickstart.yaml").read_text()
    copied = run_merger("recipes", "copy", "quickstart", cwd=tmp_path)
    assert copied.returncode == 0, copied.stderr
    recipe = load_recipe(tmp_path / "quickstart.yaml")
    assert recipe.sources[0].path == "zoo:base" and recipe.fitness.tasks[0].name == "skills_mix_fit_tf"
    assert_one_line_error(run_merger("recipes", "copy", "nope", cwd=tmp_path), "no bundled recipe 'nope'", "quickstart")


def test_ray_workers_import_an_installed_merger_and_a_checkout_only_when_run_from_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PYTHONPATH", raising=False)
    installed = Path(site.getsitepackages()[0])
    assert source_tree_for_workers(installed) is None
    assert "PYTHONPATH" not in worker_runtime_env(installed)["env_vars"]
    assert source_tree_for_workers(REPO) == REPO
    assert worker_runtime_env(REPO)["env_vars"]["PYTHONPATH"] == str(REPO)


def test_a_reader_that_goes_away_gets_no_traceback() -> None:
    """`merger recipes | head -1`: the CLI ends quietly with 141 (SIGPIPE's status), no traceback."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes anything: every write fails
    try:
        process = subprocess.run(
            [sys.executable, "-m", "merger.cli", "recipes"],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert process.returncode == 141, process.stderr
    assert process.stderr == "", process.stderr
