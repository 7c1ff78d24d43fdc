"""Every merge method, as mergekit's own registry describes it: the one home of merge-method knowledge.

mergekit (0.1.5) gives each registered method one `MergeMethodSpec`, whatever its kind (batched kernels,
group functions, generalized task arithmetic): its parameters with type, default and scope (shared, one
value per input, one per non-base input) and an `InputContract` (base policy, how many inputs). Recipe
validation, the genome and both engines read that through `METHODS`.

The only local knowledge is `SEARCH_RANGES`: which numeric parameters are worth searching, within what
bounds (mergekit says a parameter is a float, not which floats make sense). A method with no parameter in
that table is known but not searchable (a baseline such as model_stock or karcher).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit.config import MergeConfiguration
from mergekit.merge_methods import registered_methods
from mergekit.merge_methods.base import MISSING, BasePolicy, InputContract, MergeMethod, ParameterScope

from merger.common.errors import MergerError

# Search bounds by parameter name, and by (method, name) where a method gives a name another meaning.
SEARCH_RANGES: dict[str, tuple[float, float]] = {
    "weight": (-2.0, 2.0),
    "density": (0.0, 1.0),
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


@dataclass(frozen=True)
class ParameterInfo:
    name: str
    scope: ParameterScope  # shared, one per input (base included), one per non-base input
    kind: str  # "number" (int or float), "switch" (bool) or "other"
    default: Any  # None when required
    required: bool
    search_range: tuple[float, float] | None

    @property
    def per_source(self) -> bool:
        return self.scope != ParameterScope.SHARED


@dataclass(frozen=True)
class MethodInfo:
    name: str
    pretty_name: str
    parameters: Mapping[str, ParameterInfo]
    contract: InputContract

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
        )
    return MethodInfo(spec.name, spec.pretty_name or spec.name, parameters, spec.contract)


METHODS: dict[str, MethodInfo] = {m.spec.name: _method_info(m) for m in registered_methods()}
SEARCHABLE_METHODS = tuple(name for name, info in METHODS.items() if info.searchable)


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
    values: Mapping[str, Any] | None = None,
    tokenizer_source: str | None = None,
) -> MergeConfiguration:
    """The mergekit config of one fixed merge of `sources` (name -> path): mergekit's defaults, `values`
    where given, and for required parameters without a default: each source's weight 1/n (n = sources with
    values), a shared one the middle of its search range. For baselines (model_stock, karcher, linear, ...)."""
    info = method_info(method)
    if base is not None and base not in sources:
        raise MergerError(f"base model {base!r} is not one of the sources ({', '.join(sources)})")
    if info.needs_base and base is None:
        raise MergerError(f"{method} needs a base model")
    used_base = base if info.takes_base or base is None else None
    problem = info.source_count_problem(len(sources), used_base is not None)
    if problem:
        raise MergerError(problem)
    given = dict(values or {})
    unknown = sorted(set(given) - set(info.parameters))
    if unknown:
        raise MergerError(f"{method} has no parameter {unknown[0]!r} (it takes {', '.join(info.parameters)})")
    carriers = info.sources_with_values(list(sources), base)
    per_source: dict[str, Any] = {}
    shared: dict[str, Any] = {}
    for parameter in info.parameters.values():
        if parameter.name in given:
            value = given[parameter.name]
        elif not parameter.required:
            continue
        elif parameter.per_source:
            value = round(1.0 / len(carriers), 6)
        elif parameter.search_range is not None:
            value = sum(parameter.search_range) / 2
        else:
            raise MergerError(f"{method}: give a value for its required parameter {parameter.name!r}")
        (per_source if parameter.per_source else shared)[parameter.name] = value
    models = [
        {"model": str(path), **({"parameters": per_source} if per_source and name in carriers else {})}
        for name, path in sources.items()
    ]
    raw: dict[str, Any] = {"merge_method": method, "models": models, "dtype": dtype}
    if shared:
        raw["parameters"] = shared
    if base is not None:
        raw["base_model"] = str(sources[base])
    if tokenizer_source is not None:
        raw["tokenizer_source"] = str(sources[tokenizer_source])
    return MergeConfiguration.model_validate(raw)
