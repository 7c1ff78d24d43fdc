"""Every merge method, as mergekit's own registry describes it: the one home of merge-method knowledge.

mergekit (0.1.5) gives each registered method one `MergeMethodSpec`, whatever its kind (batched kernels,
group functions, generalized task arithmetic): its parameters with type, default and scope (shared, one
value per input, one per non-base input) and an `InputContract` (base policy, how many inputs). Recipe
validation, the genome and both engines read that through `METHODS`.

The local knowledge is what mergekit's types do not say (a parameter is a float, not which floats make sense):
- `LIMITS`: the values a parameter can take at all (a density is a fraction, slerp's t a position between
  two models); a recipe is refused only outside them;
- `SEARCH_RANGES`: which numeric parameters are worth searching, and the range suggested by default (docs,
  benchmarks, tests); a recipe's own `{min, max}` may be any range within the limits. A method with no
  parameter in that table is known but not searchable (a baseline such as model_stock or karcher);
- `UNTUNED_VALUES` and `REQUIRED_VALUES`: the untuned merge scored as a baseline (`untuned_config`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit.merge_methods import registered_methods
from mergekit.merge_methods.base import MISSING, BasePolicy, InputContract, MergeMethod, ParameterScope

from merger.common.errors import MergerError

UNBOUNDED = math.inf
# What a value can mean, by parameter name and by (method, name) where a method gives a name another
# meaning; a parameter in neither table takes any number (weight, lambda: negative values subtract).
LIMITS: dict[str, tuple[float, float]] = {
    "density": (0.0, 1.0),  # the fraction of each task vector kept
    "epsilon": (0.0, UNBOUNDED),
    "gamma": (0.0, 1.0),  # breadcrumbs: the fraction of the largest differences dropped
    "t": (0.0, 1.0),  # slerp, nuslerp: where between the two models
    "select_topk": (0.0, 1.0),
    "r": (0.0, UNBOUNDED),
    "alpha": (0.0, UNBOUNDED),
}
# Limits whose lower end is excluded: a density of 0 keeps nothing of a task vector (the merge is the base).
OPEN_BELOW = {"density"}
OPEN_BELOW_FLOOR = 0.01  # the lowest value a range imported from mergekit-evolve searches for them
METHOD_LIMITS: dict[tuple[str, str], tuple[float, float]] = {
    ("nearswap", "t"): (0.0, UNBOUNDED),  # a threshold on |base - other|, not a position
}
# Default search ranges by parameter name, and by (method, name) where a method gives a name another meaning.
SEARCH_RANGES: dict[str, tuple[float, float]] = {
    "weight": (-2.0, 2.0),
    "density": (0.1, 1.0),
    "epsilon": (0.0, 0.5),  # DELLA: spread of the keep probability around density
    "gamma": (0.0, 0.5),
    "t": (0.0, 1.0),
    "lambda": (0.0, 4.0),
    "select_topk": (0.0, 1.0),  # sce: fraction of highest-variance elements kept
    "r": (0.0, 1.0),  # ramplus_tl: strength of the unique-element boost
    "alpha": (0.0, 1.0),  # ramplus_tl: cap of the shared/unique ratio
}
METHOD_SEARCH_RANGES: dict[tuple[str, str], tuple[float, float]] = {
    ("nearswap", "t"): (0.0, 0.01),  # a threshold on |base - other| per element
    ("ram", "epsilon"): (0.0, 0.01),  # |task vector| above which an element counts as changed
    ("ramplus_tl", "epsilon"): (0.0, 0.01),
}
# Numeric settings of a solver, fixed by a recipe at most: multislerp's and karcher's tolerances, karcher's
# iteration count, passthrough's scale. Listed so that a new numeric parameter is a decision, not a default.
NOT_SEARCHED = {"eps", "tol", "max_iter", "scale"}
# An untuned merge (a baseline): values that differ from mergekit's default, because the default turns the
# method's own step off (density 1.0 drops nothing, unlike the method as its papers and mergekit's examples
# run it), and values for required parameters without a default, other than weights (1/n).
UNTUNED_VALUES = {"density": 0.5}
REQUIRED_VALUES = {"t": 0.5}


@dataclass(frozen=True)
class ParameterInfo:
    name: str
    scope: ParameterScope  # shared, one per input (base included), one per non-base input
    kind: str  # "number" (int or float), "switch" (bool) or "other"
    default: Any  # None when required
    required: bool
    search_range: tuple[float, float] | None  # the default range; None: not searched
    limits: tuple[float, float]  # the values it can take (math.inf where unbounded)

    @property
    def per_source(self) -> bool:
        return self.scope != ParameterScope.SHARED

    def outside_limits(self, value: float) -> str | None:
        """Why `value` is not a value this parameter can take, or None."""
        low, high = self.limits
        open_below = self.name in OPEN_BELOW
        if (low < value if open_below else low <= value) and value <= high:
            return None
        lower = "(-inf" if low == -UNBOUNDED else f"({low}" if open_below else f"[{low}"
        upper = f"{high}]" if high < UNBOUNDED else "inf)"
        return f"{value} is outside the values {self.name} can take, {lower}, {upper}"


@dataclass(frozen=True)
class MethodInfo:
    name: str
    pretty_name: str
    parameters: Mapping[str, ParameterInfo]
    contract: InputContract
    sparsifies: bool  # whether a density means anything (task_arithmetic has one that it never uses)

    def _names(self, kind: str, per_source: bool) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters.values() if p.kind == kind and p.per_source == per_source)

    @property
    def source_parameters(self) -> tuple[str, ...]:
        """Numeric parameters with a value per source."""
        return self._names("number", True)

    @property
    def shared_parameters(self) -> tuple[str, ...]:
        """Numeric parameters with one value per tensor."""
        return self._names("number", False)

    @property
    def options(self) -> tuple[str, ...]:
        """The method's switches (shared booleans: normalize, rescale, int8_mask, ...)."""
        return self._names("switch", False)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters.values() if p.required)

    @property
    def searchable(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters.values() if p.search_range is not None)

    @property
    def needs_base(self) -> bool:
        return self.contract.base == BasePolicy.REQUIRED

    @property
    def takes_base(self) -> bool:
        """Whether a base model, when given, plays a role apart from the other inputs."""
        return self.contract.base in (BasePolicy.REQUIRED, BasePolicy.OPTIONAL)

    def sources_with_values(self, names: list[str], base: str | None) -> list[str]:
        """The sources that carry their own per-source values: all but the base for base methods."""
        every_input = any(p.scope == ParameterScope.INPUT for p in self.parameters.values())
        if base is None or every_input or not self.takes_base:
            return list(names)
        return [name for name in names if name != base]

    def source_count_problem(self, count: int, has_base: bool) -> str | None:
        """Why `count` sources (the base among them when `has_base`) do not fit this method, or None."""
        contract = self.contract
        for what, number, low, high in (
            ("models", count, contract.min_inputs, contract.max_inputs),
            ("models besides the base", count - int(has_base), contract.min_non_base, contract.max_non_base),
        ):
            if low is None and high is None:
                continue
            low = low or 0
            if number < low or (high is not None and number > high):
                bound = f"exactly {low}" if low == high else f"at least {low}" if number < low else f"at most {high}"
                return f"{self.name} merges {bound} {what}, got {number}"
        return None


def _kind(value_type: Any) -> str:
    if value_type is bool:
        return "switch"
    if value_type in (int, float):
        return "number"
    return "other"


def _method_info(method: MergeMethod) -> MethodInfo:
    spec = method.spec
    parameters = {}
    for parameter in spec.parameters:
        kind = _kind(parameter.value_type)
        search_range = None
        if kind == "number" and parameter.name not in NOT_SEARCHED:
            search_range = METHOD_SEARCH_RANGES.get((spec.name, parameter.name), SEARCH_RANGES.get(parameter.name))
        parameters[parameter.name] = ParameterInfo(
            name=parameter.name,
            scope=parameter.scope,
            kind=kind,
            default=None if parameter.default is MISSING else parameter.default,
            required=parameter.required,
            search_range=search_range,
            limits=METHOD_LIMITS.get((spec.name, parameter.name), LIMITS.get(parameter.name, (-UNBOUNDED, UNBOUNDED))),
        )
    sparsifies = getattr(method, "sparsification_method", True) is not None
    return MethodInfo(spec.name, spec.pretty_name or spec.name, parameters, spec.contract, sparsifies)


METHODS: dict[str, MethodInfo] = {m.spec.name: _method_info(m) for m in registered_methods()}
SEARCHABLE_METHODS = tuple(name for name, info in METHODS.items() if info.searchable)


class NotApplicable(MergerError):
    """An untuned merge the method cannot make of the given sources; the message says why."""


def method_info(name: str) -> MethodInfo:
    """A registered method's info; one line naming the known methods otherwise."""
    info = METHODS.get(name)
    if info is None:
        raise MergerError(f"unknown merge method {name!r}; mergekit registers {', '.join(METHODS)}")
    return info


def searchable_method(name: str) -> MethodInfo:
    """A method a recipe can search; one line saying why not otherwise."""
    info = method_info(name)
    if not info.searchable:
        raise MergerError(
            f"merge method {name!r} has no numeric parameter to search (use it as an untuned baseline); "
            f"searchable methods: {', '.join(SEARCHABLE_METHODS)}"
        )
    return info


def untuned_config(
    method: str,
    sources: Mapping[str, str | Path],
    *,
    base: str | None = None,
    dtype: str = "float32",
    tokenizer_source: str | None = None,
    values: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The mergekit config (a MergeConfiguration dict) of one untuned merge of `sources` (name -> path, in
    the recipe's order): mergekit's defaults, except `UNTUNED_VALUES`, a required weight 1/n over the inputs
    it applies to, the other required parameters from `REQUIRED_VALUES`, and `values` where given.
    Raises `NotApplicable` when the method cannot merge these sources untuned (the baselines' skip reason)."""
    info = method_info(method)
    given = dict(values or {})
    unknown = sorted(set(given) - set(info.parameters))
    if unknown:
        raise MergerError(f"{method} has no parameter {unknown[0]!r} (it takes {', '.join(info.parameters)})")
    uses_base = info.takes_base and base is not None
    if info.needs_base and base is None:
        raise NotApplicable("it needs a base model (base_model)")
    others = [name for name in sources if not (uses_base and name == base)]
    inputs = len(others) + (1 if uses_base else 0)
    contract = info.contract
    if inputs < (contract.min_inputs or 1) or (contract.max_inputs is not None and inputs > contract.max_inputs):
        bounds = f"{contract.min_inputs}" + (f"-{contract.max_inputs}" if contract.max_inputs else " or more")
        raise NotApplicable(f"it merges {bounds} models, the recipe has {inputs}")
    values = untuned_values(info, inputs, len(others), given)
    per_model = {name: value for name, value in values.items() if info.parameters[name].per_source}
    shared = {name: value for name, value in values.items() if not info.parameters[name].per_source}
    models = [
        {"model": str(sources[name]), **({"parameters": dict(per_model)} if per_model else {})} for name in others
    ]
    if uses_base and any(p.scope == ParameterScope.INPUT for p in info.parameters.values()):
        models.insert(0, {"model": str(sources[base]), "parameters": dict(per_model)})
    config: dict[str, Any] = {"merge_method": method, "models": models, "dtype": dtype}
    if uses_base:
        config["base_model"] = str(sources[base])
    if shared:
        config["parameters"] = shared
    if tokenizer_source:
        config["tokenizer_source"] = str(sources[tokenizer_source])
    return config


def untuned_values(
    info: MethodInfo, inputs: int, non_base: int, given: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The numeric parameters an untuned merge of `inputs` models (`non_base` of them not the base) sets,
    by name; a parameter left out keeps mergekit's default (switches always do)."""
    values: dict[str, Any] = {}
    for parameter in info.parameters.values():
        if parameter.kind != "number":
            continue  # switches (normalize, rescale, ...) keep mergekit's defaults
        count = {ParameterScope.INPUT: inputs, ParameterScope.NON_BASE: non_base}.get(parameter.scope, 1)
        value = (given or {}).get(parameter.name, _untuned_value(parameter, count, info))
        if value is not None:
            values[parameter.name] = value
    return values


def _untuned_value(parameter: ParameterInfo, inputs: int, info: MethodInfo) -> Any:
    """The untuned value of one numeric parameter over `inputs` inputs, or None to leave mergekit's default."""
    if parameter.name in UNTUNED_VALUES and info.sparsifies:
        return UNTUNED_VALUES[parameter.name]
    if not parameter.required:
        return None
    if parameter.name == "weight":
        return round(1.0 / inputs, 12)
    if parameter.name in REQUIRED_VALUES:
        return REQUIRED_VALUES[parameter.name]
    raise NotApplicable(f"{parameter.name} has no default in mergekit")
