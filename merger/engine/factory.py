"""The one way to get the search loop's engine: `engine_for_recipe` builds every kind (resident kernels,
mergekit's executor, the layer-path engine); each takes a mergekit config (`apply_config`)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from mergekit.config import MergeConfiguration

from merger.engine.methods import RESIDENT_METHODS
from merger.recipe import Recipe

log = logging.getLogger(__name__)


class Engine(Protocol):
    model: torch.nn.Module

    def apply_config(self, config: MergeConfiguration, draw: int = 0) -> None:
        """Write the candidate described by `config` into `model` in place; with fresh randomness its
        random methods draw by `draw` (`draw_key`), else every candidate shares the run's draw."""

    def load_checkpoint(self, path: Path) -> None:
        """`model` becomes a checkpoint on disk (a source alone, or an exported merge)."""

    def exported_state(self) -> dict[str, torch.Tensor]:
        """The candidate's tensors under their checkpoint names: what its export holds."""

    def digest(self) -> str:
        """The digest of the candidate's weights as its export holds them (`weights.parameters_digest`)."""


def draw_key(genotype: Any) -> int:
    """A candidate's random draw under `fresh_randomness`: a hash of its genotype's float64 values, so
    a candidate draws the same masks whichever worker merges it, after a resume, and when the winner is
    merged again for validation or export."""
    values = np.ascontiguousarray(np.asarray(genotype, dtype=np.float64))
    return int.from_bytes(hashlib.sha256(b"genotype:" + values.tobytes()).digest()[:8], "little") >> 1


def build_engine(
    sources: Mapping[str, Path],
    base: str | None,
    method: str,
    *,
    kind: str = "resident",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    fresh_randomness: bool = False,
    streaming: bool = False,
    allow_nonfinite: bool = False,
) -> Engine:
    """The resident engine where it has kernels for `method` (unless `kind` is "mergekit"); otherwise
    mergekit's executor per candidate."""
    if kind == "resident" and method in RESIDENT_METHODS:
        from merger.engine.resident import ResidentEngine

        return ResidentEngine(
            sources, base, method, dtype=dtype, device=device, seed=seed,
            fresh_randomness=fresh_randomness, streaming=streaming,
        )
    if kind == "resident":
        log.info("%s has no resident kernel: candidates merge through mergekit's executor", method)
    from merger.engine.reference import MergekitEngine

    return MergekitEngine(
        sources, base, dtype=dtype, device=device, seed=seed, fresh_randomness=fresh_randomness,
        allow_nonfinite=allow_nonfinite,
    )


def engine_for_recipe(recipe: Recipe, sources: Mapping[str, Path], device: str) -> Engine:
    """The engine a run's recipe asks for, on `device`: the layer-path engine for `genome.space:
    layer_path`, else `build_engine` with the recipe's method and engine settings."""
    settings = recipe.engine
    dtype = getattr(torch, settings.dtype)
    if recipe.genome.space == "layer_path":
        from merger.engine.layer_path import LayerPathEngine

        return LayerPathEngine(
            sources, recipe.anchor, dtype=dtype, device=device, trust_remote_code=recipe.trust_remote_code
        )
    return build_engine(
        sources,
        recipe.base_model,
        recipe.genome.method,
        kind=settings.kind,
        dtype=dtype,
        device=device,
        seed=recipe.optimizer.seed,
        fresh_randomness=settings.fresh_randomness,
        streaming=settings.streaming,
        allow_nonfinite=recipe.allow_nonfinite,
    )
