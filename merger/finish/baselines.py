"""Untuned standard merges of a run's sources, scored next to the winner (`baselines:` in the recipe).

Each baseline is a plain mergekit MergeConfiguration dict, its parameters taken from the method's
own spec in mergekit's registry:
- `defaults`: the searched method with mergekit's defaults; a required weight is 1/n over the inputs
  it applies to, a required slerp `t` is 0.5, and `density` is 0.5 (mergekit's default of 1.0 would
  drop nothing, which is not the method as its papers and mergekit's examples run it);
- `linear`: the uniform average of every source;
- `model_stock` and `karcher`: their mergekit defaults, where their input contract fits the sources.
A baseline that does not apply (no base model, too few sources, the same merge as another) is
skipped with its reason, which the summary keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from mergekit.merge_methods import BasePolicy, ParameterScope
from mergekit.merge_methods import get as get_method

from merger.recipe import BaselineName, Recipe

BASELINE_NAMES: tuple[str, ...] = get_args(BaselineName)
UNTUNED_VALUES = {"density": 0.5}  # overrides a mergekit default that turns the method's own step off
REQUIRED_VALUES = {"t": 0.5}  # required parameters with no mergekit default, other than weights


@dataclass(frozen=True)
class BaselinePlan:
    configs: dict[str, dict[str, Any]]  # name: mergekit MergeConfiguration dict
    skipped: dict[str, str]  # name: why it does not apply


class NotApplicable(Exception):
    pass


def _numeric(value_type: Any) -> bool:
    return value_type in (float, int)


def _value(name: str, required: bool, inputs: int, sparsifies: bool) -> Any:
    """The untuned value of one numeric parameter, or None to leave mergekit's default."""
    if name in UNTUNED_VALUES and sparsifies:
        return UNTUNED_VALUES[name]
    if not required:
        return None
    if name == "weight":
        return round(1.0 / inputs, 12)
    if name in REQUIRED_VALUES:
        return REQUIRED_VALUES[name]
    raise NotApplicable(f"{name} has no default in mergekit")


def untuned_config(method: str, recipe: Recipe, source_paths: dict[str, Path]) -> dict[str, Any]:
    """One method's mergekit config over the recipe's sources, every parameter untuned."""
    merge_method = get_method(method)
    spec = merge_method.spec
    # task_arithmetic has a density that it never uses (no sparsification): leave it alone there
    sparsifies = getattr(merge_method, "sparsification_method", True) is not None
    contract = spec.contract
    base_name = recipe.base_model
    uses_base = contract.base in (BasePolicy.REQUIRED, BasePolicy.OPTIONAL) and base_name is not None
    if contract.base == BasePolicy.REQUIRED and base_name is None:
        raise NotApplicable("it needs a base model (base_model)")
    others = [name for name in recipe.source_names if not (uses_base and name == base_name)]
    inputs = len(others) + (1 if uses_base else 0)
    if inputs < (contract.min_inputs or 1) or (
        contract.max_inputs is not None and inputs > contract.max_inputs
    ):
        bounds = f"{contract.min_inputs}" + (f"-{contract.max_inputs}" if contract.max_inputs else " or more")
        raise NotApplicable(f"it merges {bounds} models, the recipe has {inputs}")
    per_model: dict[str, Any] = {}
    shared: dict[str, Any] = {}
    for parameter in spec.parameters:
        if not _numeric(parameter.value_type):
            continue  # switches (normalize, rescale, ...) keep mergekit's defaults
        count = {ParameterScope.INPUT: inputs, ParameterScope.NON_BASE: len(others)}.get(parameter.scope, 1)
        value = _value(parameter.name, parameter.required, count, sparsifies)
        if value is not None:
            (shared if parameter.scope == ParameterScope.SHARED else per_model)[parameter.name] = value
    models = [
        {"model": str(source_paths[name]), **({"parameters": dict(per_model)} if per_model else {})}
        for name in others
    ]
    if uses_base and any(p.scope == ParameterScope.INPUT for p in spec.parameters):
        models.insert(0, {"model": str(source_paths[base_name]), "parameters": dict(per_model)})
    config: dict[str, Any] = {"merge_method": method, "models": models, "dtype": recipe.engine.dtype}
    if uses_base:
        config["base_model"] = str(source_paths[base_name])
    if shared:
        config["parameters"] = shared
    if recipe.tokenizer_source:
        config["tokenizer_source"] = str(source_paths[recipe.tokenizer_source])
    return config


def plan_baselines(recipe: Recipe, source_paths: dict[str, Path]) -> BaselinePlan:
    """The recipe's `baselines:` as mergekit configs, in the order given; a repeat of one is skipped."""
    configs: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in recipe.baselines:
        method = recipe.genome.method if name == "defaults" else name
        try:
            config = untuned_config(method, recipe, source_paths)
        except NotApplicable as reason:
            skipped[name] = f"{method} does not apply: {reason}"
            continue
        same = next((other for other, known in configs.items() if known == config), None)
        if same is not None:
            skipped[name] = f"the same merge as {same}"
            continue
        configs[name] = config
    return BaselinePlan(configs, skipped)
