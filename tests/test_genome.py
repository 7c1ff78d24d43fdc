"""The genome: vector <-> values <-> mergekit config, and what mergekit resolves from that config."""

from __future__ import annotations

import numpy as np
import pytest

from merger.common.errors import MergerError
from merger.engine.plan import resolve_plan
from merger.recipe import parse_recipe
from merger.space.parameters import Genome, layer_groups
from tests.recipes import tiny_recipe

TENSORS = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.2.self_attn.o_proj.weight",
    "model.layers.3.mlp.down_proj.weight",
    "model.layers.3.post_attention_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
]


def make_genome(tiny_sources, tiny_evals, tmp_path, **genome_changes) -> Genome:
    data = tiny_recipe(tiny_sources, tiny_evals, tmp_path)
    data["genome"] = {**data["genome"], **genome_changes}
    return Genome(parse_recipe(data), tiny_sources, num_layers=4)


def test_layer_groups_allow_an_uneven_last_group():
    assert layer_groups(4, 2) == [(0, 2), (2, 4)]
    assert layer_groups(5, 2) == [(0, 2), (2, 4), (4, 5)]
    with pytest.raises(MergerError, match="layer_granularity: 5 is larger than the models' 4 layers"):
        layer_groups(4, 5)


def test_encode_decode_round_trip(tiny_sources, tiny_evals, tmp_path):
    genome = make_genome(tiny_sources, tiny_evals, tmp_path)
    # 2 params x 2 merged sources x 3 classes (attention, mlp, default) x 2 groups
    assert genome.dimension == 24
    x = np.random.default_rng(0).uniform(size=genome.dimension)
    values = genome.decode(x)
    assert np.allclose(genome.encode(values), x)
    assert np.allclose(genome.decode(genome.encode(values)), values)
    densities = [v for g, v in zip(genome.genes, values, strict=True) if g.parameter == "density"]
    assert min(densities) >= 0.2 and max(densities) <= 1.0


def test_uneven_last_group_is_reported(tiny_sources, tiny_evals, tmp_path):
    genome = make_genome(tiny_sources, tiny_evals, tmp_path, layer_granularity=3)
    assert genome.groups == [(0, 3), (3, 4)]
    assert "the last group has 1 layers" in genome.describe()


def test_config_resolves_to_each_genes_value(tiny_sources, tiny_evals, tmp_path):
    """What mergekit resolves per tensor is exactly the gene of that tensor's group and class."""
    genome = make_genome(
        tiny_sources, tiny_evals, tmp_path, tensor_classes=["attention", "mlp", "embeddings", "norms"]
    )
    x = np.random.default_rng(1).uniform(size=genome.dimension)
    values = dict(zip([g.label for g in genome.genes], genome.decode(x), strict=True))
    names = {str(path): name for name, path in tiny_sources.items()}
    plan = resolve_plan(genome.to_config(x), TENSORS, names, 4)
    expected_class = {
        "model.embed_tokens.weight": ("embeddings", None),
        "model.layers.0.self_attn.q_proj.weight": ("attention", 0),
        "model.layers.0.mlp.up_proj.weight": ("mlp", 0),
        "model.layers.0.input_layernorm.weight": ("norms", 0),
        "model.layers.2.self_attn.o_proj.weight": ("attention", 1),
        "model.layers.3.mlp.down_proj.weight": ("mlp", 1),
        "model.layers.3.post_attention_layernorm.weight": ("norms", 1),
        "model.norm.weight": ("norms", 1),  # post weights follow the last slice
        "lm_head.weight": ("embeddings", None),
    }
    for tensor, (tensor_class, group) in expected_class.items():
        for source in ("specialist1", "specialist2"):
            for parameter in ("weight", "density"):
                label = f"{parameter}.{source}.{tensor_class}" + (f".g{group}" if group is not None else "")
                resolved = plan.tensors[tensor].per_source[source][parameter]
                assert resolved == pytest.approx(values[label], abs=1e-6), (tensor, label)
        assert plan.tensors[tensor].per_source["base"] == {}


def test_fixed_parameters_and_options_reach_mergekit(tiny_sources, tiny_evals, tmp_path):
    genome = make_genome(
        tiny_sources, tiny_evals, tmp_path,
        parameters={"weight": {"min": 0.0, "max": 1.0}, "density": 0.7},
        options={"normalize": False}, tensor_classes=[],
    )
    assert genome.dimension == 4
    names = {str(path): name for name, path in tiny_sources.items()}
    plan = resolve_plan(genome.to_config(np.full(4, 0.25)), TENSORS, names, 4)
    merge = plan.tensors["model.layers.0.mlp.up_proj.weight"]
    assert merge.per_source["specialist1"] == {"weight": 0.25, "density": 0.7}
    assert merge.shared["normalize"] is False


def test_given_merge_as_starting_point(tiny_sources, tiny_evals, tmp_path):
    data = tiny_recipe(tiny_sources, tiny_evals, tmp_path)
    data["optimizer"]["x0"] = {"weight": {"specialist1": 1.0, "specialist2": 0.5}, "density": 0.6}
    genome = Genome(parse_recipe(data), tiny_sources, num_layers=4)
    for gene, value in zip(genome.genes, genome.decode(genome.initial()), strict=True):
        expected = {"specialist1": 1.0, "specialist2": 0.5}[gene.source] if gene.parameter == "weight" else 0.6
        assert value == pytest.approx(expected)
    data["optimizer"]["x0"] = {"weight": 3.0}
    with pytest.raises(MergerError, match=r"optimizer.x0.weight: 3.0 is outside the searched range"):
        Genome(parse_recipe(data), tiny_sources, num_layers=4).initial()


def test_slerp_searches_a_shared_t(tiny_sources, tiny_evals, tmp_path):
    data = tiny_recipe({k: tiny_sources[k] for k in ("base", "specialist1")}, tiny_evals, tmp_path)
    data["genome"] = {"method": "slerp", "parameters": {"t": {"min": 0, "max": 1}}, "layer_granularity": 2}
    genome = Genome(parse_recipe(data), {k: tiny_sources[k] for k in ("base", "specialist1")}, 4)
    assert [g.label for g in genome.genes] == ["t.shared.default.g0", "t.shared.default.g1"]
    names = {str(path): name for name, path in tiny_sources.items()}
    plan = resolve_plan(genome.to_config(np.array([0.2, 0.9])), TENSORS, names, 4)
    assert plan.tensors["model.layers.0.mlp.up_proj.weight"].shared["t"] == pytest.approx(0.2)
    assert plan.tensors["model.layers.3.mlp.down_proj.weight"].shared["t"] == pytest.approx(0.9)
