"""The untuned merges a practitioner makes without search (TIES, DARE, DELLA, breadcrumbs... at their papers'
and mergekit's settings) as named baselines: their configs, mergekit's own merge of them, the warm starts
they give a genome of their method, and a name that is unknown or does not apply refused in one line."""

from __future__ import annotations

import pytest
import torch
from mergekit.config import MergeConfiguration

from merger.cli import main
from merger.engine.factory import build_engine
from merger.engine.reference import merge_in_memory
from merger.recipe import parse_recipe
from merger.recipe.baselines import plan_baselines
from merger.recipe.untuned import DEFAULT_BASELINES, UNTUNED_MERGES
from merger.space.parameters import Genome
from tests.recipes import tiny_recipe, write_recipe

# DARE and DELLA drop elements at random: their merge is mergekit's, by construction, not recomputed here
RANDOM_DROPS = {"dare_ties", "dare_linear", "della"}
TIE_SHARE = 1e-4


def every_baseline(tiny_sources, tiny_evals, tmp_path):
    return parse_recipe(tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run", baselines="all"))


def test_all_plans_every_named_merge_that_applies_with_the_tables_settings(tiny_sources, tiny_evals, tmp_path):
    recipe = every_baseline(tiny_sources, tiny_evals, tmp_path)
    plan = plan_baselines(recipe, tiny_sources)
    assert set(plan.configs) | set(plan.skipped) == set(UNTUNED_MERGES)
    assert plan.skipped == {"slerp": "slerp does not apply: it merges 2-2 models, the recipe has 3"}
    for name, config in plan.configs.items():
        merge = UNTUNED_MERGES[name]
        assert config["merge_method"] == (merge.method or "ties")
        for model in config["models"]:
            assert merge.values.items() <= model.get("parameters", {}).items(), name
    ties = plan.configs["ties_d0.2"]["models"]
    assert [model["parameters"] for model in ties] == [{"weight": 1.0, "density": 0.2}] * 2
    assert plan.configs["task_arithmetic"]["models"][0]["parameters"] == {"weight": 0.5}


@pytest.mark.parametrize(
    "name", [name for name, merge in UNTUNED_MERGES.items() if merge.method not in RANDOM_DROPS | {"slerp"}]
)
def test_each_named_merge_in_the_engine_is_mergekits_own(tiny_sources, tiny_evals, tmp_path, name):
    """What a genome's warm start merges in memory equals mergekit's merge of the baseline's config, but for
    the order of exactly tied magnitudes where a density prunes (the tiny models' norm weights differ from
    the base by a few float steps, so ties happen): at most TIE_SHARE of the elements differ."""
    recipe = every_baseline(tiny_sources, tiny_evals, tmp_path)
    config = MergeConfiguration.model_validate(plan_baselines(recipe, tiny_sources).configs[name])
    engine = build_engine(tiny_sources, "base", config.merge_method)
    engine.apply_config(config)
    merged = dict(engine.model.named_parameters())
    differing = total = 0
    for tensor_name, tensor in merge_in_memory(config).items():
        close = torch.isclose(merged[tensor_name].detach(), tensor, rtol=1e-5, atol=1e-6)
        differing, total = differing + int((~close).sum()), total + close.numel()
    assert differing <= TIE_SHARE * total, f"{name}: {differing} of {total} elements differ"


def test_a_genome_of_the_method_starts_at_each_of_its_named_merges(tiny_sources, tiny_evals, tmp_path):
    recipe = every_baseline(tiny_sources, tiny_evals, tmp_path)  # ties: weight in [0, 1], density in [0.2, 1]
    starts = Genome(recipe, tiny_sources, 4).baseline_starts()
    assert [start.label for start in starts] == ["baseline defaults", "baseline ties_d0.5", "baseline ties_d0.2"]
    genome = Genome(recipe, tiny_sources, 4)
    values = {start.label: set(genome.decode(start.genotype).round(6)) for start in starts}
    assert values["baseline ties_d0.2"] == {1.0, 0.2}
    default = parse_recipe(tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run"))
    assert tuple(default.baselines) == DEFAULT_BASELINES
    assert [start.label for start in Genome(default, tiny_sources, 4).baseline_starts()] == ["baseline defaults"]


@pytest.mark.parametrize(
    ("baselines", "expected"),
    [
        (["ties_d0.5", "ties_d0.3"], "unknown baseline 'ties_d0.3'; known: defaults, linear"),
        (["linear", "slerp"], "baselines: slerp (slerp) does not apply to these sources: it merges 2-2 models"),
        ("every", "baselines"),
    ],
)
def test_a_baseline_that_is_unknown_or_does_not_apply_is_refused_in_one_line(
    tiny_sources, tiny_evals, tmp_path, capsys, baselines, expected
):
    recipe = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run", baselines=baselines)
    assert main(["run", str(write_recipe(tmp_path / "recipe.yaml", recipe))]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_the_default_list_still_skips_what_does_not_apply(tiny_sources, tiny_evals, tmp_path):
    two = {name: tiny_sources[name] for name in ("base", "specialist1")}
    recipe = parse_recipe(tiny_recipe(two, tiny_evals, tmp_path / "run"))
    assert "model_stock" in plan_baselines(recipe, two).skipped
