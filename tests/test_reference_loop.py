"""The reference loop (`merger.search.reference_loop`) against the real search on the tiny fixtures."""

from __future__ import annotations

import numpy as np
import pytest

from merger.common.errors import MergerError
from merger.recipe import parse_recipe
from merger.rundir.ledger import Ledger
from merger.search.loop import Search
from merger.search.open import open_run
from merger.search.reference_loop import run_reference_loop
from tests.recipes import tiny_recipe

GENERATIONS = 2
POPSIZE = 4


@pytest.mark.slow  # a search and the reference loop
def test_reference_loop_asks_and_scores_what_the_real_search_does(tiny_sources, tiny_evals, tmp_path):
    data = tiny_recipe(
        tiny_sources, tiny_evals, tmp_path / "run",
        optimizer={"popsize": POPSIZE, "max_evaluations": 1 + GENERATIONS * POPSIZE, "seed": 3, "x0": "center"},
        fitness={"tasks": [{"name": "tiny_mc", "metric": "acc"}], "limit": 12},
        validation=None,
        test=None,
    )
    recipe = parse_recipe(data)
    with open_run(recipe, tmp_path / "run") as run:
        result = Search(run).run()
    ledger = Ledger(tmp_path / "run")
    assert result.generations == GENERATIONS

    reference = run_reference_loop(recipe, GENERATIONS)

    assert len(reference) == GENERATIONS
    for generation, asked in enumerate(reference):
        records = ledger.evaluations(generation)
        assert [r.index for r in records] == list(range(POPSIZE))
        assert not any(r.failed for r in records)
        for record, genotype, score in zip(records, asked.genotypes, asked.scores, strict=True):
            np.testing.assert_array_equal(np.asarray(record.genotype), genotype)
            assert record.score == score
    scores = [score for asked in reference for score in asked.scores]
    assert len(set(scores)) > 1, "every candidate scored the same: the comparison would not tell them apart"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"fitness": {"tasks": [{"name": "tiny_mc", "metric": "acc"}], "strategy": "racing"}}, "racing"),
    ],
)
def test_reference_loop_refuses_what_only_the_real_search_does(tiny_sources, tiny_evals, tmp_path, override, named):
    recipe = parse_recipe(tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run", **override))
    with pytest.raises(MergerError, match=named):
        run_reference_loop(recipe, 1)
