"""The Ray executor on a local Ray with 2 one-CPU workers: same results as in-process, dead workers replaced."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from merger.common.errors import MergerError
from merger.executors import ScoreResult
from merger.executors.in_process import InProcessExecutor
from merger.executors.jobs import score_models
from merger.executors.ray_executor import RayExecutor
from merger.recipe import parse_recipe
from merger.rundir.ledger import Ledger
from merger.search.loop import Search
from merger.search.open import open_run
from merger.space.parameters import Genome
from tests.cli import REPO
from tests.recipes import write_recipe
from tests.test_overnight import recipe_data, run_here

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # local Ray and several worker processes

RAY = {"kind": "ray", "num_workers": 2, "cpus_per_worker": 1}


def kill_workers_once(killed: list[int]) -> Callable[[RayExecutor, Any], None]:
    """A per-record hook that SIGKILLs every worker at the first record (their pids go into `killed`):
    after generation 0's first record, the other worker is busy with candidate 1."""

    def on_record(executor: RayExecutor, record: Any) -> None:
        if not killed:
            killed.extend(executor.worker_pids)
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    return on_record


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module (start-up costs seconds); executors reuse it and leave it running."""
    if ray.is_initialized():  # started by another module: use it as it is
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def search_data(tiny_sources, tiny_evals) -> dict[str, Any]:
    return recipe_data(tiny_sources, tiny_evals)


def run_search(data: dict[str, Any], run_dir: Path, on_record=None) -> tuple[Any, Any, list]:
    """Run a search to its end; returns (result, ledger evaluations, the (generation, index) recorded)."""
    recorded: list[tuple[int, int]] = []
    with open_run(parse_recipe(data), run_dir) as run:

        def progress(info: dict) -> None:
            if "record" in info:
                recorded.append((info["generation"], info["record"].index))
                if on_record is not None:
                    on_record(run.executor, info["record"])

        return Search(run, progress).run(), run.ledger.evaluations(), recorded


@pytest.fixture(scope="module")
def in_process_run(search_data, tmp_path_factory):
    return run_search(search_data, tmp_path_factory.mktemp("in_process"))


def assert_same_search(ray_run: tuple, in_process: tuple) -> None:
    (result, records, _), (reference, reference_records, _) = ray_run, in_process
    assert result.best.genotype == pytest.approx(reference.best.genotype)
    assert result.best.score == reference.best.score
    assert (result.best.generation, result.best.index) == (reference.best.generation, reference.best.index)
    assert [(r.generation, r.index, r.score) for r in records] == [
        (r.generation, r.index, r.score) for r in reference_records
    ]
    for ours, theirs in zip(records, reference_records, strict=True):
        assert ours.genotype == pytest.approx(theirs.genotype)


def test_ray_gives_the_in_process_result(ray_session, search_data, in_process_run, tmp_path):
    ray_run = run_search({**search_data, "executor": RAY}, tmp_path / "ray")
    assert_same_search(ray_run, in_process_run)
    assert ray.is_initialized()  # an executor leaves a Ray it did not start running


def test_a_worker_killed_mid_generation_is_replaced(ray_session, search_data, in_process_run, tmp_path):
    killed: list[int] = []
    kill_once = kill_workers_once(killed)
    lost_workers: list[int] = []

    def note_losses(executor: RayExecutor, record: Any) -> None:
        kill_once(executor, record)
        lost_workers.append(executor.lost_workers)

    ray_run = run_search({**search_data, "executor": RAY}, tmp_path / "ray", note_losses)
    result, records, recorded = ray_run
    assert len(killed) == 2 and max(lost_workers) >= 1
    assert len(recorded) == len(set(recorded)) == 8  # every candidate recorded once, none twice
    assert [(r.generation, r.index) for r in records] == sorted(recorded)
    assert not any(r.failed for r in records)
    assert_same_search(ray_run, in_process_run)


def test_a_stop_lets_the_candidate_in_flight_finish_and_a_resume_completes_the_run(
    ray_session, search_data, in_process_run, tmp_path
):
    data = {**search_data, "executor": RAY}
    first, before = run_here(data, tmp_path / "ray", stop_after=1)  # as the first SIGTERM would
    assert first.stopped_early
    assert len(before) == 2  # nothing new started, the other worker's candidate finished and was recorded
    resumed, after = run_here(data, tmp_path / "ray")
    assert len(after) == 6 and not set(before) & set(after)
    ledger = Ledger(tmp_path / "ray")
    assert_same_search((resumed, ledger.evaluations(), after), in_process_run)
    ledger.close()


def test_a_stop_asked_for_ends_the_job_in_flight_on_a_worker_unreported(ray_session, tiny_sources, tmp_path):
    """SIGINT/SIGTERM reaches the actors: the job in flight ends at its next lm-eval batch, not at its end."""
    from merger.common.stopping import clear_stop, request_stop
    from merger.executors import ScoreJob
    from merger.scoring.items import as_request
    from tests.tiny_models import write_mc_task

    # 20,000 items in batches of 1: a minute for a worker here, were it not stopped; the stop lands within
    # half a second of the short job's result
    write_mc_task(tmp_path / "evals", "long_mc", "plus", seed=1, num_items=20000)
    data = recipe_data(tiny_sources, tmp_path / "evals", executor=RAY)
    data["fitness"] = {"tasks": [{"name": "long_mc", "metric": "acc"}], "batch_size": 1}
    recipe = parse_recipe(data)
    executor = RayExecutor(recipe, tiny_sources, Genome(recipe, tiny_sources, 4))
    short = ScoreJob("short", tiny_sources["base"], "fitness", as_request([("long_mc", 0)]))
    whole = ScoreJob("whole", tiny_sources["base"], "fitness")
    reported: dict[int, ScoreResult] = {}

    def stop_after_the_short_job(index: int, result: ScoreResult) -> None:
        reported[index] = result
        request_stop()  # as the first SIGTERM does, while the other worker is inside the whole set

    try:
        executor.score([whole, short], stop_after_the_short_job)
        assert list(reported) == [1] and reported[1].failure is None  # the whole set's job: not reported
        clear_stop()
        again: dict[int, ScoreResult] = {}
        executor.score([short, short], again.__setitem__)  # the stopped worker scores the next job as usual
        assert sorted(again) == [0, 1] and again[0].values == again[1].values == reported[1].values
    finally:
        clear_stop()
        executor.close()


def test_starting_ray_keeps_the_runs_sigterm_handler(search_data, tmp_path):
    """ray.init replaces SIGTERM's handler with sys.exit; a run's stop must survive the executor starting Ray."""
    import subprocess
    import sys

    recipe = write_recipe(tmp_path / "recipe.yaml", {**search_data, "executor": RAY})
    script = f"""
import signal
from pathlib import Path

from merger.common.stopping import StopRequest
from merger.executors.ray_executor import RayExecutor
from merger.recipe import load_recipe
from merger.sources.resolve import resolve_checked
from merger.space.parameters import Genome

recipe = load_recipe(Path({str(recipe)!r}))
sources, _ = resolve_checked(recipe)
with StopRequest():
    handler = signal.getsignal(signal.SIGTERM)
    executor = RayExecutor(recipe, sources, Genome(recipe, sources, 4))
    try:
        print("kept" if signal.getsignal(signal.SIGTERM) == handler else "replaced")
    finally:
        executor.close()
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.split()[-1:] == ["kept"], done.stderr[-2000:]


def test_final_scoring_is_spread_over_the_workers_and_survives_losing_them(
    ray_session, search_data, tiny_sources
):
    recipe = parse_recipe({**search_data, "executor": RAY})
    jobs = [(path, "fitness") for path in tiny_sources.values()]
    genome = Genome(recipe, tiny_sources, 4)
    expected = score_models(InProcessExecutor(recipe, tiny_sources, genome), jobs)
    executor = RayExecutor(recipe, tiny_sources, genome)
    try:
        for pid in executor.worker_pids:  # both die before the first job reaches them
            os.kill(pid, signal.SIGKILL)
        reported: dict[int, ScoreResult] = {}  # as each job finishes (the end of a run keeps them)
        scores = score_models(executor, jobs + jobs, reported.__setitem__)
        assert executor.lost_workers == 2  # both slots were given a job (one worker would lose one)
    finally:
        executor.close()
    assert scores == expected + expected
    assert [reported[job].scored for job in range(len(scores))] == scores


def test_workers_that_do_not_fit_the_cluster_are_refused(ray_session, search_data, tiny_sources):
    recipe = parse_recipe({**search_data, "executor": {**RAY, "num_workers": 3}})
    with pytest.raises(MergerError, match="3 workers need 3 CPU"):
        RayExecutor(recipe, tiny_sources, Genome(recipe, tiny_sources, 4))


def test_a_worker_that_cannot_load_is_a_clear_error(ray_session, search_data, tiny_sources):
    recipe = parse_recipe({**search_data, "executor": RAY, "engine": {"device": "cuda:99"}})
    with pytest.raises(MergerError, match="a Ray worker could not load the sources and tasks: .*Error"):
        RayExecutor(recipe, tiny_sources, Genome(recipe, tiny_sources, 4))


def test_ray_with_fresh_randomness_draws_what_in_process_draws(ray_session, tiny_sources, tiny_evals, tmp_path):
    """DARE masks keyed by genotype: two workers, each merging some candidates, give the in-process ledger
    (every candidate's weights digest included)."""
    from tests.test_fresh_randomness import fresh_data

    data = fresh_data(tiny_sources, tiny_evals)
    in_process = run_search(data, tmp_path / "in_process")
    ray_run = run_search({**data, "executor": RAY}, tmp_path / "ray")
    assert_same_search(ray_run, in_process)
    digests = [[r.digest for r in run[1]] for run in (ray_run, in_process)]
    assert digests[0] == digests[1] and len(set(digests[0])) == len(digests[0])
