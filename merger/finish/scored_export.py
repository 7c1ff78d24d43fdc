"""The exported winner is the model that was scored: its weights' digest equals the ledger's.

mergekit's export of `best.yaml` is bit-identical to the resident engine's candidate for task arithmetic,
TIES and breadcrumbs (except where magnitudes tie at the density threshold: the engine keeps every tied
element, mergekit the first k of torch's unstable argsort), and for DARE / DELLA at density 1; it differs
by an ulp or so for linear and slerp (the engine folds the normalization into the weights; slerp's
coefficients come from float64), and entirely for DARE / DELLA below density 1 (the engine draws its own
random numbers, keyed per run, or per genotype under `fresh_randomness`; mergekit draws from torch's
generator). Where the digests differ, the
worker merges the winner again and writes those weights over mergekit's (same files, names and dtypes),
and the digest is checked again: a mismatch then is an error and nothing is published.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from merger.common.errors import MergerError
from merger.engine.weights import checkpoint_digest, parameter_names
from merger.rundir.ledger import EvaluationRecord


def match_scored_weights(
    executor: Any, winner: EvaluationRecord, checkpoint: Path, trust_remote_code: bool = False
) -> None:
    """Make `checkpoint`'s weights the winner's as scored, and prove it against the ledger's digest."""
    names = parameter_names(checkpoint, trust_remote_code)
    if checkpoint_digest(checkpoint, names) == winner.digest:
        return
    written = executor.write_scored_weights(np.asarray(winner.genotype), checkpoint)
    where = f"generation {winner.generation}, index {winner.index}"
    if winner.digest is None:  # a ledger written before evaluations carried a digest
        print(
            f"merger: the ledger holds no digest of the winner ({where}); final/ holds its weights "
            "merged again, not checked against what was scored",
            file=sys.stderr,
        )
        return
    if written != winner.digest:
        raise MergerError(
            f"the winner ({where}) merged again is not the model that was scored: digest {written} vs "
            f"{winner.digest} in the ledger; nothing was exported or published"
        )
    exported = checkpoint_digest(checkpoint, names)
    if exported != winner.digest:
        raise MergerError(
            f"the exported winner's weights (digest {exported}) are not the scored ones ({winner.digest}, "
            f"{where}); nothing was exported or published"
        )
    print(
        f"merger: mergekit's export of best.yaml differs from the scored winner ({where}); final/ holds "
        "the scored weights (digest checked)",
        file=sys.stderr,
    )
