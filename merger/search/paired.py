"""Paired racing: who is cut, from per-item differences between the candidates of a generation.

All candidates of a generation are scored on the same seeded order of the fitness items, so for two
candidates j and c the per-item differences z_i = N w_i (v_j,i - v_c,i) (N items, w_i the item's weight)
have the full-set score difference D_jc = score_j - score_c as their mean over the N items, and the
first n items of the order are a sample of them drawn without replacement. Candidates a few points
apart mostly agree item by item, so the differences vary far less than each candidate's values, and a
bound on their mean separates candidates that separate bounds per candidate cannot.

The decision "j is ahead of c" is a test of D_jc <= 0 by betting (Waudby-Smith & Ramdas, "Estimating
means of bounded random variables by betting", JRSSB 2023, their sampling-without-replacement
martingale): with the differences rescaled to z_t in [-1, 1] and S_{t-1} the sum of those before the
t-th, were the full mean 0 the t-th would have the conditional mean m_t = -S_{t-1} / (N - t + 1) (the
finite-population correction: m_t moves as the items run out). The capital
K_n = prod_t (1 + b_t (z_t - m_t)), with each bet b_t >= 0 chosen from the items before t, is then a
non-negative martingale (were the full mean below 0, K is below the martingale at the true mean), so
by Ville's inequality it ever reaches 1/alpha with chance at most alpha: at every look at once, so
looking after every block needs no union bound over the looks. j is ahead of c when K reaches 1/alpha, or when the items seen
already decide (|m_t| >= 1). The bets are approximately growth-optimal (aGRAPA:
b_t = edge / (variance + edge^2) from the running mean and variance of the z before t, edge = running
mean - m_t), at most BET_CAP / (1 + m_t) so that no item can take all the capital. Bets grow where the
differences vary little, which is what makes this an empirical-Bernstein-like test: it adapts to the
variance of the paired differences, not of each candidate's values. (Closed-form empirical-Bernstein
bounds were tried first and lose at a few hundred items: Bardenet & Maillard's empirical
Bernstein-Serfling bound carries a term 4.45 (b - a) log(5/alpha) / n, 0.2 of the score difference at
n = 325 for six candidates; Waudby-Smith & Ramdas' predictable plug-in empirical-Bernstein confidence
sequence cut later than the unpaired Hoeffding bound on the table of NOTES.md.)

The many comparisons: one generation of lambda candidates makes lambda (lambda - 1) one-sided tests,
each at alpha = delta / (lambda (lambda - 1)) (a union bound), so the chance that any cut of the
generation rests on a wrong comparison is at most delta (`racing.delta` is per generation here, where
the unpaired Hoeffding bound takes it per comparison). Over a run of G generations the chance of at
least one wrong cut is at most G delta, and the expected number of generations with a wrong cut at most
G delta: such a cut drops a candidate that was among the mu best, which pycma is then told ranks low.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from merger.scoring.items import Item, ItemSet, Values
from merger.search.racing import Bounds, cut_beaten

BET_CAP = 0.9  # the largest bet, as a share of what the capital can lose on one item
# sums of item values carry rounding: a tie (two equal scores, or the seen values against the worst
# the rest can bring) must not read as decided
ROUNDING = 1e-9


def capital_crosses(steps: np.ndarray, population: int, alpha: float) -> bool:
    """Whether the bettor's capital against "the mean of the `population` values in [-1, 1] is at most 0"
    reaches 1/alpha on `steps`, the first of them in a uniformly random order (in that order)."""
    if steps.sum() > population - len(steps) + ROUNDING:  # the values seen outweigh any the rest could bring
        return True
    count = np.arange(len(steps), dtype=float)  # values seen before each step
    before = np.cumsum(steps) - steps
    null_mean = -before / (population - count)  # the rest's mean if the whole mean were 0
    settled = np.flatnonzero(np.abs(null_mean) >= 1 - ROUNDING)  # from here the seen values alone decide
    if len(settled):
        if null_mean[settled[0]] < -1 - ROUNDING:  # the values seen outweigh any the rest could bring
            return True
        steps, null_mean, count, before = (a[: settled[0]] for a in (steps, null_mean, count, before))
    estimate = before / (count + 1)  # the running mean, with one prior value at 0
    spread = (1 + np.cumsum(steps**2) - steps**2) / (count + 1) - estimate**2  # and one at +-1
    edge = estimate - null_mean
    bets = np.minimum(np.maximum(0.0, edge / (spread + edge**2)), BET_CAP / (1 + null_mean))
    log_capital = np.cumsum(np.log1p(bets * (steps - null_mean)))
    return bool(len(log_capital) and log_capital.max() >= math.log(1 / alpha))


def surely_ahead(
    item_set: ItemSet, ahead: Values, behind: Values, seen: Sequence[Item], alpha: float
) -> bool:
    """Whether score(ahead) > score(behind) over the whole fitness set, from the items `seen` (a prefix
    of the generation's order); wrong with chance at most alpha, whatever the prefix."""
    weights = np.array([item_set.weight(item) for item in seen])
    differences = np.array([ahead[task][doc] - behind[task][doc] for task, doc in seen])
    if len(seen) >= len(item_set):
        return float(weights @ differences) > ROUNDING
    population = len(item_set)
    half_range = population * max(item_set.task_weight.values())  # |N w_i d_i| never exceeds it
    return capital_crosses(population * weights * differences / half_range, population, alpha)


def comparison_alpha(delta: float, candidates: int) -> float:
    """Each one-sided comparison's share of the generation's error budget delta (a union bound), for a
    generation of `candidates` (its size, fixed before the race starts)."""
    return delta / max(1, candidates * (candidates - 1))


def paired_cuts(
    item_set: ItemSet,
    order: Sequence[Item],
    values: Mapping[int, Values],
    seen_count: Mapping[int, int],
    racing: Iterable[int],
    known: Mapping[int, Bounds],
    mu: int,
    alpha: float,
) -> set[int]:
    """The racing candidates that at least `mu` others (of those in `known`) are surely ahead of, each
    pair compared on the items both have seen at level alpha; weakest estimate first, leaving `mu`
    racing."""

    def ahead(leader: int, other: int) -> bool:
        seen = order[: min(seen_count[leader], seen_count[other])]
        return surely_ahead(item_set, values[leader], values[other], seen, alpha)

    return cut_beaten(sorted(racing, key=lambda c: (known[c].estimate, c)), known, ahead, mu)
