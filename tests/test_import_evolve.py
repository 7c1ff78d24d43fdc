"""`merger import-evolve`: mergekit-evolve configurations become recipes with the same search space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from merger.cli import main
from merger.recipe import load_recipe, parse_recipe
from merger.recipe.evolve_import import import_evolve
from merger.space.parameters import Genome
from tests.cli import assert_one_line_error, run_merger

DOCS_EXAMPLE = Path(__file__).parent / "fixtures" / "evolve_docs_example.yml"
REPORT_PREFIX = "import-evolve: no equivalent in merger: "
CHAT_TEMPLATE_SET = "import-evolve: set fitness.apply_chat_template: true"
CHAT_TEMPLATE_DEFAULT = (
    CHAT_TEMPLATE_SET + " (mergekit-evolve's default when the configuration leaves it out); "
    "sources without a chat template need apply_chat_template: false"
)


def write_config(path: Path, genome: dict, **fields: object) -> Path:
    path.write_text(yaml.safe_dump({"genome": genome, "tasks": fields.pop("tasks", ["tiny_mc"]), **fields}))
    return path


@pytest.mark.slow  # a subprocess
def test_the_documented_example_becomes_a_valid_recipe(tmp_path: Path) -> None:
    out = tmp_path / "recipe.yaml"
    process = run_merger("import-evolve", str(DOCS_EXAMPLE), "-o", str(out), cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert REPORT_PREFIX not in process.stderr  # everything in the documented example has an equivalent
    assert CHAT_TEMPLATE_DEFAULT in process.stderr
    recipe = load_recipe(out)
    assert recipe.source_names == ["model_1", "model_2", "model_3", "base_model_if_needed"]
    assert recipe.base_model == "base_model_if_needed"
    assert recipe.merged_sources == ["model_1", "model_2", "model_3"]
    genome = recipe.genome
    assert genome.method == "dare_ties"
    assert {name: (r.min, r.max) for name, r in genome.searched.items()} == {
        "weight": (0.0, 1.0), "density": (0.01, 1.0),  # density 0 keeps nothing: not a value a recipe takes
    }
    assert genome.options == {"normalize": False, "int8_mask": True}
    assert genome.layer_granularity == 8
    assert genome.tensor_classes == ["attention", "mlp"]
    assert [(t.name, t.weight, t.metric) for t in recipe.fitness.tasks] == [
        ("lm_eval_task_name", 1.0, "acc,none"), ("another_task", 1.0, "acc,none"),
    ]
    assert recipe.fitness.apply_chat_template is True  # mergekit-evolve's default
    assert recipe.optimizer.x0 == {"weight": pytest.approx(1 / 3, abs=1e-6), "density": 1.0}
    assert recipe.optimizer.max_evaluations == 100  # mergekit-evolve's --max-fevals default


@pytest.mark.slow  # a subprocess
def test_printed_without_output_file(tmp_path: Path) -> None:
    process = run_merger("import-evolve", str(DOCS_EXAMPLE), cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert parse_recipe(yaml.safe_load(process.stdout)).genome.method == "dare_ties"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("method", "filters", "granularity"),
    [("ties", ["self_attn", "mlp"], 2), ("task_arithmetic", None, 0), ("linear", ["mlp"], 1)],
)
def test_the_search_space_has_mergekit_evolves_dimension_and_starting_point(
    tmp_path: Path, tiny_sources: dict[str, Path], method: str, filters: list[str] | None, granularity: int
) -> None:
    """As many genes as mergekit-evolve's genotype, starting where it starts (weights 1/n, density 1)."""
    from mergekit.evo.config import EvolMergeConfiguration
    from mergekit.evo.genome import ModelGenome

    genome_fields = {
        "models": [str(tiny_sources["specialist1"]), str(tiny_sources["specialist2"])],
        "merge_method": method,
        "base_model": str(tiny_sources["base"]) if method != "linear" else None,
        "layer_granularity": granularity,
        "filters": filters,
    }
    config = write_config(tmp_path / "evolve.yml", genome_fields)
    imported = import_evolve(config)  # granularity 0: the layer count comes from the first model's config
    assert imported.unmapped == []
    recipe = parse_recipe(imported.recipe)
    ours = Genome(recipe, {s.name: Path(s.path) for s in recipe.sources}, num_layers=4)

    theirs = ModelGenome(EvolMergeConfiguration.model_validate(yaml.safe_load(config.read_text())).genome)
    x0 = theirs.initial_genotype().numpy()
    assert ours.dimension == x0.size
    start = ours.decode(ours.initial())
    for parameter, index in (("weight", 0), ("density", 1)):
        expected = np.unique(x0[..., index]) if index < x0.shape[-1] else []
        values = [start[i] for i, gene in enumerate(ours.genes) if gene.parameter == parameter]
        assert sorted(set(np.round(values, 6))) == pytest.approx(list(expected))


def test_options_ranges_and_eval_settings_carry_over(tmp_path: Path, tiny_sources: dict[str, Path]) -> None:
    config = write_config(
        tmp_path / "evolve.yml",
        {
            "models": [str(tiny_sources["specialist1"]), str(tiny_sources["base"])],
            "merge_method": "slerp",
            "layer_granularity": 2,
            "allow_negative_weights": True,
        },
        tasks=[{"name": "tiny_mc", "weight": 2.0, "metric": "acc_norm,none"}, "tiny_gen"],
        limit=12, num_fewshot=3, shuffle=True, apply_chat_template=False, fewshot_as_multiturn=False,
    )
    imported = import_evolve(config)
    recipe = parse_recipe(imported.recipe)
    assert imported.unmapped == []
    assert recipe.genome.method == "slerp" and recipe.base_model == "specialist1"
    assert {n: (r.min, r.max) for n, r in recipe.genome.searched.items()} == {"t": (0.0, 1.0)}
    fitness = recipe.fitness
    assert (fitness.limit, fitness.num_fewshot, fitness.apply_chat_template) == (12, 3, False)
    assert fitness.subsample_seed is not None  # shuffle: a random subset of `limit` items
    assert [(t.name, t.weight, t.metric) for t in fitness.tasks] == [
        ("tiny_mc", 2.0, "acc_norm,none"), ("tiny_gen", 1.0, "acc,none"),
    ]

    negative = write_config(
        tmp_path / "negative.yml",
        {"models": ["a", "b"], "merge_method": "task_arithmetic", "base_model": "b", "allow_negative_weights": True,
         "layer_granularity": 1},
    )
    weight = parse_recipe(import_evolve(negative).recipe).genome.searched["weight"]
    assert (weight.min, weight.max) == (-1.0, 1.0)


@pytest.mark.slow  # subprocesses
def test_what_has_no_equivalent_is_reported_in_one_line(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "evolve.yml",
        {
            "models": ["org/model_a@v2", "org/base"],
            "merge_method": "ties",
            "base_model": "org/base",
            "tokenizer_source": "union",
            "layer_granularity": 4,
            "smooth": True,
            "filters": ["self_attn", "q_proj", "embed_tokens"],
        },
        random_init=True, fewshot_as_multiturn=False,
    )
    out = tmp_path / "recipe.yaml"
    process = run_merger("import-evolve", str(config), "-o", str(out), cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    report = [line for line in process.stderr.splitlines() if line.startswith(REPORT_PREFIX)]
    assert len(report) == 1, process.stderr
    for expected in (
        "revision @v2", "tokenizer_source 'union'", "smooth: true", "filter 'q_proj'", "filter 'embed_tokens' alone",
        "the base model's own ties values", "random_init", "fewshot_as_multiturn: false",
    ):
        assert expected in report[0], (expected, report[0])
    assert "No equivalent in merger: " in out.read_text()  # the recipe says so too
    recipe = load_recipe(out)
    assert recipe.genome.tensor_classes == ["attention", "embeddings"]
    assert recipe.tokenizer_source is None


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, CHAT_TEMPLATE_DEFAULT),
        ({"apply_chat_template": True}, CHAT_TEMPLATE_SET + " (the configuration sets it)"),
        ({"apply_chat_template": False}, None),
    ],
)
def test_a_chat_template_the_configuration_implies_is_said_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: dict, expected: str | None
) -> None:
    genome = {"models": ["a", "b"], "merge_method": "linear", "layer_granularity": 1}
    config = write_config(tmp_path / "evolve.yml", genome, **fields)
    out = tmp_path / "recipe.yaml"
    assert main(["import-evolve", str(config), "-o", str(out)]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith(CHAT_TEMPLATE_SET)]
    assert load_recipe(out).fitness.apply_chat_template is (expected is not None)
    if expected is None:
        assert said == [] and "apply_chat_template" not in out.read_text().split("\nsources:")[0]
    else:
        assert len(said) == 1 and said[0].startswith(expected), said
        assert "# Implied by the configuration: set fitness.apply_chat_template: true" in out.read_text()


@pytest.mark.parametrize(
    ("genome", "tasks", "expected"),
    [
        ({"models": ["a", "b+lora_dir"], "merge_method": "linear"}, ["t"], "LoRA adapter"),
        ({"models": ["a", "b", "c"], "merge_method": "slerp"}, ["t"], "slerp over 3 models"),
        ({"models": ["a", "b"], "merge_method": "slerp", "base_model": "c"}, ["t"], "a third (the base)"),
        ({"models": ["a", "b"], "merge_method": "breadcrumbs"}, ["t"], "Invalid merge method"),
        ({"models": ["a", "b"], "merge_method": "linear", "layer_granularity": 1},
         [{"name": "perplexity_task", "weight": -1.0}], "weight -1.0 of 'perplexity_task'"),
        ({"models": ["not_here", "b"], "merge_method": "linear"}, ["t"], "--num-layers"),
    ],
)
def test_a_configuration_it_cannot_import_is_one_error_line(
    tmp_path: Path, genome: dict, tasks: list, expected: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "evolve.yml", genome, tasks=tasks)
    assert main(["import-evolve", str(config), "-o", str(tmp_path / "out.yaml")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("merger: error: ") and expected in error[0], error
    assert not (tmp_path / "out.yaml").exists()


@pytest.mark.slow  # a subprocess
def test_a_subprocess_user_sees_the_same_one_line_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "evolve.yml", {"models": ["a", "b+lora"], "merge_method": "linear"})
    assert_one_line_error(run_merger("import-evolve", str(config), cwd=tmp_path), "LoRA adapter")
