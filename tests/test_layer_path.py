"""Layer-path (DFS) merging: the recipe, the genome, the engine against mergekit's passthrough export,
generation with a KV cache when a layer repeats, and whole runs (CLI, registry, PS+DFS, resume, failures)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from merger.cli import main
from merger.common.errors import MergerError
from merger.engine.factory import engine_for_recipe
from merger.engine.layer_path import LayerPathEngine, path_of_config
from merger.engine.reference import export_merge
from merger.recipe import load_recipe, parse_recipe, recipe_to_yaml
from merger.rundir.ledger import Ledger
from merger.search.open import open_run
from merger.space.layer_path import LayerPathGenome, PathLayer, passthrough_config
from tests.recipes import tiny_recipe, write_recipe
from tests.test_search import assert_resume_after_sigkill_equals_an_uninterrupted_run, run_in_process
from tests.tiny_models import build_tokenizer, tiny_config, with_tensor_filled

REPO = Path(__file__).resolve().parent.parent
PROMPT = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])


def dfs_recipe(sources: dict[str, Path], evals: Path, run_dir: Path, **settings: Any) -> dict[str, Any]:
    """A small layer-path search on the tiny fixtures: 3 sources x 4 layers x `repeats` slots."""
    # the start path (generation -1) and two generations of 4
    data = tiny_recipe(sources, evals, run_dir, optimizer={"popsize": 4, "max_evaluations": 9, "seed": 3})
    data["genome"] = {"space": "layer_path", "layer_path": {"repeats": 2, "max_layers": 8, **settings}}
    data["fitness"] = {"tasks": [{"name": "tiny_mc", "metric": "acc"}], "limit": 12}
    return data


def genome_of(data: dict[str, Any], sources: dict[str, Path]) -> LayerPathGenome:
    return LayerPathGenome(parse_recipe(data), sources, 4)


def steps(path: list[PathLayer]) -> list[tuple[str, int]]:
    return [(layer.source, layer.layer) for layer in path]


# -- recipe ------------------------------------------------------------------------------------------
def test_a_given_x0_is_refused_for_a_layer_path(tiny_sources, tiny_evals, tmp_path):
    data = dfs_recipe(tiny_sources, tiny_evals, tmp_path)
    data["optimizer"]["x0"] = {"weight": 0.5}
    with pytest.raises(MergerError, match="optimizer.x0: a layer path starts from genome.layer_path.start"):
        parse_recipe(data)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"repeats": 0}, "genome.layer_path.repeats: Input should be greater than or equal to 1"),
        ({"min_layers": 6, "max_layers": 5}, "max_layers (5) is below min_layers (6)"),
        ({"anchor": "nobody"}, "genome.layer_path.anchor: 'nobody' is not one of the sources"),
        ({"scale_range": {"min": -1.0, "max": 1.0}}, "scale_range [-1.0, 1.0] is outside [0.0, 4.0]"),
        ({"min_layers": 30, "max_layers": None}, "min_layers: 30 is more than the 24 layers a path can hold"),
    ],
)
def test_bad_layer_path_settings_are_one_line(tiny_sources, tiny_evals, tmp_path, capsys, settings, expected):
    recipe = write_recipe(
        tmp_path / "recipe.yaml", dfs_recipe(tiny_sources, tiny_evals, tmp_path / "run", **settings)
    )
    assert main(["run", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("merger: error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("genome", "expected"),
    [
        (
            {"space": "layer_path", "method": "ties"},
            "space layer_path merges with passthrough; drop method 'ties'",
        ),
        (
            {"space": "layer_path", "layer_granularity": 2},
            "takes its settings under layer_path, not layer_granularity",
        ),
        ({"layer_path": {"repeats": 2}}, "layer_path settings need space: layer_path"),
        ({"parameters": {"weight": 1.0}}, "method is required"),
        ({"method": "passthrough"}, "passthrough needs space: layer_path; as a parameter merge, merge"),
    ],
)
def test_genome_space_mistakes_are_one_line(tiny_sources, tiny_evals, tmp_path, genome, expected):
    data = dfs_recipe(tiny_sources, tiny_evals, tmp_path / "run")
    data["genome"] = genome
    with pytest.raises(MergerError, match=re.escape(expected)):
        parse_recipe(data)


def test_a_layer_path_recipe_reads_back_as_written(tiny_sources, tiny_evals, tmp_path):
    """The run directory keeps recipe_to_yaml's text (method: passthrough spelled out); it parses again."""
    recipe = parse_recipe(dfs_recipe(tiny_sources, tiny_evals, tmp_path, scales="per_slot"))
    assert parse_recipe(yaml.safe_load(recipe_to_yaml(recipe))) == recipe


def test_sources_of_different_hidden_sizes_are_refused(tiny_sources, tiny_evals, tmp_path, capsys):
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    config = tiny_config(len(tokenizer))
    config.hidden_size, config.head_dim = 48, 12
    torch.manual_seed(0)
    wide = tmp_path / "wide"
    AutoModelForCausalLM.from_config(config).save_pretrained(wide)
    tokenizer.save_pretrained(wide)
    sources = {"base": tiny_sources["base"], "wide": wide}
    recipe = write_recipe(tmp_path / "recipe.yaml", dfs_recipe(sources, tiny_evals, tmp_path / "run"))
    capsys.readouterr()  # saving the model wrote a progress bar
    assert main(["run", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sources base and wide cannot be merged: hidden_size is 32 vs 48" in err


def test_bundled_dfs_recipes_validate() -> None:
    """recipes/dfs-zoo.yaml and ps-dfs-zoo.yaml: their schema and tasks (no weights load)."""
    from merger.scoring.fitness import check_tasks

    dfs = load_recipe(REPO / "recipes" / "dfs-zoo.yaml")
    assert dfs.genome.space == "layer_path" and [s.path for s in dfs.sources] == [
        "zoo:base",
        "zoo:add",
        "zoo:cap",
    ]
    ps_dfs = load_recipe(REPO / "recipes" / "ps-dfs-zoo.yaml")
    assert ps_dfs.sources[0].path == "registry:add-cap-winner" and ps_dfs.anchor == ps_dfs.sources[0].name
    assert ps_dfs.genome.path_settings.fix_ends and ps_dfs.genome.path_settings.scales == "per_slot"
    for recipe in (dfs, ps_dfs):
        check_tasks(recipe)


# -- genome ------------------------------------------------------------------------------------------
def test_slots_threshold_and_order(tiny_sources, tiny_evals, tmp_path):
    genome = genome_of(dfs_recipe(tiny_sources, tiny_evals, tmp_path), tiny_sources)
    assert genome.dimension == 24
    assert [(s.source, s.layer, s.repeat) for s in genome.slots[:5]] == [
        ("base", 0, 0),
        ("base", 1, 0),
        ("base", 2, 0),
        ("base", 3, 0),
        ("specialist1", 0, 0),
    ]
    assert genome.slots[12].repeat == 1 and genome.slots[12].source == "base"
    x = np.zeros(24)
    x[[13, 5, 20]] = [0.5, 0.99, 0.7]  # in at 0.5 and above, always in slot order
    assert steps(genome.decode(x)) == [("specialist1", 1), ("base", 1), ("specialist2", 0)]
    # the start is the anchor (the base model) itself
    assert steps(genome.decode(genome.initial())) == [("base", layer) for layer in range(4)]


def test_paths_outside_the_limits_are_repaired_deterministically(tiny_sources, tiny_evals, tmp_path):
    genome = genome_of(
        dfs_recipe(tiny_sources, tiny_evals, tmp_path, min_layers=3, max_layers=5), tiny_sources
    )
    x = np.full(24, 0.1)
    x[[2, 9, 17]] = [0.45, 0.3, 0.45]  # nothing in: the three highest join, ties to the earlier slot
    assert [layer.slot for layer in genome.decode(x)] == [2, 9, 17]
    x = np.full(24, 0.9)
    x[[0, 4, 23]] = 0.6  # everything in: the lowest leave until 5 remain (ties: the later slot leaves first)
    kept = [layer.slot for layer in genome.decode(x)]
    assert len(kept) == 5 and kept == [1, 2, 3, 5, 6]
    assert genome.decode(x) == genome.decode(x.copy())


def test_fixed_ends_and_scales_reach_the_passthrough_config(tiny_sources, tiny_evals, tmp_path):
    data = dfs_recipe(
        tiny_sources,
        tiny_evals,
        tmp_path,
        anchor="specialist1",
        fix_ends=True,
        scales="per_slot",
        scale_range={"min": 0.5, "max": 1.5},
    )
    genome = genome_of(data, tiny_sources)
    assert genome.dimension == 48
    x = np.full(48, 0.2)
    x[[1, 2, 18]] = 0.8  # base 1, base 2 (consecutive: one slice), specialist1 2 of the second repeat
    x[24 + 18] = 1.0  # its scale: 1.5
    path = genome.decode(x)
    assert steps(path) == [
        ("specialist1", 0),
        ("base", 1),
        ("base", 2),
        ("specialist1", 2),
        ("specialist1", 3),
    ]
    assert [layer.scale for layer in path] == [1.0, 0.7, 0.7, 1.5, 1.0]
    config = genome.to_config(x)
    ranges = [(str(s.sources[0].model.model), tuple(s.sources[0].layer_range)) for s in config.slices]
    spec1, base = str(tiny_sources["specialist1"]), str(tiny_sources["base"])
    assert ranges == [
        (spec1, (0, 0)),
        (spec1, (0, 1)),
        (base, (1, 3)),
        (spec1, (2, 3)),
        (spec1, (3, 4)),
        (spec1, (4, 4)),
    ]
    names = {str(path): name for name, path in tiny_sources.items()}
    assert path_of_config(config, names, 4) == (
        "specialist1",
        [PathLayer(layer.source, layer.layer, layer.scale) for layer in path],
    )
    assert genome.table(x)[3] == {
        "gene": "path.3",
        "parameter": "scale",
        "source": "specialist1",
        "tensor_class": "residual",
        "group": 3,
        "value": 1.5,
        "layer": 2,
        "slot": 18,
    }


# -- engine ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_sources) -> LayerPathEngine:
    return LayerPathEngine(tiny_sources, "base", dtype=torch.float32, device="cpu")


def test_the_factory_builds_the_layer_path_engine_a_recipe_asks_for(tiny_sources, tiny_evals, tmp_path):
    recipe = parse_recipe(dfs_recipe(tiny_sources, tiny_evals, tmp_path, anchor="specialist1"))
    built = engine_for_recipe(recipe, tiny_sources, "cpu")
    assert isinstance(built, LayerPathEngine) and built.anchor == "specialist1"
    assert built.model.config.num_hidden_layers == 4


def source_storages(engine: LayerPathEngine) -> set[int]:
    return {p.untyped_storage().data_ptr() for m in engine.source_models.values() for p in m.parameters()}


def export(tmp_path: Path, config) -> Any:
    export_merge(config, tmp_path / "exported")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()


@pytest.mark.parametrize("seed", [0, 1])
def test_candidate_equals_mergekit_passthrough_export_and_copies_no_weight(
    engine, tiny_sources, tiny_evals, tmp_path, seed
):
    data = dfs_recipe(tiny_sources, tiny_evals, tmp_path, scales="per_slot", anchor="specialist2")
    genome = genome_of(data, tiny_sources)
    x = np.random.default_rng(seed).uniform(size=genome.dimension)
    config = genome.to_config(x)
    engine.apply_config(config)
    exported = export(tmp_path, config)
    assert exported.config.num_hidden_layers == engine.model.config.num_hidden_layers == len(genome.decode(x))
    with torch.no_grad():
        torch.testing.assert_close(engine.model(PROMPT).logits, exported(PROMPT).logits, rtol=1e-5, atol=1e-5)
    stored = source_storages(engine)
    assert all(p.untyped_storage().data_ptr() in stored for p in engine.model.parameters())


def test_generation_with_a_cache_when_a_layer_repeats(engine, tiny_sources, tmp_path):
    """base.1 three times (once scaled), specialist1.2 twice: each position keeps its own cache entry."""
    path = [
        PathLayer("base", 0),
        PathLayer("base", 1),
        PathLayer("specialist1", 2),
        PathLayer("base", 1, 0.75),
        PathLayer("specialist1", 2),
        PathLayer("base", 1),
        PathLayer("base", 3),
    ]
    paths = {name: str(p) for name, p in tiny_sources.items()}
    config = passthrough_config(path, paths, anchor="base", num_layers=4, dtype="float32")
    engine.apply_config(config)
    exported = export(tmp_path, config)

    def generate(model, use_cache: bool) -> tuple[list[int], torch.Tensor]:
        out = model.generate(
            PROMPT,
            max_new_tokens=12,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        return out.sequences[0].tolist(), torch.stack(out.logits)

    cached, cached_logits = generate(engine.model, True)
    uncached, uncached_logits = generate(engine.model, False)
    theirs, their_logits = generate(exported, True)
    assert cached == uncached == theirs
    torch.testing.assert_close(cached_logits, their_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached_logits, uncached_logits, rtol=1e-4, atol=1e-4)
    assert [layer.self_attn.layer_idx for layer in engine.model.model.layers] == list(range(7))


def test_scoring_a_checkpoint_leaves_the_sources_as_they_were(engine, tiny_sources, tmp_path):
    paths = {name: str(p) for name, p in tiny_sources.items()}
    config = passthrough_config(
        [PathLayer("specialist1", 3, 1.3), PathLayer("base", 0)],
        paths,
        anchor="base",
        num_layers=4,
        dtype="float32",
    )
    engine.apply_config(config)
    with torch.no_grad():
        before = engine.model(PROMPT).logits
    exported = export(
        tmp_path,
        passthrough_config(
            [PathLayer("specialist2", 1, 2.0)], paths, anchor="specialist2", num_layers=4, dtype="float32"
        ),
    )
    engine.load_checkpoint(tmp_path / "exported")
    with torch.no_grad():
        torch.testing.assert_close(engine.model(PROMPT).logits, exported(PROMPT).logits)
    engine.load_checkpoint(tiny_sources["specialist1"])
    own = AutoModelForCausalLM.from_pretrained(tiny_sources["specialist1"], dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(engine.model(PROMPT).logits, own(PROMPT).logits)
    engine.apply_config(config)
    with torch.no_grad():
        torch.testing.assert_close(engine.model(PROMPT).logits, before, rtol=0, atol=0)


# -- runs ----------------------------------------------------------------------------------------------
def assert_reproduced_by_mergekit(run_dir: Path, out: Path) -> None:
    subprocess.run(["mergekit-yaml", str(run_dir / "best.yaml"), str(out)], check=True, capture_output=True)
    ours, theirs = load_file(run_dir / "final" / "model.safetensors"), load_file(out / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)


@pytest.mark.slow  # two searches and a publish
def test_ps_then_dfs_over_the_registry_winner(tiny_sources, tiny_evals, tmp_path, capsys):
    """A parameter merge is published; a layer-path search over it and the specialists (PS+DFS) runs from
    the CLI, its best.yaml reproduces final/, and the registry and a router backend serve its winner."""
    registry = tmp_path / "registry"
    ps = tiny_recipe(
        tiny_sources,
        tiny_evals,
        tmp_path / "ps",
        output={"run_dir": str(tmp_path / "ps"), "publish": "ps-winner", "registry": str(registry)},
    )
    assert main(["run", str(write_recipe(tmp_path / "ps.yaml", ps)), "--no-progress"]) == 0
    sources = {"ps": "registry:ps-winner", **{k: v for k, v in tiny_sources.items() if k != "base"}}
    data = dfs_recipe(sources, tiny_evals, tmp_path / "dfs", anchor="ps", fix_ends=True, scales="per_slot")
    data.pop("base_model")
    data["selection"] = {"enabled": False}  # the path CMA-ES found is what this test follows to the registry
    data["output"] = {"run_dir": str(tmp_path / "dfs"), "publish": "dfs-winner", "registry": str(registry)}
    assert main(["run", str(write_recipe(tmp_path / "dfs.yaml", data)), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "a layer path over 24 slots" in captured.err and "published dfs-winner@1" in captured.out

    run_dir = tmp_path / "dfs"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "passthrough" and summary["lineage"]["ps"]["registry"] == "ps-winner"
    path = summary["winner"]["genes"]
    assert path[0]["source"] == path[-1]["source"] == "ps" and (path[0]["layer"], path[-1]["layer"]) == (0, 3)
    config = json.loads((run_dir / "final" / "config.json").read_text())
    assert config["num_hidden_layers"] == len(path)
    card = (run_dir / "final" / "README.md").read_text()
    assert f"## Layer path\n\n{len(path)} layers: ps.0 → " in card
    assert_reproduced_by_mergekit(run_dir, tmp_path / "reproduced")
    assert main(["report", str(run_dir)]) == 0 and (run_dir / "report.html").is_file()

    from merger.conductor.backend_factory import build_backend
    from merger.conductor.backends import Generation
    from merger.registry import Registry
    from merger.router.pool import parse_pool

    entry = Registry(registry).resolve("dfs-winner")
    assert f"## Layer path\n\n{len(path)} layers: ps.0 → " in (entry / "README.md").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(entry).eval()
    assert loaded.config.num_hidden_layers == len(path)
    pool = parse_pool(
        {"members": [{"name": "dfs", "registry": "dfs-winner", "chat_template": False}]}, tmp_path
    )
    backend = build_backend(pool.members[0], registry)
    answer = asyncio.run(
        backend.complete([{"role": "user", "content": "The capital of Peru is"}], Generation(4), 60)
    )
    assert isinstance(answer, str) and answer.strip(), f"the served winner answered {answer!r}"


@pytest.mark.slow  # `merger run` subprocesses
def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny_sources, tiny_evals, tmp_path):
    data = dfs_recipe(tiny_sources, tiny_evals, tmp_path / "killed", scales="per_slot")
    data["optimizer"]["max_evaluations"] = 13
    data["validation"] = None
    assert_resume_after_sigkill_equals_an_uninterrupted_run(data, tmp_path, popsize=4, total=13)


@pytest.mark.parametrize("start", ["anchor", "center"])
@pytest.mark.slow  # a search
def test_the_anchor_start_is_scored_first_and_never_beaten_by_a_worse_path(start, tiny_sources, tiny_evals, tmp_path):
    """`start: anchor` scores the anchor's own path as generation -1, paid from the budget, so the winner
    scores at least as well as the model the search started from; `start: center` has no such candidate."""
    data = dfs_recipe(tiny_sources, tiny_evals, tmp_path / "run", start=start, fix_ends=True)
    data["validation"] = None
    result, evaluated = run_in_process(data, tmp_path / "run")
    with open_run(parse_recipe(data), tmp_path / "run") as run:
        warm, space = run.ledger.evaluations(-1), run.space
    if start == "center":
        assert warm == [] and len(evaluated) == 8
        return
    assert len(evaluated) == 9 and len(warm) == 1
    path = space.decode(np.asarray(warm[0].genotype))
    assert steps(path) == [("base", layer) for layer in range(4)]
    assert result.best.score >= warm[0].score


@pytest.mark.slow  # a search
def test_paths_whose_activations_overflow_fail_and_the_run_goes_on(tiny_sources, tiny_evals, tmp_path):
    """specialist2's layer 1 has a huge (finite) norm weight: any path through it overflows."""
    key = "model.layers.1.post_attention_layernorm.weight"
    huge = with_tensor_filled(tiny_sources["specialist2"], tmp_path / "huge", key, 3e38)
    sources = {**tiny_sources, "specialist2": huge}
    data = dfs_recipe(sources, tiny_evals, tmp_path / "run", start="center", max_layers=12)
    data["optimizer"] = {"popsize": 6, "max_evaluations": 12, "sigma0": 0.3, "seed": 3}
    data["validation"] = None
    result, evaluated = run_in_process(data, tmp_path / "run")
    assert len(evaluated) == 12
    with open_run(parse_recipe(data), tmp_path / "run") as run:
        records, genome = run.ledger.evaluations(), run.space
    through_huge = [
        any(
            (layer.source, layer.layer) == ("specialist2", 1)
            for layer in genome.decode(np.asarray(r.genotype))
        )
        for r in records
    ]
    assert any(through_huge) and not all(through_huge)
    for record, overflows in zip(records, through_huge, strict=True):
        assert record.failed == overflows
        if overflows:
            assert (
                "activations overflow" in record.failure and record.objective == 1.0 and record.score == 0.0
            )
    assert not result.best.failed


def test_the_report_plots_a_layer_path_by_position_and_source(tiny_sources, tiny_evals, tmp_path):
    from merger.report.plots import plot_genes

    data = dfs_recipe(tiny_sources, tiny_evals, tmp_path, scales="per_slot", fix_ends=True)
    recipe = parse_recipe(data)
    genome = genome_of(data, tiny_sources)
    x = np.random.default_rng(0).random(genome.dimension)
    genes = genome.table(x)
    figure = plot_genes(genes, recipe, tmp_path / "genes.png")
    assert (tmp_path / "genes.png").read_bytes().startswith(b"\x89PNG")
    axes, colorbar = figure.axes
    assert [label.get_text() for label in axes.get_yticklabels()] == recipe.source_names
    assert axes.get_xlabel().startswith("position in the path") and axes.get_ylabel() == "source of the layer"
    assert [text.get_text() for text in axes.texts] == [str(gene["layer"]) for gene in genes]
    rows = axes.collections[0].get_offsets()
    assert [recipe.source_names[int(row)] for _, row in rows] == [gene["source"] for gene in genes]
    assert colorbar.get_ylabel() == "scale on o_proj and down_proj"
    assert f"{len(genes)} layers" in axes.get_title()


@pytest.mark.parametrize(
    ("strategy", "settings"),
    [
        ("racing", {"racing": {"block": 2, "bound": "hoeffding", "delta": 0.9}}),
        ("anchors", {"anchors": {"count": 4}}),
    ],
)
@pytest.mark.slow  # a search per strategy
def test_item_strategies_search_a_layer_path(strategy, settings, tiny_sources, tiny_evals, tmp_path):
    """Racing and anchors take a layer-path genome as they take a parameter one: the start path and
    the winner are scored on every fitness item; anchors spend fewer item-evaluations than `full`
    (whether a race cuts depends on how far apart the tiny models' scores fall)."""
    data = dfs_recipe(tiny_sources, tiny_evals, tmp_path / "run", fix_ends=True)
    data["validation"] = None
    data["fitness"].update({"strategy": strategy, **settings})
    result, evaluated = run_in_process(data, tmp_path / "run")
    ledger = Ledger(tmp_path / "run")

    def items_scored(candidate: str) -> int:
        return sum(len(docs) for docs in ledger.item_outcomes(candidate)[candidate].values())

    assert items_scored("-1/0") == 12 and len(evaluated) == 9
    assert items_scored(result.best.candidate) == 12
    spent, full = ledger.items_spent()["candidates"], 12 * len(evaluated)
    assert spent < full if strategy == "anchors" else spent <= full
