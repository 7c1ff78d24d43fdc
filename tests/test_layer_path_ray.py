"""A layer-path search on Ray (2 one-CPU workers) gives the in-process result, also when both workers
are SIGKILLed mid-generation and replaced."""

from __future__ import annotations

import pytest

from tests.test_layer_path import dfs_recipe
from tests.test_ray import (  # noqa: F401 - ray_session is a fixture
    RAY,
    assert_same_search,
    kill_workers_once,
    ray_session,
    run_search,
)

pytestmark = pytest.mark.slow  # local Ray and several worker processes


@pytest.mark.usefixtures("ray_session")
def test_layer_path_on_ray_with_workers_killed_gives_the_in_process_result(
    tiny_sources,
    tiny_evals,
    tmp_path,
):
    data = dfs_recipe(tiny_sources, tiny_evals, tmp_path / "run", scales="per_slot", fix_ends=True)
    in_process = run_search(data, tmp_path / "in_process")
    killed: list[int] = []
    on_ray = run_search({**data, "executor": RAY}, tmp_path / "ray", kill_workers_once(killed))
    result, records, recorded = on_ray
    assert len(killed) == 2 and len(recorded) == len(set(recorded)) == 9
    assert not any(r.failed for r in records)
    assert_same_search(on_ray, in_process)
