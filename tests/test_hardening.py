"""Hostile and broken input, each through the real `merger` command: one clear line, status 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.cli import assert_one_line_error, run_merger
from tests.recipes import tiny_recipe, write_recipe

BILLION_LAUGHS = "\n".join(
    [
        'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
        *(f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)),
    ]
)


def _recipe_text(tiny_sources: dict[str, Path], tiny_evals: Path, tmp_path: Path, **overrides: object) -> str:
    return yaml.safe_dump(tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run", **overrides), sort_keys=False)


def test_deeply_nested_recipe_is_one_line(tmp_path: Path) -> None:
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("sources: " + "[" * 20000 + "]" * 20000 + "\n")
    assert_one_line_error(run_merger("run", str(recipe)), "deep.yaml", "nested deeper than")


def test_alias_bomb_in_x0_is_refused_at_once(
    tiny_sources: dict[str, Path], tiny_evals: Path, tmp_path: Path
) -> None:
    text = _recipe_text(tiny_sources, tiny_evals, tmp_path).replace("optimizer:\n", "optimizer:\n  x0: *i\n")
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(BILLION_LAUGHS.replace("\n", "\n  ").join(["laughs:\n  ", "\n"]) + text)
    assert_one_line_error(run_merger("run", str(recipe), timeout=120), "aliases expanding too far")
    assert not (tmp_path / "run").exists()


def test_small_alias_expansion_still_loads_but_echoes_are_bounded(
    tiny_sources: dict[str, Path], tiny_evals: Path, tmp_path: Path
) -> None:
    """Under the expansion cap (9^4 values under fitness.tasks): valid YAML, a bounded message."""
    text = _recipe_text(tiny_sources, tiny_evals, tmp_path)
    laughs = "\n".join(BILLION_LAUGHS.splitlines()[:4])
    text = text.replace("fitness:\n  tasks:\n", "fitness:\n  tasks: *d\n  old_tasks:\n")
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(laughs.replace("\n", "\n  ").join(["laughs:\n  ", "\n"]) + text)
    assert_one_line_error(run_merger("run", str(recipe)), "laughs.yaml")


@pytest.mark.slow  # subprocesses
def test_huge_recipe_and_huge_values_are_bounded(
    tiny_sources: dict[str, Path], tiny_evals: Path, tmp_path: Path
) -> None:
    huge = tmp_path / "huge.yaml"
    huge.write_text(_recipe_text(tiny_sources, tiny_evals, tmp_path) + "# " + "x" * (3 << 20) + "\n")
    assert_one_line_error(run_merger("run", str(huge)), "huge.yaml", "too large")
    for field, value in (("method", "m" * 900_000), ("layer_granularity", "g" * 900_000)):
        recipe = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run")
        recipe["genome"][field] = value
        line = assert_one_line_error(run_merger("run", str(write_recipe(tmp_path / "long.yaml", recipe))))
        assert f"genome.{field}" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # subprocesses
def test_pool_yaml_is_bounded_the_same_way(tmp_path: Path) -> None:
    deep = tmp_path / "deep-pool.yaml"
    deep.write_text("members: " + "[" * 20000 + "\n")
    assert_one_line_error(run_merger("router", "train", str(deep)), "deep-pool.yaml", "nested deeper than")
    bomb = tmp_path / "bomb-pool.yaml"
    bomb.write_text(BILLION_LAUGHS + "\nmembers: *i\n")
    assert_one_line_error(run_merger("router", "train", str(bomb), timeout=120), "aliases expanding too far")
    long_name = tmp_path / "long-pool.yaml"
    long_name.write_text(yaml.safe_dump({"members": [{"name": "n" * 900_000, "path": "x"}]}))
    assert_one_line_error(run_merger("router", "train", str(long_name)), "long-pool.yaml")


def test_budget_below_one_generation_is_refused_before_loading(
    tiny_sources: dict[str, Path], tiny_evals: Path, tmp_path: Path
) -> None:
    recipe = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run", optimizer={"popsize": 6, "max_evaluations": 5})
    process = run_merger("run", str(write_recipe(tmp_path / "small.yaml", recipe)))
    assert_one_line_error(process, "max_evaluations (5) is below popsize (6)")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # subprocesses
def test_registry_versions_have_one_spelling(tmp_path: Path) -> None:
    for reference in ("name@01", "name@\uff11", "name@0", "name@1.0"):
        process = run_merger("registry", "--registry", str(tmp_path / "reg"), "show", reference)
        assert_one_line_error(process, "invalid version")


def test_registry_show_of_a_name_that_never_existed(tmp_path: Path) -> None:
    process = run_merger("registry", "--registry", str(tmp_path / "reg"), "show", "nope@1")
    line = assert_one_line_error(process, "no entry named 'nope'")
    assert "none left" not in line


@pytest.mark.slow  # subprocesses
def test_source_path_to_a_file_says_so(tiny_sources: dict[str, Path], tiny_evals: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run")
    recipe["sources"][1]["path"] = str(tiny_sources["specialist1"] / "config.json")
    process = run_merger("run", str(write_recipe(tmp_path / "file-source.yaml", recipe)))
    assert_one_line_error(process, "is a file, not a checkpoint directory")
