"""The resident engine against mergekit: exact for deterministic methods, statistical for DARE / DELLA."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mergekit import merge_methods
from mergekit.config import MergeConfiguration
from safetensors.torch import load_file

from merger.common.errors import MergerError
from merger.engine.factory import build_engine
from merger.engine.kernels import (
    RANDOM_LEVELS,
    RANK_LEVELS,
    della_level_counts,
    della_terms,
    make_task_arithmetic,
    pack_bytes,
)
from merger.engine.methods import RESIDENT_METHODS, TaskArithmetic
from merger.engine.plan import MergePlan, resolve_plan
from merger.engine.reference import MergekitEngine, merge_in_memory
from merger.engine.resident import ResidentEngine
from merger.engine.sparsify import SPARSIFIERS, DellaMagprune
from merger.recipe.methods import METHODS

BY_CLASS = [{"filter": "self_attn", "value": 0.35}, {"filter": "mlp", "value": 0.8}, {"value": 0.55}]
FP32 = {"rtol": 1e-5, "atol": 1e-6}

# per method: per-source parameters for specialist1, specialist2, and shared parameters
DETERMINISTIC: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "linear": ({"weight": 0.7}, {"weight": BY_CLASS}, {}),
    "task_arithmetic": ({"weight": [0.2, 0.9]}, {"weight": BY_CLASS}, {"lambda": 0.8}),
    "ties": ({"weight": 0.6, "density": BY_CLASS}, {"weight": [0.9, 0.3], "density": 0.45}, {}),
    "breadcrumbs": ({"weight": 0.6, "density": 0.5, "gamma": 0.05}, {"weight": 0.4, "density": BY_CLASS}, {}),
    "breadcrumbs_ties": (
        {"weight": BY_CLASS, "density": 0.7, "gamma": 0.02},
        {"weight": 0.5, "density": [0.3, 0.9], "gamma": 0.1},
        {"normalize": True},
    ),
    "slerp": ({}, {}, {"t": BY_CLASS}),
    # random methods at density 1 are deterministic in mergekit too
    "dare_ties": ({"weight": 0.6, "density": 1.0}, {"weight": BY_CLASS, "density": 1.0}, {}),
    "della": ({"weight": 0.6, "density": 1.0, "epsilon": 0.1}, {"weight": 0.3, "density": 1.0}, {}),
}


def _config(
    method: str,
    paths: dict[str, Path],
    per_source: tuple[dict[str, Any], dict[str, Any]],
    shared: dict[str, Any],
    form: str = "models",
    dtype: str = "float32",
) -> MergeConfiguration:
    specialists = ["specialist1"] if method == "slerp" else ["specialist1", "specialist2"]
    entries = [(name, params) for name, params in zip(specialists, per_source, strict=False)]
    base_parameters = {"weight": 0.25} if method == "linear" else None
    raw: dict[str, Any] = {"merge_method": method, "base_model": str(paths["base"]), "dtype": dtype}
    if shared:
        raw["parameters"] = shared
    if form == "models":
        raw["models"] = [{"model": str(paths["base"]), "parameters": base_parameters}] + [
            {"model": str(paths[name]), "parameters": params} for name, params in entries
        ]
    else:  # one slice per half of the layers, with different parameters in each
        slices = []
        for start, end, scale in ((0, 2, 1.0), (2, 4, 0.5)):
            sources = [
                {"model": str(paths["base"]), "layer_range": [start, end], "parameters": base_parameters}
            ]
            for name, params in entries:
                scaled = {
                    k: (v * scale if k == "weight" and isinstance(v, float) else v) for k, v in params.items()
                }
                sources.append({"model": str(paths[name]), "layer_range": [start, end], "parameters": scaled})
            slices.append({"sources": sources})
        raw["slices"] = slices
    return MergeConfiguration.model_validate(raw)


def _plan(engine: ResidentEngine, config: MergeConfiguration, paths: dict[str, Path]) -> MergePlan:
    names = {str(path): name for name, path in paths.items()}
    return resolve_plan(config, engine.tensor_names, names, engine.num_layers)


def _weights(engine: ResidentEngine) -> dict[str, torch.Tensor]:
    parameters = dict(engine.model.named_parameters())
    return {name: parameters[name].detach().clone() for name in engine.tensor_names}


def _assert_matches(engine: ResidentEngine, reference: dict[str, torch.Tensor], **tolerance: float) -> None:
    merged = _weights(engine)
    assert set(reference) == set(merged)
    for name, expected in reference.items():
        torch.testing.assert_close(merged[name], expected.to(merged[name].dtype), **tolerance, msg=name)


@pytest.fixture(scope="module")
def paths(tiny_sources: dict[str, Path]) -> dict[str, Path]:
    return {name: tiny_sources[name] for name in ("base", "specialist1", "specialist2")}


def _engine(paths: dict[str, Path], method: str, **options: Any) -> ResidentEngine:
    sources = {name: path for name, path in paths.items() if method != "slerp" or name != "specialist2"}
    return ResidentEngine(sources, "base", method, **options)


@pytest.mark.parametrize("form", ["models", "slices"])
@pytest.mark.parametrize("method", list(DETERMINISTIC))
def test_deterministic_methods_equal_mergekit(paths: dict[str, Path], method: str, form: str) -> None:
    first, second, shared = DETERMINISTIC[method]
    config = _config(method, paths, (first, second), shared, form)
    engine = _engine(paths, method)
    engine.apply(_plan(engine, config, paths))
    _assert_matches(engine, merge_in_memory(config, seed=0), **FP32)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_rescaled_magnitude_pruning_equals_mergekit(paths: dict[str, Path], method: str) -> None:
    first, second, _ = DETERMINISTIC[method]
    config = _config(method, paths, (first, second), {"rescale": True, "lambda": 1.3})
    engine = _engine(paths, method)
    engine.apply(_plan(engine, config, paths))
    _assert_matches(engine, merge_in_memory(config, seed=0), **FP32)


def test_slices_with_a_source_missing_from_one_slice(paths: dict[str, Path]) -> None:
    base, one, two = (str(paths[name]) for name in ("base", "specialist1", "specialist2"))
    config = MergeConfiguration.model_validate(
        {
            "merge_method": "ties",
            "base_model": base,
            "dtype": "float32",
            "slices": [
                {
                    "sources": [
                        {"model": base, "layer_range": [0, 3]},
                        {"model": one, "layer_range": [0, 3], "parameters": {"weight": 0.7, "density": 0.5}},
                        {"model": two, "layer_range": [0, 3], "parameters": {"weight": 0.4, "density": 0.6}},
                    ]
                },
                {
                    "sources": [
                        {"model": base, "layer_range": [3, 4]},
                        {"model": two, "layer_range": [3, 4], "parameters": {"weight": 0.9, "density": 0.3}},
                    ]
                },
            ],
        }
    )
    engine = _engine(paths, "ties")
    engine.apply(_plan(engine, config, paths))
    _assert_matches(engine, merge_in_memory(config, seed=0), **FP32)


def test_bfloat16_engine_within_bfloat16_tolerance(paths: dict[str, Path]) -> None:
    for method in ("linear", "task_arithmetic", "slerp"):
        first, second, shared = DETERMINISTIC[method]
        config = _config(method, paths, (first, second), shared, dtype="bfloat16")
        engine = _engine(paths, method, dtype=torch.bfloat16)
        engine.apply(_plan(engine, config, paths))
        _assert_matches(engine, merge_in_memory(config, seed=0), rtol=2e-2, atol=2e-3)


def test_second_apply_does_not_depend_on_the_first(paths: dict[str, Path]) -> None:
    engine = _engine(paths, "ties")
    first = _config("ties", paths, ({"weight": 0.9, "density": 0.2}, {"weight": 0.1, "density": 0.9}), {})
    second = _config("ties", paths, DETERMINISTIC["ties"][:2], {"lambda": 0.5}, form="slices")
    engine.apply(_plan(engine, first, paths))
    after_first = _weights(engine)
    engine.apply(_plan(engine, second, paths))
    _assert_matches(engine, merge_in_memory(second, seed=0), **FP32)
    engine.apply(_plan(engine, first, paths))
    _assert_matches(engine, after_first, rtol=0, atol=0)


def test_load_source_writes_exactly_the_source(paths: dict[str, Path]) -> None:
    for streaming in (False, True):
        engine = _engine(paths, "dare_ties", streaming=streaming)
        for name, path in paths.items():
            engine.load_source(name)
            _assert_matches(engine, load_file(path / "model.safetensors"), rtol=0, atol=0)


def test_streaming_equals_resident(paths: dict[str, Path]) -> None:
    for method, per_source in (
        ("ties", ({"weight": 0.6, "density": 0.3}, {"weight": 0.5, "density": BY_CLASS})),
        ("dare_ties", ({"weight": 0.6, "density": 0.3}, {"weight": 0.5, "density": BY_CLASS})),
        ("della", ({"weight": 0.6, "density": 0.4, "epsilon": 0.2}, {"weight": 0.5, "density": 0.6})),
    ):
        config = _config(method, paths, per_source, {})
        resident = _engine(paths, method, seed=3)
        streaming = _engine(paths, method, seed=3, streaming=True)
        resident.apply(_plan(resident, config, paths))
        streaming.apply(_plan(streaming, config, paths))
        _assert_matches(streaming, _weights(resident), **FP32)
        assert streaming.resident_bytes()["source:specialist1"] == 0
        assert resident.resident_bytes()["source:specialist1"] > 0


def test_resident_bytes_names_each_structure(paths: dict[str, Path]) -> None:
    sizes = _engine(paths, "dare_ties").resident_bytes()
    names = _engine(paths, "linear").tensor_names
    parameters = sum(load_file(paths["base"] / "model.safetensors")[n].numel() for n in names)
    assert sizes["model"] == sizes["source:base"] == sizes["source:specialist1"] == parameters * 4
    # up to four sources' 8-bit random levels share one 32-bit word per element
    assert sizes["random_fields"] == 4 * parameters
    assert sizes["dare_tables"] == 2 * len(names) * 257 * 4 and sizes["random_keys"] > 0
    assert sizes["total"] == sum(value for key, value in sizes.items() if key != "total")
    assert "magnitude_order" in _engine(paths, "ties").resident_bytes()
    della = _engine(paths, "della").resident_bytes()
    assert della["random_fields"] == 4 * parameters  # a random level and a rank level per source
    assert della["della_tables"] == 2 * len(names) * 256 * 257 * 4 and "della_ranks" not in della
    # fresh draws hash their levels inside the kernels: only the rank levels are stored per element
    fresh = _engine(paths, "della", fresh_randomness=True).resident_bytes()
    assert "random_fields" not in fresh and "della_tables" not in fresh
    assert fresh["della_ranks"] == 2 * parameters  # uint8


# ---- random methods: density, rescaling and expectation ------------------------------------------


@pytest.mark.parametrize(
    ("density", "epsilon"), [(0.5, 0.3), (0.1, 0.05), (0.9, 0.0999), (0.4, -0.2), (0.3, 0.0), (0.37, 0.11)]
)
def test_della_kept_l1_lookup_follows_the_kernel(density: float, epsilon: float) -> None:
    """Every (rank level, random level) cell through the DELLA kernel: the keep decisions are exactly the
    counts the kept-l1 lookup uses, and each rank level's keep probability is mergekit's, quantized."""
    cells = torch.arange(RANK_LEVELS * RANDOM_LEVELS).reshape(1, 1, -1)
    words = pack_bytes(torch.cat([cells % RANDOM_LEVELS, cells // RANDOM_LEVELS]))  # level, rank level
    floor, slope = (
        torch.tensor(value, dtype=torch.int32).reshape(1, 1, 1)
        for value in della_terms(np.array(density), np.array(epsilon))
    )
    ones, out = torch.ones_like(words), torch.empty(1, words.numel())
    one = torch.ones(1, 1, 1)
    make_task_arithmetic(DellaMagprune.keep, False)(
        out, torch.zeros(1, words.numel()), ones, one, one, one[0], one[0], words, floor, slope
    )
    kept = out.reshape(RANK_LEVELS, RANDOM_LEVELS) != 0
    counts = della_level_counts(floor, slope).reshape(RANK_LEVELS)
    assert torch.equal(kept, torch.arange(RANDOM_LEVELS) < counts.unsqueeze(-1))  # a prefix of the levels
    exact = density - epsilon + 2 * epsilon * torch.arange(RANK_LEVELS, dtype=torch.float64) / 255
    # half a random level, plus floor and slope rounded to 2**-24: (0.5 + 255 * 0.5) * 2**-24 < 1e-5
    assert (counts / RANDOM_LEVELS - exact).abs().max() <= 0.5 / RANDOM_LEVELS + 1e-5


def _deltas(engine: ResidentEngine, paths: dict[str, Path], source: str) -> torch.Tensor:
    base, other = (load_file(paths[name] / "model.safetensors") for name in ("base", source))
    return torch.cat([(other[n] - base[n]).reshape(-1) for n in engine.tensor_names])


@functools.cache
def _base_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _merged_delta(engine: ResidentEngine, paths: dict[str, Path]) -> torch.Tensor:
    base = _base_weights(paths["base"])
    merged = _weights(engine)
    return torch.cat([(merged[n] - base[n]).reshape(-1) for n in engine.tensor_names])


def _single_source_config(
    method: str, paths: dict[str, Path], params: dict[str, Any], rescale: bool
) -> MergeConfiguration:
    return MergeConfiguration.model_validate(
        {
            "merge_method": method,
            "base_model": str(paths["base"]),
            "dtype": "float32",
            "parameters": {"rescale": rescale},
            "models": [
                {"model": str(paths["base"])},
                {"model": str(paths["specialist1"]), "parameters": params},
            ],
        }
    )


def _kept_fraction_bound(fraction: float, density: float, count: int) -> bool:
    """Within 5 binomial standard deviations of the density."""
    return abs(fraction - density) < 5 * np.sqrt(density * (1 - density) / count)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_density_and_l1_rescale_match_mergekit(paths: dict[str, Path], method: str) -> None:
    params = {"weight": 1.0, "density": 0.3} | ({"epsilon": 0.15} if method == "della_linear" else {})
    config = _single_source_config(method, paths, params, rescale=True)
    engine = ResidentEngine({k: paths[k] for k in ("base", "specialist1")}, "base", method, seed=1)
    delta = _deltas(engine, paths, "specialist1")
    engine.apply(_plan(engine, config, paths))
    ours = _merged_delta(engine, paths)
    base = load_file(paths["base"] / "model.safetensors")
    merged_reference = merge_in_memory(config, seed=1)
    reference = torch.cat([(merged_reference[n] - base[n]).reshape(-1) for n in engine.tensor_names])
    for merged in (ours, reference):
        kept = merged != 0
        assert _kept_fraction_bound(kept.float().mean().item(), 0.3, kept.numel())
    # l1 rescale: every tensor keeps its task vector's l1 norm, kept elements scaled by one factor
    offset = 0
    for name in engine.tensor_names:
        size = dict(engine.model.named_parameters())[name].numel()
        part, original = ours[offset : offset + size], delta[offset : offset + size]
        offset += size
        torch.testing.assert_close(part.abs().sum(), original.abs().sum(), rtol=1e-4, atol=1e-7)
        kept = part != 0
        factor = original.abs().sum() / original[kept].abs().sum()
        torch.testing.assert_close(part[kept], original[kept] * factor, rtol=1e-4, atol=1e-6)


def test_dare_expectation_over_fresh_draws(paths: dict[str, Path]) -> None:
    """Without rescaling, E[merged delta] = weight * density * delta; z-scores of the mean are ~N(0, 1)."""
    draws, density, weight = 120, 0.3, 0.8
    config = _single_source_config(
        "dare_linear", paths, {"weight": weight, "density": density}, rescale=False
    )
    engine = ResidentEngine(
        {k: paths[k] for k in ("base", "specialist1")}, "base", "dare_linear", fresh_randomness=True
    )
    delta = _deltas(engine, paths, "specialist1").double()
    plan = _plan(engine, config, paths)
    total = torch.zeros_like(delta)
    for draw in range(1, draws + 1):  # a fresh draw each (keyed as a genotype's `draw_key` would be)
        engine.apply(plan, draw=draw)
        merged = _merged_delta(engine, paths).double()
        total += merged
    kept = merged != 0
    torch.testing.assert_close(merged[kept], weight * delta[kept], rtol=1e-5, atol=1e-6)
    usable = delta.abs() > 1e-6
    spread = (weight * delta.abs() * np.sqrt(density * (1 - density) / draws))[usable]
    z = (total / draws - weight * density * delta)[usable] / spread
    assert abs(z.mean().item()) < 0.05
    assert 0.9 < (z**2).mean().item() < 1.1


def test_della_keep_probability_follows_magnitude_rank(paths: dict[str, Path]) -> None:
    """A row's smallest magnitude is kept with probability density - epsilon, its largest density + epsilon."""
    draws, density, epsilon = 150, 0.5, 0.3
    config = _single_source_config(
        "della_linear", paths, {"weight": 1.0, "density": density, "epsilon": epsilon}, rescale=False
    )
    engine = ResidentEngine(
        {k: paths[k] for k in ("base", "specialist1")}, "base", "della_linear", fresh_randomness=True
    )
    name = "model.layers.1.mlp.down_proj.weight"
    base = load_file(paths["base"] / "model.safetensors")[name]
    delta = load_file(paths["specialist1"] / "model.safetensors")[name] - base
    plan = _plan(engine, config, paths)
    kept = torch.zeros_like(delta)
    for draw in range(1, draws + 1):  # a fresh draw each (keyed as a genotype's `draw_key` would be)
        engine.apply(plan, draw=draw)
        kept += (dict(engine.model.named_parameters())[name] != base).float()
    order = delta.abs().argsort(dim=1)
    rows = torch.arange(delta.shape[0])
    smallest, largest = kept[rows, order[:, 0]] / draws, kept[rows, order[:, -1]] / draws
    count = delta.shape[0] * draws
    assert _kept_fraction_bound(smallest.mean().item(), density - epsilon, count)
    assert _kept_fraction_bound(largest.mean().item(), density + epsilon, count)
    assert _kept_fraction_bound((kept / draws).mean().item(), density, delta.numel() * draws)


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_consensus_random_methods_match_mergekit_in_expectation(paths: dict[str, Path], method: str) -> None:
    """Mean merged weights: engine (fresh draws) vs mergekit (seeds), a two-sample z-test per element.

    Under equal distributions the pooled-variance z-scores are ~N(0, 1): their mean ~0, mean square ~1.
    """
    ours_draws, mergekit_draws = 64, 8
    extra = {"epsilon": 0.1} if method == "della" else {}
    config = _config(
        method, paths, ({"weight": 0.7, "density": 0.4} | extra, {"weight": 0.5, "density": 0.6} | extra), {}
    )
    engine = _engine(paths, method, fresh_randomness=True)
    plan = _plan(engine, config, paths)
    ours, theirs = [], []
    for draw in range(1, ours_draws + 1):
        engine.apply(plan, draw=draw)
        ours.append(torch.cat([t.reshape(-1) for t in _weights(engine).values()]))
    for seed in range(mergekit_draws):
        merged = merge_in_memory(config, seed=seed)
        theirs.append(torch.cat([merged[n].reshape(-1) for n in engine.tensor_names]))
    ours_t, theirs_t = torch.stack(ours).double(), torch.stack(theirs).double()
    pooled = (ours_t.var(dim=0) * (ours_draws - 1) + theirs_t.var(dim=0) * (mergekit_draws - 1)) / (
        ours_draws + mergekit_draws - 2
    )
    spread = (pooled * (1 / ours_draws + 1 / mergekit_draws)).sqrt()
    usable = spread > 1e-7
    z = (ours_t.mean(dim=0) - theirs_t.mean(dim=0))[usable] / spread[usable]
    assert abs(z.mean().item()) < 0.05
    assert 0.85 < (z**2).mean().item() < 1.2


def test_common_random_numbers_per_seed(paths: dict[str, Path]) -> None:
    config = _config(
        "dare_ties", paths, ({"weight": 0.7, "density": 0.4}, {"weight": 0.5, "density": 0.6}), {}
    )
    outputs = []
    for seed in (0, 0, 1):
        engine = _engine(paths, "dare_ties", seed=seed)
        engine.apply(_plan(engine, config, paths))
        outputs.append(_merged_delta(engine, paths))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])


# ---- bad input and extreme values -----------------------------------------------------------------


def test_della_rejects_epsilon_outside_density(paths: dict[str, Path]) -> None:
    config = _config("della", paths, ({"weight": 0.5, "density": 0.1, "epsilon": 0.2}, {"weight": 0.5}), {})
    engine = _engine(paths, "della")
    with pytest.raises(MergerError, match="epsilon"):
        engine.apply(_plan(engine, config, paths))


def test_plan_for_another_method_is_refused(paths: dict[str, Path]) -> None:
    engine = _engine(paths, "ties")
    config = _config("task_arithmetic", paths, ({"weight": 0.5}, {"weight": 0.5}), {})
    with pytest.raises(MergerError, match="task_arithmetic"):
        engine.apply(_plan(engine, config, paths))


# With weights of +/-1e38 (and lambda 1e30) these overflow float32; ties and della stay finite: the -1e38
# source is dropped at density 0 and their sign-consensus normalization divides by the kept weight.
OVERFLOWING = {"dare_ties", "breadcrumbs_ties", "task_arithmetic", "linear"}


@pytest.mark.parametrize(
    "method", ["ties", "dare_ties", "della", "breadcrumbs_ties", "task_arithmetic", "linear"]
)
def test_extreme_values_are_finite_exactly_where_mergekit_is(paths: dict[str, Path], method: str) -> None:
    """Extreme values are no error: the engine writes the candidate, finite exactly where mergekit's merge is
    (and equal there), so the worker's NaN/inf check refuses the candidates whose export would hold NaN/inf,
    and only those."""
    extra = {"epsilon": 0.0} if method == "della" else {}
    per_source = ({"weight": 1e38, "density": 1.0} | extra, {"weight": -1e38, "density": 0.0} | extra)
    if method in ("task_arithmetic", "linear"):
        per_source = ({"weight": 1e38}, {"weight": -1e38})
    config = _config(method, paths, per_source, {"lambda": 1e30} if method != "linear" else {})
    engine = _engine(paths, method)
    engine.apply(_plan(engine, config, paths))
    merged, reference = _weights(engine), merge_in_memory(config, seed=0)
    for name, expected in reference.items():
        finite = torch.isfinite(merged[name])
        assert torch.equal(finite, torch.isfinite(expected)), name
        torch.testing.assert_close(merged[name][finite], expected[finite].to(merged[name].dtype), **FP32, msg=name)
    overflowed = any(not torch.isfinite(tensor).all() for tensor in merged.values())
    assert overflowed == (method in OVERFLOWING)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_compiled_kernels_equal_eager(paths: dict[str, Path], method: str) -> None:
    """The fused (torch.compile) kernels compute what the eager ones do (the same keep decisions too)."""
    extra = {"epsilon": 0.2} if method == "della" else {}
    config = _config(
        method, paths, ({"weight": 0.6, "density": 0.3} | extra, {"weight": 0.5, "density": BY_CLASS}), {}
    )
    eager, compiled = _engine(paths, method), _engine(paths, method, compile_kernels=True)
    for engine in (eager, compiled):
        engine.apply(_plan(engine, config, paths))
    _assert_matches(compiled, _weights(eager), **FP32)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "options"), [("ties", {}), ("della", {"fresh_randomness": True})])
def test_compiled_bfloat16_kernels_equal_eager(paths: dict[str, Path], method: str, options: dict) -> None:
    """Compiled bfloat16 kernels round after every op like eager torch (and mergekit): the same elements
    pass the TIES threshold and the same kept l1 rescales DELLA, so the merged bits are identical."""
    extra = {"epsilon": 0.15} if method == "della" else {}
    config = _config(
        method,
        paths,
        ({"weight": 0.6, "density": 0.3} | extra, {"weight": 0.5, "density": BY_CLASS} | extra),
        {"rescale": True},
        dtype="bfloat16",
    )
    eager = _engine(paths, method, dtype=torch.bfloat16, **options)
    compiled = _engine(paths, method, dtype=torch.bfloat16, compile_kernels=True, **options)
    for engine in (eager, compiled):
        engine.apply(_plan(engine, config, paths))
    _assert_matches(compiled, _weights(eager), rtol=0, atol=0)


# ---- every registered method, in memory, against the mergekit-yaml command ---------------------------

SPREADS = {"epsilon", "gamma"}  # DELLA / breadcrumbs spreads: kept small so density +/- spread stays in (0, 1)


def _registry_inputs(method: str, paths: dict[str, Path]) -> tuple[dict[str, Path], str | None]:
    """As many of base, specialist1, specialist2 as the method's input contract allows, most first."""
    info = METHODS[method]
    for names in (("base", "specialist1", "specialist2"), ("base", "specialist1"), ("specialist1",)):
        base = "base" if "base" in names and info.takes_base else None
        if info.source_count_problem(len(names), base is not None) is None:
            return {name: paths[name] for name in names}, base
    raise AssertionError(f"no source set fits {method}")


def _registry_config(method: str, paths: dict[str, Path], dense: bool = False) -> MergeConfiguration:
    """A config giving every searchable parameter a value off its default, different per source (and per
    tensor class for the first source); `dense` sets density 1 (random methods are then deterministic)."""
    info = METHODS[method]
    sources, base = _registry_inputs(method, paths)
    carriers = info.sources_with_values(list(sources), base)

    def value(name: str, fraction: float) -> float:
        low, high = info.parameters[name].search_range
        if name == "density" and dense:
            return 1.0
        return round(low + (0.2 if name in SPREADS else fraction) * (high - low), 6)

    models = []
    for name, path in sources.items():
        entry: dict[str, Any] = {"model": str(path)}
        if name in carriers:
            index = carriers.index(name)
            parameters: dict[str, Any] = {
                p: value(p, 0.6 + 0.1 * index) for p in info.source_parameters if p in info.searchable
            }
            if index == 0 and "weight" in parameters:
                parameters["weight"] = [{"filter": "self_attn", "value": 0.3}, {"value": parameters["weight"]}]
            entry["parameters"] = parameters or None
        models.append(entry)
    raw: dict[str, Any] = {"merge_method": method, "models": models, "dtype": "float32"}
    shared = {p: value(p, 0.6) for p in info.shared_parameters if p in info.searchable}
    if shared:
        raw["parameters"] = shared
    if base is not None:
        raw["base_model"] = str(paths[base])
    return MergeConfiguration.model_validate(raw)


@functools.cache
def _mergekit_yaml(config_yaml: str, scratch: Path) -> dict[str, torch.Tensor]:
    """The weights the `mergekit-yaml` command writes for a config (seed 0)."""
    digest = hashlib.sha256(config_yaml.encode()).hexdigest()[:16]
    config_file, out = scratch / f"{digest}.yaml", scratch / digest
    config_file.write_text(config_yaml)
    subprocess.run(
        ["mergekit-yaml", str(config_file), str(out), "--random-seed", "0", "--quiet"],
        check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def yaml_scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mergekit_yaml")


def _engine_weights(engine: Any, names: list[str]) -> dict[str, torch.Tensor]:
    parameters = dict(engine.model.named_parameters())
    return {name: parameters[name].detach().clone() for name in names}


def _assert_engine_equals_mergekit_yaml(
    method: str, kind: str, config: MergeConfiguration, paths: dict[str, Path], scratch: Path
) -> None:
    sources, base = _registry_inputs(method, paths)
    engine = build_engine(sources, base, method, kind=kind, seed=0)
    engine.apply_config(config)
    expected = _mergekit_yaml(config.to_yaml(), scratch)
    merged = _engine_weights(engine, list(expected))
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, **FP32, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_through_mergekit_executor_equals_mergekit_yaml(
    paths: dict[str, Path], yaml_scratch: Path, method: str
) -> None:
    """Random methods too: the in-memory executor draws what the command does with the same seed."""
    config = _registry_config(method, paths)
    _assert_engine_equals_mergekit_yaml(method, "mergekit", config, paths, yaml_scratch)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(RESIDENT_METHODS))
def test_resident_methods_equal_mergekit_yaml(paths: dict[str, Path], yaml_scratch: Path, method: str) -> None:
    random = RESIDENT_METHODS[method].draws_random
    config = _registry_config(method, paths, dense=random)
    _assert_engine_equals_mergekit_yaml(method, "resident", config, paths, yaml_scratch)


def test_kernel_registry_follows_mergekit_methods() -> None:
    """Registered by mergekit's names; each task-arithmetic method carries the sparsifier of mergekit's own
    sparsification method, and its sign consensus."""
    kernels = {"linear", "slerp", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"}
    kernels |= {"dare_linear", "dare_ties", "della", "della_linear"}
    assert kernels <= set(RESIDENT_METHODS) <= set(METHODS)
    for name, method in RESIDENT_METHODS.items():
        mergekit_method = merge_methods.get(name)
        if isinstance(method, TaskArithmetic):
            expected = mergekit_method.sparsification_method
            assert type(method.sparsifier) is (SPARSIFIERS[expected] if expected is not None else type(None))
            assert method.consensus == (mergekit_method.consensus_method is not None)
        assert method.needs_base == METHODS[name].needs_base


def test_build_engine_uses_kernels_where_it_has_them(paths: dict[str, Path]) -> None:
    sources = {name: paths[name] for name in ("base", "specialist1", "specialist2")}
    assert isinstance(build_engine(sources, "base", "ties"), ResidentEngine)
    assert isinstance(build_engine(sources, "base", "ties", kind="mergekit"), MergekitEngine)
    assert isinstance(build_engine(sources, "base", "sce"), MergekitEngine)
