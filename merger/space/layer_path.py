"""The layer-path space (data-flow merging, DFS): unit cube <-> a path of source layers <-> passthrough.

A path is read from T = layers x sources x repeats slots in a fixed order: layers 0..L-1 of the first
source, then of the second, ..., the whole sequence repeated. A slot is in the path when its indicator
gene is at least 0.5 (the paper's indicator array); with `scales: per_slot` a second gene per slot is
the scale of that layer's residual contributions (attention o_proj and MLP down_proj). The candidate is
mergekit's `passthrough` of those layers in path order; the anchor gives the embeddings, the final norm
and lm_head (an empty anchor slice first and last, which is where passthrough takes them from).

A path outside [min_layers, max_layers] is repaired, never failed: the slots whose indicators lie
nearest the threshold flip (out ones with the highest indicator join, in ones with the lowest leave;
ties go to the earlier slot joining and the later slot leaving), so the repair depends on the genotype
alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mergekit.config import MergeConfiguration

from merger.common.errors import MergerError
from merger.recipe import PASSTHROUGH, Recipe
from merger.space.warm import WarmStart

THRESHOLD = 0.5
START_MARGIN = 0.25  # `start: anchor`: the anchor's slots start at 0.75, every other slot at 0.25
SCALE_FILTERS = ("o_proj", "down_proj")  # mergekit filters for a layer's residual output projections


@dataclass(frozen=True)
class Slot:
    source: str
    layer: int
    repeat: int


@dataclass(frozen=True)
class PathLayer:
    source: str
    layer: int
    scale: float = 1.0
    slot: int | None = None  # None for a layer fixed by `fix_ends`


class LayerPathGenome:
    """The search-space interface of `merger.space.parameters.Genome` (dimension, initial, decode, to_config,
    describe, table) for `genome.space: layer_path`."""

    def __init__(self, recipe: Recipe, source_paths: dict[str, Path], num_layers: int):
        self.recipe = recipe
        self.settings = recipe.genome.path_settings
        self.source_paths = {name: str(path) for name, path in source_paths.items()}
        self.num_layers = num_layers
        self.anchor = recipe.anchor
        self.slots = [
            Slot(source, layer, repeat)
            for repeat in range(self.settings.repeats)
            for source in recipe.source_names
            for layer in range(num_layers)
        ]
        self.fixed = 2 if self.settings.fix_ends else 0
        self.min_layers = self.settings.min_layers
        self.max_layers = self.settings.max_layers or len(self.slots) + self.fixed
        if self.min_layers > len(self.slots) + self.fixed:
            raise MergerError(
                f"genome.layer_path.min_layers: {self.min_layers} is more than the "
                f"{len(self.slots) + self.fixed} layers a path can hold"
            )

    @property
    def scaled(self) -> bool:
        return self.settings.scales == "per_slot"

    @property
    def dimension(self) -> int:
        return len(self.slots) * (2 if self.scaled else 1)

    def describe(self) -> str:
        text = (
            f"{self.dimension} genes: a layer path over {len(self.slots)} slots "
            f"({len(self.recipe.source_names)} sources x {self.num_layers} layers x {self.settings.repeats} "
            f"repeat(s)), {self.min_layers}-{self.max_layers} layers, anchor {self.anchor}"
        )
        if self.scaled:
            bounds = self.settings.scale_range
            text += f", a scale per slot in [{bounds.min:g}, {bounds.max:g}]"
        if self.fixed:
            text += ", first and last layer fixed to the anchor's"
        return text

    # -- unit cube <-> path ----------------------------------------------------------------------
    def warm_start(self) -> list[WarmStart]:
        """`start: anchor`: the anchor's own path is scored first, so the search never returns a
        path that scored below its starting model (PS+DFS: the parameter-space winner)."""
        return [WarmStart("anchor path", self.initial())] if self.settings.start == "anchor" else []

    def initial(self) -> np.ndarray:
        """x0: the anchor's own layers (`start: anchor`) or every gene at the centre (`start: center`)."""
        x = np.full(self.dimension, THRESHOLD)
        if self.settings.start == "anchor":
            ends = {0, self.num_layers - 1} if self.fixed else set()
            own = [
                slot.source == self.anchor and slot.repeat == 0 and slot.layer not in ends
                for slot in self.slots
            ]
            x[: len(self.slots)] = np.where(own, THRESHOLD + START_MARGIN, THRESHOLD - START_MARGIN)
        if self.scaled:
            bounds = self.settings.scale_range
            if bounds.min <= 1.0 <= bounds.max:
                x[len(self.slots) :] = (1.0 - bounds.min) / (bounds.max - bounds.min)
        return x

    def included(self, x: np.ndarray) -> list[int]:
        """The slots in the path, repaired into the layer limits; in slot order."""
        indicators = np.clip(np.asarray(x, dtype=float)[: len(self.slots)], 0.0, 1.0)
        chosen = {i for i, value in enumerate(indicators) if value >= THRESHOLD}
        low, high = max(0, self.min_layers - self.fixed), self.max_layers - self.fixed
        if len(chosen) < low:
            joining = sorted(set(range(len(self.slots))) - chosen, key=lambda i: (-indicators[i], i))
            chosen.update(joining[: low - len(chosen)])
        elif len(chosen) > high:
            leaving = sorted(chosen, key=lambda i: (indicators[i], -i))
            chosen.difference_update(leaving[: len(chosen) - high])
        return sorted(chosen)

    def decode(self, x: np.ndarray) -> list[PathLayer]:
        x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
        bounds = self.settings.scale_range
        path = []
        for index in self.included(x):
            slot = self.slots[index]
            scale = 1.0
            if self.scaled:
                scale = round(float(bounds.min + x[len(self.slots) + index] * (bounds.max - bounds.min)), 6)
            path.append(PathLayer(slot.source, slot.layer, scale, index))
        if self.fixed:
            path = [PathLayer(self.anchor, 0), *path, PathLayer(self.anchor, self.num_layers - 1)]
        return path

    # -- path -> mergekit ------------------------------------------------------------------------
    def to_config(self, x: np.ndarray) -> MergeConfiguration:
        return passthrough_config(
            self.decode(x),
            self.source_paths,
            anchor=self.anchor,
            num_layers=self.num_layers,
            dtype=self.recipe.engine.dtype,
            tokenizer_source=self.recipe.tokenizer_source,
        )

    def table(self, x: np.ndarray) -> list[dict[str, Any]]:
        """One row per path position, in the gene-table shape reports plot (group = position)."""
        return [
            {
                "gene": f"path.{position}",
                "parameter": "scale",
                "source": layer.source,
                "tensor_class": "residual",
                "group": position,
                "value": layer.scale,
                "layer": layer.layer,
                "slot": layer.slot,
            }
            for position, layer in enumerate(self.decode(x))
        ]


def _runs(path: list[PathLayer]) -> list[tuple[str, int, int, float]]:
    """Consecutive layers of one source with one scale: (source, start, end, scale) slices."""
    runs: list[tuple[str, int, int, float]] = []
    for layer in path:
        if runs:
            source, start, end, scale = runs[-1]
            if (source, end, scale) == (layer.source, layer.layer, layer.scale):
                runs[-1] = (source, start, end + 1, scale)
                continue
        runs.append((layer.source, layer.layer, layer.layer + 1, layer.scale))
    return runs


def passthrough_config(
    path: list[PathLayer],
    source_paths: dict[str, str],
    *,
    anchor: str,
    num_layers: int,
    dtype: str,
    tokenizer_source: str | None = None,
) -> MergeConfiguration:
    """mergekit passthrough of `path`: slices in path order, `scale` on o_proj/down_proj where not 1."""
    slices: list[dict[str, Any]] = [{"sources": [{"model": source_paths[anchor], "layer_range": [0, 0]}]}]
    for source, start, end, scale in _runs(path):
        entry: dict[str, Any] = {"sources": [{"model": source_paths[source], "layer_range": [start, end]}]}
        if scale != 1.0:
            conditions = [{"filter": name, "value": scale} for name in SCALE_FILTERS]
            entry["parameters"] = {"scale": [*conditions, {"value": 1.0}]}
        slices.append(entry)
    end_of_anchor = [num_layers, num_layers]
    slices.append({"sources": [{"model": source_paths[anchor], "layer_range": end_of_anchor}]})
    config: dict[str, Any] = {"merge_method": PASSTHROUGH, "slices": slices, "dtype": dtype}
    if tokenizer_source is not None:  # otherwise mergekit copies the first slice's: the anchor's
        config["tokenizer_source"] = source_paths[tokenizer_source]
    return MergeConfiguration.model_validate(config)
