"""Racing (independent and paired) and anchors (k-means and IRT) on Ray (2 one-CPU workers) give the
in-process result, a killed worker included."""

from __future__ import annotations

import pytest

from tests.test_ray import (  # noqa: F401 (ray_session is a fixture)
    RAY,
    kill_workers_once,
    ray_session,
    run_search,
)
from tests.test_search_efficiency import ledger_state, strategy_data

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # local Ray and several worker processes


@pytest.mark.parametrize("strategy", ["racing", "paired", "anchors", "anchors-irt"])
def test_ray_gives_the_in_process_result(strategy, ray_session, tiny_sources, tiny_evals, tmp_path):  # noqa: F811
    data = strategy_data(tiny_sources, tiny_evals, strategy, x0="grid", max_evaluations=13)
    reference = run_search(data, tmp_path / "in_process")
    killed: list[int] = []
    result = run_search({**data, "executor": RAY}, tmp_path / "ray", kill_workers_once(killed))
    assert killed
    assert result[0].best.score == reference[0].best.score
    assert result[0].best.genotype == pytest.approx(reference[0].best.genotype)
    ours, theirs = ledger_state(tmp_path / "ray"), ledger_state(tmp_path / "in_process")
    assert ours[1:] == theirs[1:]  # the same estimates and the same item outcomes
    assert [row[:2] + row[3:] for row in ours[0]] == [row[:2] + row[3:] for row in theirs[0]]
