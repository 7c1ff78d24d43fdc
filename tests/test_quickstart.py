"""A short search on the real SmolLM2-135M weights: the quickstart's path with a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from merger.cli import main
from merger.zoo import build_zoo
from merger.zoo.build import ZooRecipe
from tests.recipes import write_recipe

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_short_search_on_the_real_model(tmp_path, capsys):
    zoo = build_zoo(cache_dir=tmp_path / "zoo", progress=False, recipe=ZooRecipe(steps=2, save_every=1))
    assert set(zoo) == {"base", "add", "cap"}
    recipe = {
        "sources": [{"name": name, "path": str(path)} for name, path in zoo.items()],
        "base_model": "base",
        "genome": {
            "method": "ties",
            "layer_granularity": 10,
            "parameters": {"weight": {"min": 0.0, "max": 1.5}, "density": {"min": 0.3, "max": 1.0}},
        },
        "optimizer": {"popsize": 2, "max_evaluations": 3, "seed": 1},  # the untuned TIES merge, then 2
        "fitness": {"tasks": ["zoo_mix_val"], "limit": 3, "batch_size": 3},
        "test": {"tasks": ["zoo_mix_test"], "limit": 3, "batch_size": 3},
        "output": {"run_dir": str(tmp_path / "run")},
    }
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    assert main(["run", str(path), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["evaluations"] == 3
    assert set(summary["sources"]) == {"base", "add", "cap"}
    assert "zoo_mix_test" in summary["winner"]["test"]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert recipe["genome"]["method"] in (tmp_path / "run" / "best.yaml").read_text()
    assert "WINNER" in capsys.readouterr().out
