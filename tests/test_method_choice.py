"""`genome.method: auto`: the run searches the method of its best untuned merge on the fitness set, with that
merge as its warm start; the choice is kept, said, and not made twice; bad auto genomes are one line."""

from __future__ import annotations

import json

import pytest
import yaml

import merger.cli
import merger.finish.method_choice as method_choice
import merger.finish.scores as scores_module
from merger.common.errors import MergerError
from merger.recipe import parse_recipe
from merger.rundir.layout import RunDir
from merger.rundir.ledger import Ledger, baseline_key
from tests.cli import assert_one_line_error, run_merger
from tests.recipes import tiny_recipe, write_recipe

BASELINES = ["linear", "task_arithmetic", "ties_d0.5", "ties_d0.2", "model_stock", "dare_ties_d0.5"]


def auto_recipe(tiny_sources, tiny_evals, run_dir, **overrides):
    settings = {
        "genome": {"method": "auto", "parameters": {"weight": {"min": 0.0, "max": 1.0}}, "tensor_classes": []},
        "optimizer": {"popsize": 4, "max_evaluations": 6, "seed": 3},
        "fitness": {"tasks": [{"name": "tiny_mc", "metric": "acc"}], "limit": 8},
        "validation": {"tasks": ["tiny_gen"], "limit": 8},
        "selection": {"top_k": 2, "block": None},
        "baselines": BASELINES,
    }
    return tiny_recipe(tiny_sources, tiny_evals, run_dir, **{**settings, **overrides})


def test_auto_considers_the_baselines_whose_method_takes_a_weight_per_source(tiny_sources, tiny_evals, tmp_path):
    recipe = parse_recipe(auto_recipe(tiny_sources, tiny_evals, tmp_path / "run", baselines="all"), "recipe")
    names, skipped = method_choice.considered(recipe)
    assert names == [
        "linear", "task_arithmetic", "task_arithmetic_w1", "ties_d0.5", "ties_d0.2", "dare_ties_d0.5",
        "dare_linear_d0.5", "della_d0.5", "breadcrumbs", "breadcrumbs_ties", "multislerp",
    ]
    assert set(skipped) == {"defaults", "model_stock", "karcher", "slerp"}
    assert skipped["model_stock"] == "model_stock has no weight per source to search"
    ties = recipe.with_method("ties_d0.2").genome  # the baseline's density is fixed: it is the warm start
    assert ties.method == "ties" and ties.parameters["density"] == 0.2 and "density" not in ties.searched
    crumbs = recipe.with_method("breadcrumbs").genome
    assert crumbs.parameters["density"] == 0.9 and crumbs.parameters["gamma"] == 0.01
    searched = parse_recipe(
        auto_recipe(tiny_sources, tiny_evals, tmp_path / "run", genome={
            "method": "auto", "parameters": {"weight": {"min": 0.0, "max": 1.0}, "density": {"min": 0.1, "max": 1.0}},
        }), "recipe",
    )
    assert set(searched.with_method("ties_d0.5").genome.searched) == {"weight", "density"}
    assert "density" not in searched.with_method("multislerp").genome.parameters  # multislerp has none


@pytest.mark.parametrize(
    ("genome", "expected"),
    [
        ({"method": "auto", "parameters": {"gamma": 0.01}}, "parameters.gamma: method auto sets weight and density only"),
        ({"method": "auto", "parameters": {"density": 0.0}}, "parameters.density: 0.0 is outside the values density can take, (0.0, 1.0]"),
        ({"method": "auto", "options": {"normalize": True}}, "options.normalize: method auto takes no options"),
    ],
)
def test_a_bad_auto_genome_is_one_line_before_any_weights_load(tiny_sources, tiny_evals, tmp_path, genome, expected):
    data = auto_recipe(tiny_sources, tiny_evals, tmp_path / "run", genome=genome)
    data["genome"] = genome
    assert_one_line_error(run_merger("run", str(write_recipe(tmp_path / "recipe.yaml", data))), expected)
    assert not (tmp_path / "run").exists()


def test_auto_with_defaults_named_is_one_line(tiny_sources, tiny_evals, tmp_path):
    data = auto_recipe(tiny_sources, tiny_evals, tmp_path / "run", baselines=["defaults", "ties_d0.5"])
    process = run_merger("run", str(write_recipe(tmp_path / "recipe.yaml", data)))
    assert_one_line_error(process, "baselines: defaults (auto) does not apply", "method auto chooses that")


@pytest.mark.slow  # a whole run
def test_auto_searches_the_best_baselines_method_from_that_baseline(tiny_sources, tiny_evals, tmp_path, capsys, monkeypatch):
    recipe = write_recipe(tmp_path / "recipe.yaml", auto_recipe(tiny_sources, tiny_evals, tmp_path / "run"))
    assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0
    said = capsys.readouterr().err
    layout = RunDir(tmp_path / "run")
    choice = json.loads(layout.method_choice.read_text())["choice"]
    fitness = {name: scored["fitness"] for name, scored in choice["scored"].items()}
    best = max(fitness, key=fitness.get)  # the first of equals
    assert choice["baseline"] == best and f"method auto: {choice['method']}, the method of {best}" in said
    assert list(fitness) == ["linear", "task_arithmetic", "ties_d0.5", "ties_d0.2", "dare_ties_d0.5"]
    assert not layout.method_probe.exists()
    summary = layout.read_summary()
    assert summary is not None and summary.method == choice["method"]
    assert summary.method_chosen is not None and summary.method_chosen.fitness == fitness
    stored = parse_recipe(yaml.safe_load(layout.recipe.read_text()), "stored")
    assert stored.genome.method == choice["method"]  # the run directory holds the recipe it searched
    ledger = Ledger(layout.path)
    try:
        assert f"baseline {best}" in (ledger.meta().warm_starts or [])  # the search starts from that merge
        rows = {(row.model, row.eval_set): row for row in ledger.final_scores()}
    finally:
        ledger.close()
    for name, scored in choice["scored"].items():  # the end reused the choice's fitness scores
        assert rows[(baseline_key(name), "fitness")].identity == scored["identity"]
        assert summary.baselines[name].fitness == scored["scores"]
    assert "chosen by `method: auto`" in (layout.final / "README.md").read_text()

    def no_scoring(*args, **kwargs):
        raise AssertionError("the choice was made again")

    monkeypatch.setattr(method_choice, "score_final", no_scoring)
    assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0  # finished: the choice is read back
    other = write_recipe(tmp_path / "other.yaml", auto_recipe(tiny_sources, tiny_evals, tmp_path / "run", baselines=["linear"]))
    with pytest.raises(MergerError, match="holds a run of a different recipe"):
        method_choice.choose_method(parse_recipe(yaml.safe_load(other.read_text()), "other"), layout.path)


def test_a_choice_killed_before_it_was_kept_resumes_its_probe_without_scoring_again(
    tiny_sources, tiny_evals, tmp_path, monkeypatch
):
    recipe = parse_recipe(auto_recipe(tiny_sources, tiny_evals, tmp_path / "run"), "recipe")
    def killed(*args):
        raise RuntimeError("killed")

    monkeypatch.setattr(method_choice, "write_atomic", killed)
    with pytest.raises(RuntimeError, match="killed"):
        method_choice.choose_method(recipe, tmp_path / "run")
    assert RunDir(tmp_path / "run").method_probe.is_dir()  # scored, not yet kept
    monkeypatch.undo()
    jobs: list[int] = []
    real = scores_module.score_models
    def counted(executor, work, keep):
        jobs.append(len(work))
        return real(executor, work, keep)

    monkeypatch.setattr(scores_module, "score_models", counted)
    resolved, choice = method_choice.choose_method(recipe, tmp_path / "run")
    assert jobs == [0] and resolved.genome.method == choice.method  # every score came from the probe's ledger
    assert not RunDir(tmp_path / "run").method_probe.exists() and RunDir(tmp_path / "run").method_choice.is_file()
