"""One way to get the search loop's engine: both kinds take a mergekit config (`apply_config`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from mergekit.config import MergeConfiguration

from merger.engine.methods import RESIDENT_METHODS

log = logging.getLogger(__name__)


class Engine(Protocol):
    model: torch.nn.Module

    def apply_config(self, config: MergeConfiguration) -> None:
        """Write the candidate described by `config` into `model` in place."""


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

    return MergekitEngine(sources, base, dtype=dtype, device=device, seed=seed, fresh_randomness=fresh_randomness)
