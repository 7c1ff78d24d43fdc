"""Every mergekit method with a numeric parameter is searchable from a recipe; the others are refused in
one line, and their untuned configs come from the same registry."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
from mergekit.config import MergeConfiguration

from merger.cli import main
from merger.engine.factory import build_engine
from merger.engine.reference import merge_in_memory
from merger.recipe import SearchRange, parse_recipe
from merger.recipe.baselines import plan_baselines
from merger.recipe.methods import METHODS, SEARCHABLE_METHODS, NotApplicable, untuned_config
from merger.space.parameters import Genome
from tests.recipes import tiny_recipe, write_recipe

RANGE = {"min": 0.2, "max": 0.8}
# per method newly searchable: (sources, base model, searched / fixed parameters, options)
NEW_METHODS: dict[str, tuple[tuple[str, ...], str | None, dict[str, Any], dict[str, bool]]] = {
    "nuslerp": (("base", "specialist1", "specialist2"), "base", {"weight": RANGE}, {"nuslerp_row_wise": True}),
    "multislerp": (("specialist1", "specialist2"), None, {"weight": RANGE}, {}),
    "sce": (("base", "specialist1", "specialist2"), "base", {"select_topk": RANGE}, {}),
    "nearswap": (("base", "specialist1"), "base", {"t": {"min": 0.0, "max": 0.01}}, {}),
    "ram": (("base", "specialist1", "specialist2"), "base", {"epsilon": {"min": 0.0, "max": 0.01}}, {}),
    "ramplus_tl": (("base", "specialist1", "specialist2"), "base", {"r": RANGE, "alpha": 0.3}, {}),
    "breadcrumbs": (("base", "specialist1", "specialist2"), "base", {"weight": RANGE, "gamma": 0.02}, {}),
    "della_linear": (
        ("base", "specialist1", "specialist2"), "base", {"weight": RANGE, "density": 0.6, "epsilon": 0.1}, {}
    ),
}


def method_recipe(tiny_sources, tiny_evals, run_dir: Path, method: str) -> dict[str, Any]:
    names, base, parameters, options = NEW_METHODS[method]
    sources = {name: tiny_sources[name] for name in names}
    return tiny_recipe(
        sources, tiny_evals, run_dir,
        base_model=base,
        genome={"method": method, "parameters": parameters, "options": options, "tensor_classes": []},
        optimizer={"popsize": 2, "max_evaluations": 3},  # the untuned merge where the genome expresses it, 1 generation
        fitness={"tasks": [{"name": "tiny_mc", "metric": "acc"}], "limit": 4},
        validation=None,
        test={"tasks": ["tiny_mc"], "limit": 4},
    )


def test_every_method_with_a_numeric_parameter_is_searchable():
    assert set(NEW_METHODS) | {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "della",
                               "breadcrumbs_ties", "slerp"} <= set(SEARCHABLE_METHODS)
    for name, info in METHODS.items():
        assert (name in SEARCHABLE_METHODS) == bool(info.searchable)
    assert set(METHODS) - set(SEARCHABLE_METHODS) == {"model_stock", "karcher", "arcee_fusion", "passthrough"}


def recipe_sources(recipe: dict) -> dict[str, str]:
    return {source["name"]: source["path"] for source in recipe["sources"]}


@pytest.mark.slow  # a search per method
@pytest.mark.parametrize("method", list(NEW_METHODS))
def test_a_recipe_of_each_new_method_runs_one_generation(tiny_sources, tiny_evals, tmp_path, capsys, method):
    run_dir = tmp_path / "run"
    recipe = method_recipe(tiny_sources, tiny_evals, run_dir, method)
    parsed = parse_recipe(recipe)
    assert parsed.genome.method == method
    assert main(["run", str(write_recipe(tmp_path / "recipe.yaml", recipe)), "--no-progress"]) == 0
    assert "WINNER" in capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    warm_starts = len(Genome(parsed, {name: Path(p) for name, p in recipe_sources(recipe).items()}, 4).warm_start())
    assert summary["evaluations"] == warm_starts + 2
    assert 0.0 <= summary["winner"]["test"]["tiny_mc"] <= 1.0
    assert f"merge_method: {method}" in (run_dir / "best.yaml").read_text()
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        failures = db.execute("SELECT failure FROM evaluations WHERE failure IS NOT NULL").fetchall()
    assert failures == []


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("model_stock", "merge method 'model_stock' has no numeric parameter to search"),
        ("karcher", "merge method 'karcher' has no numeric parameter to search"),
        ("arcee_fusion", "merge method 'arcee_fusion' has no numeric parameter to search"),
        ("passthrough", "merge method 'passthrough' has no numeric parameter to search"),
        ("frankenmerge", "unknown merge method 'frankenmerge'; mergekit registers"),
    ],
)
def test_a_method_without_anything_to_search_is_refused_in_one_line(
    tiny_sources, tiny_evals, tmp_path, capsys, method, expected
):
    recipe = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run", genome={"method": method, "parameters": {}})
    assert main(["run", str(write_recipe(tmp_path / "recipe.yaml", recipe))]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"method": "multislerp", "parameters": {"weight": 1.0, "eps": {"min": 0.0, "max": 0.1}}},
         "parameters.eps: multislerp's eps is not searched; give a number"),
        ({"method": "nearswap", "parameters": {"t": {"min": -0.1, "max": 0.5}}},
         "parameters.t: -0.1 is outside the values t can take, [0.0, inf) in nearswap"),
        ({"method": "slerp", "parameters": {"t": {"min": 0.5, "max": 1.5}}},
         "parameters.t: 1.5 is outside the values t can take, [0.0, 1.0] in slerp"),
        ({"method": "ties", "parameters": {"weight": RANGE, "density": -0.2}},
         "parameters.density: -0.2 is outside the values density can take, (0.0, 1.0] in ties"),
        ({"method": "ties", "parameters": {"weight": RANGE, "density": 0.0}},  # keeps nothing: the base model
         "parameters.density: 0.0 is outside the values density can take, (0.0, 1.0] in ties"),
        ({"method": "dare_ties", "parameters": {"weight": RANGE, "density": {"min": 0.0, "max": 0.5}}},
         "parameters.density: 0.0 is outside the values density can take, (0.0, 1.0] in dare_ties"),
        ({"method": "sce", "parameters": {"select_topk": 0.5}, "options": {"normalize": True}},
         "options.normalize: sce has no option 'normalize'"),
        ({"method": "nuslerp", "parameters": {"weight": RANGE}}, "sources: nuslerp merges exactly 2 models besides"),
    ],
)
def test_registry_derived_bounds_and_contracts_name_the_field(
    tiny_sources, tiny_evals, tmp_path, capsys, change, expected
):
    sources = dict(tiny_sources)
    sources["specialist3"] = tiny_sources["specialist2"]
    recipe = tiny_recipe(sources, tiny_evals, tmp_path / "run", genome=change)
    assert main(["run", str(write_recipe(tmp_path / "recipe.yaml", recipe))]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_a_range_the_method_takes_is_the_users_choice(tiny_sources, tiny_evals, tmp_path):
    """The search-range table is a default, not a limit: nearswap's t over [0.1, 0.9] (far above the
    default [0, 0.01]) and a weight over [-3, 3] are searched as given."""
    recipe = method_recipe(tiny_sources, tiny_evals, tmp_path / "run", "nearswap")
    recipe["genome"]["parameters"] = {"t": {"min": 0.1, "max": 0.9}}
    assert parse_recipe(recipe).genome.searched["t"] == SearchRange(min=0.1, max=0.9)
    assert METHODS["nearswap"].parameters["t"].search_range == (0.0, 0.01)
    linear = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run",
                         genome={"method": "linear", "parameters": {"weight": {"min": -3.0, "max": 3.0}}})
    assert parse_recipe(linear).genome.searched["weight"] == SearchRange(min=-3.0, max=3.0)


def test_untuned_baseline_configs_come_from_the_registry(tiny_sources, tiny_evals, tmp_path):
    """The configs `baselines:` scores (plan_baselines calls this untuned_config) and what they hold."""
    sources = {name: tiny_sources[name] for name in ("base", "specialist1", "specialist2")}
    stock = untuned_config("model_stock", sources, base="base")
    assert stock == {
        "merge_method": "model_stock",
        "models": [{"model": str(sources["specialist1"])}, {"model": str(sources["specialist2"])}],
        "dtype": "float32",
        "base_model": str(sources["base"]),
    }
    ties = untuned_config("ties", sources, base="base", dtype="bfloat16", tokenizer_source="specialist1")
    assert [model["model"] for model in ties["models"]] == [str(sources["specialist1"]), str(sources["specialist2"])]
    assert [model["parameters"] for model in ties["models"]] == [{"weight": 0.5, "density": 0.5}] * 2
    assert (ties["dtype"], ties["tokenizer_source"]) == ("bfloat16", str(sources["specialist1"]))
    arithmetic = untuned_config("task_arithmetic", sources, base="base")  # its density is never used: left alone
    assert [model["parameters"] for model in arithmetic["models"]] == [{"weight": 0.5}] * 2
    linear = untuned_config("linear", sources)
    assert [model["parameters"] for model in linear["models"]] == [{"weight": round(1 / 3, 12)}] * 3
    assert untuned_config("slerp", {k: sources[k] for k in ("base", "specialist1")}, base="base")["parameters"] == {
        "t": 0.5
    }
    karcher = MergeConfiguration.model_validate(untuned_config("karcher", sources))
    engine = build_engine(sources, None, "karcher")
    engine.apply_config(karcher)
    expected = merge_in_memory(karcher)
    merged = dict(engine.model.named_parameters())
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name].detach(), tensor)
    with pytest.raises(NotApplicable, match="it merges 3 or more models, the recipe has 2"):
        untuned_config("model_stock", {k: sources[k] for k in ("base", "specialist1")}, base="base")
    with pytest.raises(NotApplicable, match="it needs a base model"):
        untuned_config("ties", sources)
    recipe = parse_recipe(tiny_recipe(sources, tiny_evals, tmp_path / "run", base_model="base"))
    plan = plan_baselines(recipe, sources)
    assert plan.configs["model_stock"] == stock
    assert plan.configs["defaults"] == untuned_config(recipe.genome.method, sources, base="base")
