"""The models the end of a run scores (the winner, sources, baselines, finalist candidates) and how their
weights are identified: a source by its weights digest, a merge by its mergekit YAML's digest."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mergekit.config import MergeConfiguration

from merger.rundir.ledger import EvaluationRecord


@dataclass(frozen=True)
class FinalModel:
    """A model scored at the end: the winner, a source, a baseline, or a finalist candidate."""

    key: str  # the ledger's model key
    path: Path | None  # where its checkpoint is (None: a candidate scored merged in memory)
    identity: str  # which weights: a source's weights digest, a merge's config digest
    config: MergeConfiguration | None = None  # a merge exported before it is scored
    config_file: Path | None = None
    genotype: np.ndarray | None = None  # a candidate's: merged in memory, never exported to be scored

    @property
    def weights(self) -> np.ndarray | Path:
        """What a worker scores: a candidate's genotype (merged in memory), else the checkpoint on disk."""
        if self.genotype is not None:
            return self.genotype
        assert self.path is not None, f"{self.key} has neither a genotype nor a checkpoint"
        return self.path


def config_identity(config_yaml: str) -> str:
    return "config:" + hashlib.sha256(config_yaml.encode()).hexdigest()


def merge_yaml(config: MergeConfiguration) -> str:
    """The text of best.yaml and baselines/NAME.yaml: what `mergekit-yaml` reproduces."""
    return config.to_yaml() + "\n"


@dataclass(frozen=True)
class Contender:
    """A finalist and what exporting it takes."""

    model: FinalModel
    kind: str  # candidate, baseline or source
    name: str
    record: EvaluationRecord | None = None  # a candidate's evaluation
