"""MLflow tracking against a real SQLite store in a temporary directory (no mock): what a run logs live,
resuming into the same MLflow run, a store that breaks mid-run, `merger track sync`, and bad input."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import merger.cli
from merger.rundir.layout import RunDir
from merger.scoring.fitness import TaskSuite
from tests.cli import assert_one_line_error, run_merger
from tests.recipes import tiny_recipe, without_timings, write_recipe

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from merger.tracking.mlflow_store import RUN_DIR_TAG  # noqa: E402
from merger.tracking.tracker import metric_name  # noqa: E402


def tracked(tiny_sources: dict[str, Path], tiny_evals: Path, run_dir: Path, store: Path, **overrides: Any) -> dict[str, Any]:
    settings = {
        "optimizer": {"popsize": 4, "max_evaluations": 9, "seed": 3},
        "fitness": {"tasks": [{"name": "tiny_mc", "metric": "acc"}], "limit": 8},
        "validation": {"tasks": ["tiny_gen"], "limit": 6},
        "test": {"tasks": ["tiny_mc"], "limit": 5},
        "selection": {"top_k": 2, "block": 2},
        "monitoring": {"limit": 2},
        "baselines": ["linear"],
        "tracking": {"uri": f"sqlite:///{store}", "experiment": "tiny"},
    }
    return tiny_recipe(tiny_sources, tiny_evals, run_dir, **{**settings, **overrides})


def runs_of(store: Path, run_dir: Path) -> list[Any]:
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    ids = [experiment.experiment_id for experiment in client.search_experiments()]
    return client.search_runs(ids, filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir.resolve()}'")


def histories(store: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric's (step, value) pairs, in the order of steps."""
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    keys = client.get_run(run_id).data.metrics
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def no_step_twice(history: dict[str, list[tuple[int, float]]]) -> None:
    for key, points in history.items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), key


@pytest.fixture(scope="module")
def live_run(tiny_sources, tiny_evals, tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, store) of a whole tracked run that publishes its winner."""
    root = tmp_path_factory.mktemp("tracked")
    store = root / "mlflow.db"
    output = {"run_dir": str(root / "run"), "publish": "tiny-winner", "registry": str(root / "registry")}
    recipe = write_recipe(root / "r.yaml", tracked(tiny_sources, tiny_evals, root / "run", store, output=output))
    assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0
    return root / "run", store


@pytest.mark.slow  # a whole run
def test_a_tracked_run_logs_every_candidate_generation_and_finalist(live_run) -> None:
    run_dir, store = live_run
    summary = RunDir(run_dir).read_summary()
    assert summary is not None and summary.selection is not None
    (found,) = runs_of(store, run_dir)  # one MLflow run for the run directory
    assert found.info.status == "FINISHED"
    history = histories(store, found.info.run_id)
    no_step_twice(history)
    assert [step for step, _ in history["search/fitness"]] == list(range(summary.evaluations or 0))
    for key in ("fitness_se", "items", "merge_seconds", "eval_seconds", "failed"):
        assert len(history[f"search/{key}"]) == summary.evaluations, key
    for key in ("generation/best", "generation/mean", "monitoring/tiny_gen"):
        assert [step for step, _ in history[key]] == list(range(summary.generations or 0)), key
    for finalist in summary.selection.finalists:
        name = metric_name(finalist.name)  # "gen 2 #7" -> "gen 2 7", "baseline: linear" -> "baseline linear"
        assert history[f"table/selection/{name}"] == [(0, pytest.approx(finalist.selection))], name
    assert history["table/test/WINNER/tiny_mc"] == [(0, pytest.approx(summary.winner.test["tiny_mc"]))]
    tags, params = found.data.tags, found.data.params
    assert tags["merger.chosen"] == summary.selection.chosen and tags["merger.decision"]
    assert tags["merger.registry"] == "tiny-winner@1"
    assert params["genome.method"] == "ties" and params["run.seed"] == "3"
    assert params["source.base.digest"] == summary.lineage["base"].sha256
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    artifacts = {item.path for item in client.list_artifacts(found.info.run_id)}
    assert {"summary.json", "best.yaml", "recipe.yaml", "README.md"} <= artifacts
    registry = run_dir.parent / "registry"
    assert merger.cli.main(["publish", str(run_dir), "--name", "again", "--registry", str(registry)]) == 0
    assert client.get_run(found.info.run_id).data.tags["merger.registry"] == "again@1"


@pytest.mark.slow  # a sync of a whole run
def test_sync_from_the_ledger_logs_what_live_logging_did(live_run, tmp_path) -> None:
    run_dir, store = live_run
    (live,) = runs_of(store, run_dir)
    other = tmp_path / "other.db"
    assert merger.cli.main(["track", "sync", str(run_dir), "--uri", f"sqlite:///{other}"]) == 0
    (synced,) = runs_of(other, run_dir)
    live_history, synced_history = histories(store, live.info.run_id), histories(other, synced.info.run_id)
    assert live_history == synced_history  # the same numbers, seconds included: both read the ledger
    assert synced.data.tags["merger.chosen"] == live.data.tags["merger.chosen"]
    # a second sync finds the same run and adds nothing
    assert merger.cli.main(["track", "sync", str(run_dir), "--uri", f"sqlite:///{other}"]) == 0
    (again,) = runs_of(other, run_dir)
    assert again.info.run_id == synced.info.run_id and histories(other, again.info.run_id) == synced_history


def stop_in_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM once selection asks lm-eval for validation items (after the test set was first asked for)."""
    run = TaskSuite.run
    state = {"ending": False, "sent": False}

    def signalling(self: TaskSuite, lm: Any, log_samples: bool = False, items: Any = None) -> dict[str, Any]:
        names = [task.name for task in self.eval_set.tasks]
        state["ending"] = state["ending"] or names == ["tiny_mc"] and self.eval_set.limit == 5
        if state["ending"] and names == ["tiny_gen"] and not state["sent"]:
            state["sent"] = True
            os.kill(os.getpid(), signal.SIGTERM)
        return run(self, lm, log_samples, items)

    monkeypatch.setattr(TaskSuite, "run", signalling)


@pytest.mark.slow  # a run stopped and resumed
def test_a_resumed_run_continues_its_mlflow_run_and_logs_nothing_twice(tiny_sources, tiny_evals, tmp_path, live_run) -> None:
    store = tmp_path / "mlflow.db"
    recipe = write_recipe(tmp_path / "r.yaml", tracked(tiny_sources, tiny_evals, tmp_path / "run", store))
    with pytest.MonkeyPatch.context() as patch:
        stop_in_selection(patch)
        assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0
    assert RunDir(tmp_path / "run").read_summary() is None
    (stopped,) = runs_of(store, tmp_path / "run")
    assert stopped.info.status == "KILLED"
    assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0
    (resumed,) = runs_of(store, tmp_path / "run")
    assert resumed.info.run_id == stopped.info.run_id and resumed.info.status == "FINISHED"
    history = histories(store, resumed.info.run_id)
    no_step_twice(history)
    live_dir, live_store = live_run  # the same recipe uninterrupted (its publishing aside): the same numbers
    (live,) = runs_of(live_store, live_dir)
    live_history = histories(live_store, live.info.run_id)
    timings = {"search/merge_seconds", "search/eval_seconds"}
    assert {k: v for k, v in history.items() if k not in timings} == {
        k: v for k, v in live_history.items() if k not in timings
    }


@pytest.mark.slow  # two whole runs
def test_a_store_that_breaks_mid_run_warns_once_and_the_run_ends_the_same(
    tiny_sources, tiny_evals, tmp_path, capsys, monkeypatch
) -> None:
    reference = write_recipe(tmp_path / "ref.yaml", tracked(tiny_sources, tiny_evals, tmp_path / "ref", tmp_path / "ref.db", tracking=None))
    assert merger.cli.main(["run", str(reference), "--no-progress"]) == 0
    store = tmp_path / "mlflow.db"
    recipe = write_recipe(tmp_path / "r.yaml", tracked(tiny_sources, tiny_evals, tmp_path / "run", store))
    run = TaskSuite.run
    broken = []

    def breaking(self: TaskSuite, lm: Any, log_samples: bool = False, items: Any = None) -> dict[str, Any]:
        if not broken and [task.name for task in self.eval_set.tasks] == ["tiny_gen"]:  # the first monitoring
            broken.append(True)
            with sqlite3.connect(store) as db:  # the store's tables are gone: every later write fails
                for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
                    db.execute(f"DROP TABLE IF EXISTS {table}")
        return run(self, lm, log_samples, items)

    monkeypatch.setattr(TaskSuite, "run", breaking)
    capsys.readouterr()
    assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "tracking stopped" in line]
    assert len(warnings) == 1 and "merger track sync" in warnings[0]
    ran, expected = RunDir(tmp_path / "run").read_summary(), RunDir(tmp_path / "ref").read_summary()
    assert ran is not None and expected is not None
    assert without_timings(ran.model_dump(mode="json")) == without_timings(expected.model_dump(mode="json"))


def test_an_unknown_tracker_is_one_line(tiny_sources, tiny_evals, tmp_path) -> None:
    recipe = tracked(tiny_sources, tiny_evals, tmp_path / "run", tmp_path / "s.db", tracking={"kind": "wandb"})
    process = run_merger("run", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert_one_line_error(process, "tracking", "mlflow")


def test_a_store_that_cannot_be_opened_is_one_line_before_weights_load(tiny_sources, tiny_evals, tmp_path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    unreachable = f"sqlite:///{tmp_path}/a-file/mlflow.db"  # under a file: no store can be made there
    recipe = tracked(tiny_sources, tiny_evals, tmp_path / "run", tmp_path / "s.db", tracking={"uri": unreachable})
    process = run_merger("run", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert_one_line_error(process, "cannot open the MLflow store", unreachable)
    assert not (tmp_path / "run" / "ledger.sqlite").exists()


def test_tracking_without_mlflow_installed_names_the_extra(tiny_sources, tiny_evals, tmp_path, monkeypatch, capsys) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # what a machine without the extra has
    recipe = write_recipe(tmp_path / "r.yaml", tracked(tiny_sources, tiny_evals, tmp_path / "run", tmp_path / "s.db"))
    assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["merger: error: tracking: mlflow is not installed (pip install 'merger[track]')"]
    assert not (tmp_path / "run" / "ledger.sqlite").exists()


def test_sync_of_a_directory_without_a_run_is_one_line(tmp_path) -> None:
    assert_one_line_error(run_merger("track", "sync", str(tmp_path)), "not a run directory")


@pytest.mark.slow  # a run stopped while it opens, then run whole
def test_a_run_stopped_while_it_opens_still_has_one_mlflow_run(tiny_sources, tiny_evals, tmp_path, monkeypatch) -> None:
    import merger.search.open as opening
    from merger.common.stopping import check_stop

    store = tmp_path / "mlflow.db"
    recipe = write_recipe(tmp_path / "r.yaml", tracked(tiny_sources, tiny_evals, tmp_path / "run", store))
    real = opening.make_executor

    def signalled_while_loading(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        check_stop()
        return real(*args, **kwargs)

    for _ in range(2):
        monkeypatch.setattr(opening, "make_executor", signalled_while_loading)
        assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0
    monkeypatch.setattr(opening, "make_executor", real)
    assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0
    (found,) = runs_of(store, tmp_path / "run")
    assert found.info.status == "FINISHED"
    no_step_twice(histories(store, found.info.run_id))
