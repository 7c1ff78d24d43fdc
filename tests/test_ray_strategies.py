"""Racing and anchors on Ray (2 one-CPU workers) give the in-process result, a killed worker included."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from merger.executors.ray_executor import RayExecutor
from tests.test_ray import RAY, ray_session, run_search  # noqa: F401 (ray_session is a fixture)
from tests.test_search_efficiency import ledger_state, strategy_data

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # local Ray and several worker processes


@pytest.mark.parametrize("strategy", ["racing", "anchors"])
def test_ray_gives_the_in_process_result(strategy, ray_session, tiny_sources, tiny_evals, tmp_path):  # noqa: F811
    data = strategy_data(tiny_sources, tiny_evals, strategy, x0="grid", max_evaluations=13)
    reference = run_search(data, tmp_path / "in_process")
    killed: list[int] = []

    def kill_workers_once(executor: RayExecutor, record: Any) -> None:
        if not killed:
            killed.extend(executor.worker_pids)
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    result = run_search({**data, "executor": RAY}, tmp_path / "ray", kill_workers_once)
    assert killed
    assert result[0].best.score == reference[0].best.score
    assert result[0].best.genotype == pytest.approx(reference[0].best.genotype)
    ours, theirs = ledger_state(tmp_path / "ray"), ledger_state(tmp_path / "in_process")
    assert ours[1:] == theirs[1:]  # the same estimates and the same item outcomes
    assert [row[:2] + row[3:] for row in ours[0]] == [row[:2] + row[3:] for row in theirs[0]]
