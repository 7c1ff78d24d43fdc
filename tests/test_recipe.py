"""Bad recipes exit non-zero with one message naming the field and the value, before loading weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from merger.cli import main
from merger.recipe import parse_recipe
from tests.recipes import tiny_recipe, write_recipe
from tests.tiny_models import build_model, build_tokenizer


def run_cli(tmp_path: Path, recipe: dict, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    code = main(["run", str(path), "--no-progress"])
    return code, capsys.readouterr().err


def test_a_valid_recipe_parses(tiny_sources, tiny_evals, tmp_path):
    recipe = parse_recipe(tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run"))
    assert recipe.merged_sources == ["specialist1", "specialist2"]
    assert set(recipe.genome.searched) == {"weight", "density"}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"genome": {"method": "ties", "parameters": {"weight": 1.0, "densty": 0.5}}}, "parameters.densty"),
        ({"optimizer": {"popsize": "eight"}}, "optimizer.popsize"),
        ({"colour": "blue"}, "colour: Extra inputs are not permitted"),
        (
            {"genome": {"method": "ties", "parameters": {"weight": 1.0, "density": {"min": 0.1, "max": 1.5}}}},
            "parameters.density: 1.5 is outside the values density can take, (0.0, 1.0] in ties",
        ),
        ({"genome": {"method": "frankenmerge", "parameters": {"weight": 1.0}}}, "unknown merge method 'frankenmerge'"),
        ({"genome": {"method": "ties", "parameters": {"density": 0.5}}}, "parameters.weight is required for ties"),
        ({"base_model": None}, "base_model is required for ties"),
        ({"base_model": "nobody"}, "base_model: 'nobody' is not one of the sources"),
        ({"optimizer": {"max_evaluations": None}}, "give a budget"),
        ({"genome": {"method": "slerp", "parameters": {"t": {"min": 0, "max": 1}}}}, "slerp merges exactly 2 models"),
    ],
)
def test_schema_errors_name_the_field(tiny_sources, tiny_evals, tmp_path, capsys, change, expected):
    recipe = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run", **change)
    code, err = run_cli(tmp_path, recipe, capsys)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err
    assert err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_granularity_larger_than_the_model(tiny_sources, tiny_evals, tmp_path, capsys):
    recipe = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run")
    recipe["genome"]["layer_granularity"] = 10
    code, err = run_cli(tmp_path, recipe, capsys)
    assert code == 2
    assert "genome.layer_granularity: 10 is larger than the models' 4 layers" in err


def test_missing_source(tiny_sources, tiny_evals, tmp_path, capsys):
    recipe = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run")
    recipe["sources"][1]["path"] = str(tmp_path / "nowhere")
    code, err = run_cli(tmp_path, recipe, capsys)
    assert code == 2
    assert f"source '{tmp_path / 'nowhere'}' does not exist" in err


def test_pickled_weights_need_permission(tiny_sources, tiny_evals, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_sources["specialist1"], pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    recipe = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run")
    recipe["sources"][1]["path"] = str(pickled)
    code, err = run_cli(tmp_path, recipe, capsys)
    assert code == 2
    assert "only has pickled .bin weights; set allow_pickle: true" in err


def test_architectures_that_cannot_be_merged(tiny_sources, tiny_evals, tmp_path, capsys):
    deeper = tmp_path / "deeper"
    build_model(deeper, build_tokenizer(tmp_path / "tok"), seed=5, num_layers=6)
    recipe = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run")
    recipe["sources"][2]["path"] = str(deeper)
    code, err = run_cli(tmp_path, recipe, capsys)
    assert code == 2
    assert "cannot be merged: num_hidden_layers is 4 vs 6" in err


@pytest.mark.slow  # lm-eval's task index in a subprocess
def test_unknown_task(tiny_sources, tiny_evals, tmp_path, capsys):
    recipe = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run")
    recipe["validation"] = {"tasks": ["no_such_task_anywhere"]}
    code, err = run_cli(tmp_path, recipe, capsys)
    assert code == 2
    assert "validation.tasks.0.name: unknown task 'no_such_task_anywhere'" in err


def test_missing_recipe_and_bad_yaml(tmp_path, capsys):
    assert main(["run", str(tmp_path / "absent.yaml")]) == 2
    assert "recipe not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [unclosed\n")
    assert main(["run", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
