"""Paired racing (racing.pairing: paired) on constructed tables whose full-set scores are known."""

from __future__ import annotations

import numpy as np
import pytest

from merger.common.errors import MergerError
from merger.recipe import EvalSet, RacingSpec, parse_recipe
from merger.scoring.items import ItemSet
from merger.search.paired import capital_crosses, surely_ahead
from merger.search.strategies import race_look
from tests.test_overnight import recipe_data

Table = dict[int, dict[str, dict[int, float]]]


def one_task(size: int) -> ItemSet:
    return ItemSet.of({"t": list(range(size))}, EvalSet(tasks=[{"name": "t"}]))


def race(item_set: ItemSet, table: Table, order: list, settings: RacingSpec, mu: int) -> dict[int, int]:
    """Each cut candidate and the items it had seen when cut, block by block as RacingStrategy races."""
    seen_count: dict[int, int] = {}
    cut_at: dict[int, int] = {}
    for start in range(0, len(order), settings.block):
        racing = [c for c in table if c not in cut_at]
        for candidate in racing:
            seen_count[candidate] = min(len(order), start + settings.block)
        _, cut = race_look(item_set, order, table, seen_count, racing, mu, settings, len(table))
        cut_at.update({candidate: seen_count[candidate] for candidate in cut})
    return cut_at


def close_table(rng: np.random.Generator, size: int, candidates: int, continuous: bool) -> Table:
    """Candidates a few points apart that share which items are hard, as merges of one family do."""
    difficulty = rng.normal(size=size)
    ability = rng.normal(scale=0.3, size=candidates)
    table: Table = {}
    for c in range(candidates):
        chance = 1 / (1 + np.exp(difficulty - ability[c] + rng.normal(scale=0.3, size=size)))
        values = chance if continuous else (rng.random(size) < chance).astype(float)
        table[c] = {"t": {doc: float(v) for doc, v in enumerate(values)}}
    return table


@pytest.mark.parametrize("continuous", [False, True], ids=["exact_match", "gold_prob"])
def test_paired_racing_never_cuts_a_candidate_at_or_above_the_cut_line(continuous):
    """The cut line is the mu-th best full-set score: a candidate on or above it has a paired mean
    difference of at least 0 against it, and must never be cut."""
    rng = np.random.default_rng(7)
    settings = RacingSpec(block=4, pairing="paired", delta=0.1)
    cuts = 0
    for trial in range(150):
        size, candidates = int(rng.integers(40, 160)), int(rng.integers(4, 9))
        table = close_table(rng, size, candidates, continuous)
        item_set = one_task(size)
        mu = candidates // 2
        scores = {c: item_set.score(values) for c, values in table.items()}
        line = sorted(scores.values(), reverse=True)[mu - 1]
        cut_at = race(item_set, table, item_set.order(trial, 0), settings, mu)
        assert all(scores[c] < line for c in cut_at), (trial, scores, cut_at)
        cuts += sum(1 for n in cut_at.values() if n < size)
    assert cuts > 100  # the race did cut, before the last item, so the check above had a chance to fail


def test_paired_racing_cuts_clearly_worse_candidates_earlier_than_the_unpaired_bound():
    """200 items and six candidates that agree item by item (each gets right the items below its level),
    full scores 0.40 to 0.55: pairing sees the differences, not each candidate's spread."""
    size = 200
    item_set = one_task(size)
    easiness = np.random.default_rng(0).random(size)
    levels = [0.60, 0.58, 0.57, 0.55, 0.50, 0.45]
    table = {c: {"t": {doc: float(easiness[doc] < level) for doc in range(size)}} for c, level in enumerate(levels)}
    paired = RacingSpec(block=8, pairing="paired", delta=0.1)
    unpaired = RacingSpec(block=8, bound="hoeffding", delta=0.1)
    for seed in range(5):
        order = item_set.order(seed, 0)
        by_pairs, by_candidate = race(item_set, table, order, paired, 3), race(item_set, table, order, unpaired, 3)
        assert set(by_pairs) == set(by_candidate) == {3, 4, 5}
        for worse in (4, 5):
            assert by_pairs[worse] < by_candidate[worse], (seed, by_pairs, by_candidate)


def test_the_betting_test_is_wrong_at_most_alpha_of_the_time():
    """A skewed population whose mean is exactly 0: over many random orders, the capital reaches 1/alpha
    in at most an alpha share of them; a population with mean 0.2 is told
    from it in nearly all, on 60 of its 100 values."""
    rng = np.random.default_rng(3)
    population = np.concatenate([np.full(90, 1 / 9), np.full(10, -1.0)])
    assert population.mean() == pytest.approx(0.0)
    alpha = 0.1
    wrong = sum(capital_crosses(rng.permutation(population), len(population), alpha) for _ in range(2000))
    assert wrong <= alpha * 2000
    ahead = np.concatenate([np.full(60, 0.5), np.full(40, -0.25)])  # mean 0.2
    found = sum(capital_crosses(rng.permutation(ahead)[:60], len(ahead), alpha) for _ in range(200))
    assert found >= 190


def test_what_the_items_seen_decide_is_decided_at_any_alpha():
    item_set = one_task(10)
    ahead = {"t": dict.fromkeys(range(10), 1.0)}
    behind = {"t": dict.fromkeys(range(10), 0.0)}
    items = list(item_set.items)
    # 6 of 10 items, each a point ahead: the 4 left cannot undo it
    assert surely_ahead(item_set, ahead, behind, items[:6], alpha=1e-12)
    assert not surely_ahead(item_set, ahead, behind, items[:4], alpha=1e-12)
    tied = {"t": {doc: float(doc % 2) for doc in range(10)}}
    assert not surely_ahead(item_set, tied, tied, items, alpha=0.5)  # all seen: exactly the sign


def test_pairing_is_a_recipe_choice_and_old_recipes_keep_independent_racing(tiny_sources, tiny_evals):
    data = recipe_data(tiny_sources, tiny_evals)
    data["fitness"] = {**data["fitness"], "strategy": "racing", "racing": {"block": 2}}
    assert parse_recipe(data).fitness.racing.pairing == "independent"
    data["fitness"]["racing"] = {"pairing": "paired"}
    assert parse_recipe(data).fitness.racing.pairing == "paired"
    data["fitness"]["racing"] = {"pairing": "paired", "bound": "exact"}
    with pytest.raises(MergerError, match="bound: exact is for pairing: independent"):
        parse_recipe(data)
