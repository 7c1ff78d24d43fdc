"""A candidate scored before the first generation, and why it was chosen."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class WarmStart(NamedTuple):
    label: str  # "baseline defaults", "x0 grid 0.25", "anchor path": recorded with its ledger row
    genotype: np.ndarray
