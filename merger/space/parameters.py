"""The search space: a vector in [0, 1]^n <-> per layer group / tensor class values <-> mergekit config.

pycma only ever sees the unit-cube vector; its boundary handling keeps it inside [0, 1], and each
coordinate maps linearly onto its parameter's [min, max] from the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mergekit.config import MergeConfiguration

from merger.common.errors import MergerError
from merger.recipe import TENSOR_CLASS_FILTERS, Recipe
from merger.recipe.methods import METHODS, NotApplicable, untuned_values
from merger.recipe.untuned import UNTUNED_MERGES
from merger.space.warm import WarmStart

DEFAULT_CLASS = "default"
X0_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # optimizer.x0: grid, as fractions of each gene's searched range


@dataclass(frozen=True)
class Gene:
    parameter: str
    source: str | None  # None for a shared parameter (t, lambda)
    tensor_class: str  # one of the recipe's tensor classes, or "default"
    group: int | None  # None for embeddings, which live outside the layers
    low: float
    high: float

    @property
    def label(self) -> str:
        parts = [self.parameter, self.source or "shared", self.tensor_class]
        if self.group is not None:
            parts.append(f"g{self.group}")
        return ".".join(parts)


def layer_groups(num_layers: int, granularity: int) -> list[tuple[int, int]]:
    """[start, end) ranges of `granularity` layers; the last one may be shorter."""
    if granularity > num_layers:
        raise MergerError(
            f"genome.layer_granularity: {granularity} is larger than the models' {num_layers} layers"
        )
    return [(start, min(start + granularity, num_layers)) for start in range(0, num_layers, granularity)]


class Genome:
    def __init__(self, recipe: Recipe, source_paths: dict[str, Path], num_layers: int):
        self.recipe = recipe
        self.source_paths = {name: str(path) for name, path in source_paths.items()}
        self.num_layers = num_layers
        self.groups = layer_groups(num_layers, recipe.genome.layer_granularity)
        self.classes = [c for c in TENSOR_CLASS_FILTERS if c in recipe.genome.tensor_classes] + [DEFAULT_CLASS]
        self.genes = self._layout()
        self._index = {(g.parameter, g.source, g.tensor_class, g.group): i for i, g in enumerate(self.genes)}

    def _layout(self) -> list[Gene]:
        info = METHODS[self.recipe.genome.method]
        genes = []
        for parameter, bounds in self.recipe.genome.searched.items():
            owners = self.recipe.merged_sources if parameter in info.source_parameters else [None]
            for source in owners:
                for tensor_class in self.classes:
                    groups = [None] if tensor_class == "embeddings" else range(len(self.groups))
                    genes.extend(
                        Gene(parameter, source, tensor_class, group, bounds.min, bounds.max) for group in groups
                    )
        if not genes:
            raise MergerError("genome.parameters: nothing to search; give at least one parameter a {min, max}")
        return genes

    @property
    def dimension(self) -> int:
        return len(self.genes)

    @property
    def uneven_last_group(self) -> bool:
        return len(self.groups) > 1 and self.groups[-1][1] - self.groups[-1][0] != self.groups[0][1]

    def describe(self) -> str:
        sizes = [end - start for start, end in self.groups]
        text = (
            f"{self.dimension} genes: {len(self.recipe.genome.searched)} searched parameter(s) x "
            f"{len(self.groups)} layer group(s) of {sizes[0]} layers x classes {', '.join(self.classes)}"
        )
        if self.uneven_last_group:
            text += f" (the last group has {sizes[-1]} layers)"
        return text

    # -- vector <-> values -------------------------------------------------------------------
    def decode(self, x: np.ndarray) -> np.ndarray:
        x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
        low = np.array([g.low for g in self.genes])
        high = np.array([g.high for g in self.genes])
        return low + x * (high - low)

    def encode(self, values: np.ndarray) -> np.ndarray:
        low = np.array([g.low for g in self.genes])
        high = np.array([g.high for g in self.genes])
        return (np.asarray(values, dtype=float) - low) / (high - low)

    def warm_start(self) -> list[WarmStart]:
        """The untuned baselines this genome can express, then `optimizer.x0: grid`'s merges giving every
        gene one value of X0_GRID."""
        starts = self.baseline_starts()
        if self.recipe.optimizer.x0 == "grid":
            starts += [WarmStart(f"x0 grid {value:g}", np.full(self.dimension, value)) for value in X0_GRID]
        return starts

    def baseline_starts(self) -> list[WarmStart]:
        """The recipe's baselines of the searched method (`defaults`, or a named setting of the method,
        merger.recipe.untuned) that this genome can express: every gene can take the baseline's value, and
        the fixed parameters and options are the baseline's. One start per distinct merge."""
        recipe, genome = self.recipe, self.recipe.genome
        if genome.options:
            return []
        info = METHODS[genome.method]
        uses_base = info.takes_base and recipe.base_model is not None
        non_base = [name for name in recipe.source_names if not (uses_base and name == recipe.base_model)]
        fixed = {name: value for name, value in genome.parameters.items() if name not in genome.searched}
        starts: list[WarmStart] = []
        seen: set[tuple[float, ...]] = set()
        for name in recipe.baseline_names:
            if recipe.baseline_method(name) != genome.method:
                continue
            try:
                untuned = untuned_values(info, len(non_base) + int(uses_base), len(non_base), UNTUNED_MERGES[name].values)
            except NotApplicable:
                continue
            if any(untuned.get(key, info.parameters[key].default) != value for key, value in fixed.items()):
                continue
            values = [untuned.get(gene.parameter, info.parameters[gene.parameter].default) for gene in self.genes]
            genes = zip(self.genes, values, strict=True)
            if any(value is None or not gene.low <= value <= gene.high for gene, value in genes):
                continue
            if tuple(values) not in seen:
                seen.add(tuple(values))
                starts.append(WarmStart(f"baseline {name}", self.encode(np.array(values, dtype=float))))
        return starts

    def initial(self) -> np.ndarray:
        """x0: the centre of the bounds, or the recipe's given merge (a value per parameter or per source)."""
        x0 = self.recipe.optimizer.x0
        if x0 == "center":
            return np.full(self.dimension, 0.5)
        values = self.decode(np.full(self.dimension, 0.5))
        for parameter, given in x0.items():
            matched = False
            for i, gene in enumerate(self.genes):
                if gene.parameter != parameter:
                    continue
                if isinstance(given, dict):
                    if gene.source not in given:
                        continue
                    value = given[gene.source]
                else:
                    value = given
                if not gene.low <= value <= gene.high:
                    raise MergerError(
                        f"optimizer.x0.{parameter}: {value} is outside the searched range [{gene.low}, {gene.high}]"
                    )
                values[i] = value
                matched = True
            if not matched:
                raise MergerError(f"optimizer.x0.{parameter}: not a searched parameter of this genome")
        return self.encode(values)

    # -- values -> mergekit ------------------------------------------------------------------
    def _setting(self, values: np.ndarray, parameter: str, source: str | None, group: int):
        def value(tensor_class: str) -> float:
            index = self._index[(parameter, source, tensor_class, None if tensor_class == "embeddings" else group)]
            return round(float(values[index]), 6)

        if len(self.classes) == 1:
            return value(DEFAULT_CLASS)
        conditions = [
            {"filter": pattern, "value": value(c)}
            for c in self.classes[:-1]
            for pattern in TENSOR_CLASS_FILTERS[c]
        ]
        return conditions + [{"value": value(DEFAULT_CLASS)}]

    def to_config(self, x: np.ndarray) -> MergeConfiguration:
        """The mergekit config of a genotype: one output slice per layer group."""
        values = self.decode(x)
        genome = self.recipe.genome
        info = METHODS[genome.method]
        searched = genome.searched
        fixed = {name: value for name, value in genome.parameters.items() if name not in searched}
        slices = []
        for group, (start, end) in enumerate(self.groups):
            sources = []
            for name in self.recipe.source_names:
                parameters = {
                    p: self._setting(values, p, name, group)
                    for p in info.source_parameters
                    if p in searched and name in self.recipe.merged_sources
                }
                entry = {"model": self.source_paths[name], "layer_range": [start, end]}
                if parameters:
                    entry["parameters"] = parameters
                sources.append(entry)
            shared = {p: self._setting(values, p, None, group) for p in info.shared_parameters if p in searched}
            slices.append({"sources": sources, **({"parameters": shared} if shared else {})})
        config = {
            "merge_method": genome.method,
            "slices": slices,
            "dtype": self.recipe.engine.dtype,
            "parameters": {**fixed, **genome.options} or None,
        }
        if self.recipe.base_model:
            config["base_model"] = self.source_paths[self.recipe.base_model]
        if self.recipe.tokenizer_source:
            config["tokenizer_source"] = self.source_paths[self.recipe.tokenizer_source]
        return MergeConfiguration.model_validate({k: v for k, v in config.items() if v is not None})

    def table(self, x: np.ndarray) -> list[dict]:
        """One row per gene with its decoded value (for reports and status)."""
        return [
            {"gene": gene.label, "parameter": gene.parameter, "source": gene.source,
             "tensor_class": gene.tensor_class, "group": gene.group, "value": float(v)}
            for gene, v in zip(self.genes, self.decode(x), strict=True)
        ]
