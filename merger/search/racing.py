"""Racing: bounds on a partly scored candidate's full-set score, who is cut, and what pycma is told.

After each block, candidate c has scored a part S of the items (weights w_i, summing to W_S) with
weighted sum s_c; the items left weigh R = 1 - W_S. Its full-set score lies in [L_c, U_c]:
- `exact`: L_c = s_c and U_c = s_c + R (every item left wrong / right; never wrong).
- `hoeffding`: the items left score like the items seen: their mean lies within
  r = sqrt(ln(2/delta) / (2 n)) of the seen mean m_c = s_c / W_S (n items seen; Hoeffding's bound,
  which also holds for sampling without replacement), so L_c = s_c + R max(0, m_c - r) and
  U_c = s_c + R min(1, m_c + r). Each bound is wrong with chance at most delta (per comparison, not
  corrected for the many comparisons of a run; n counts items, not their task weights).
Candidate c stops when at least mu other candidates have L_j > U_c: it can no longer be among the
generation's mu best. No cut ever leaves fewer than mu candidates in the race.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from merger.scoring.items import Item, ItemSet, Values

BOUNDS = ("exact", "hoeffding")


@dataclass(frozen=True)
class Bounds:
    lower: float
    upper: float
    estimate: float  # the weighted mean of the items seen (the full score once all are seen)
    item_count: int  # items seen


def bounds(item_set: ItemSet, values: Values, seen: Iterable[Item], kind: str, delta: float) -> Bounds:
    seen = list(seen)
    seen_weight = sum(item_set.weight(item) for item in seen)
    partial = item_set.score(values, seen)
    left = max(0.0, 1.0 - seen_weight)
    mean = partial / seen_weight if seen_weight > 0 else 0.0
    if left <= 1e-12:
        return Bounds(partial, partial, partial, len(seen))
    if kind == "exact" or not seen:
        return Bounds(partial, partial + left, mean, len(seen))
    radius = math.sqrt(math.log(2 / delta) / (2 * len(seen)))
    return Bounds(
        partial + left * max(0.0, mean - radius), partial + left * min(1.0, mean + radius), mean, len(seen)
    )


def cuts(known: Mapping[int, Bounds], racing: Iterable[int], mu: int) -> set[int]:
    """The racing candidates that at least `mu` others beat for sure; weakest first, leaving `mu` racing."""
    return cut_beaten(
        sorted(racing, key=lambda c: (known[c].upper, c)),
        known,
        lambda ahead, behind: known[ahead].lower > known[behind].upper,
        mu,
    )


def cut_beaten(
    weakest_first: Sequence[int], contenders: Iterable[int], beats: Callable[[int, int], bool], mu: int
) -> set[int]:
    """The candidates (racing, weakest first) that at least `mu` contenders beat; leaving `mu` racing."""
    contenders = list(contenders)
    still = len(weakest_first)
    cut: set[int] = set()
    for candidate in weakest_first:
        if still <= mu:
            break
        beaters = sum(1 for other in contenders if other != candidate and beats(other, candidate))
        if beaters >= mu:
            cut.add(candidate)
            still -= 1
    return cut


def ranking_values(known: Mapping[int, Bounds], complete: set[int], mu: int) -> dict[int, float]:
    """A value per (successful) candidate whose order agrees with the evidence, for pycma (higher is better).

    The mu best complete candidates keep their full-set scores; every other candidate (complete but
    outside them, or cut) keeps its score or estimate, held strictly below the mu-th complete score.
    """
    top = sorted(complete, key=lambda c: (-known[c].estimate, c))[:mu]
    floor = min((known[c].estimate for c in top), default=math.inf)
    below = float(np.nextafter(floor, -math.inf))
    return {c: b.estimate if c in top else min(b.estimate, below) for c, b in known.items()}
