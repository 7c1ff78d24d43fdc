"""Every item a run scores is counted in one of its phases (search, monitoring, selection, finals), and the
monitoring curve costs a small fixed subset of the validation set."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

import merger.cli
from merger.rundir.layout import RunDir
from merger.rundir.ledger import PHASES, Ledger
from merger.scoring.fitness import TaskSuite
from tests.recipes import tiny_recipe, without_timings, write_recipe


def small(tiny_sources: dict[str, Path], tiny_evals: Path, run_dir: Path, **overrides: Any) -> dict[str, Any]:
    settings = {
        "optimizer": {"popsize": 4, "max_evaluations": 9, "seed": 3},
        "fitness": {"tasks": [{"name": "tiny_mc", "metric": "acc"}], "limit": 8},
        "validation": {"tasks": ["tiny_gen"], "limit": 6},
        "test": {"tasks": ["tiny_mc"], "limit": 5},
        "selection": {"top_k": 2, "block": 2},  # a race of three blocks
        "monitoring": {"limit": 2},
        "baselines": ["linear"],
    }
    return tiny_recipe(tiny_sources, tiny_evals, run_dir, **{**settings, **overrides})


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Items lm-eval scored, per eval set size (read from what each call logged)."""
    counted: Counter = Counter()
    run = TaskSuite.run

    def counting(self: TaskSuite, lm: Any, log_samples: bool = False, items: Any = None) -> dict[str, Any]:
        output = run(self, lm, log_samples, items)
        counted["items"] += sum(len(samples) for samples in output.get("samples", {}).values())
        return output

    monkeypatch.setattr(TaskSuite, "run", counting)
    return counted


@pytest.mark.slow  # a whole run
def test_the_phases_add_up_to_what_lm_eval_was_asked(tiny_sources, tiny_evals, tmp_path, asked, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", small(tiny_sources, tiny_evals, tmp_path / "run"))
    assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0
    summary = RunDir(tmp_path / "run").read_summary()
    assert summary is not None and list(summary.costs) == list(PHASES)
    costs = summary.costs
    assert sum(cost.items for cost in costs.values()) == asked["items"]
    assert costs["search"].items == 8 * 8  # two generations of 4 (no warm start: no defaults baseline), 8 items each
    assert costs["monitoring"].items == 2 * 2  # two generations' best, on 2 of the 6 validation items
    # finalists raced on validation: the 2 best candidates, 1 baseline, 3 sources (the winner is one of them)
    assert summary.selection is not None and summary.selection.racing is not None
    assert costs["selection"].items == summary.selection.racing.items
    assert summary.selection.racing.items_without_racing == (2 + 1 + 3) * 6 >= costs["selection"].items
    survivors = [f for f in summary.selection.finalists if f.dropped_after is None]
    assert all(f.items == 6 for f in survivors) and all(f.items < 6 for f in summary.selection.finalists if f not in survivors)
    # the final table: sources and baseline on test only (the winner is chosen on validation, so no
    # decision reads their fitness); the winner on fitness, and on test unless it is one of them (its
    # test scores are reused by identity)
    untuned_finals = 4 * 5
    assert costs["finals"].items in (untuned_finals + 8, untuned_finals + 8 + 5)
    assert all(f.fitness is None for f in summary.selection.finalists if f.kind != "candidate")
    assert all("fitness" not in scores.by_split() for scores in summary.sources.values())
    assert summary.fitness is not None and "fitness" in summary.winner.by_split()
    assert all(cost.seconds > 0 for cost in costs.values())
    out = capsys.readouterr().out
    assert "item-evaluations per phase: search 64" in out
    ledger = Ledger(tmp_path / "run")
    try:
        assert all(g.validation is not None for g in ledger.generations())
        assert {phase: cost.items for phase, cost in ledger.phase_costs().items()} == {
            phase: cost.items for phase, cost in costs.items()
        }
    finally:
        ledger.close()
    assert merger.cli.main(["status", str(tmp_path / "run")]) == 0
    assert f"monitoring 4 ({costs['monitoring'].seconds:.0f} s)" in capsys.readouterr().out


@pytest.mark.slow  # a whole run
def test_the_final_table_of_contenders_scores_only_the_winners_reference_on_test(
    tiny_sources, tiny_evals, tmp_path, asked, capsys
):
    selection = {"top_k": 2, "block": 2, "final_table": "contenders"}
    data = small(tiny_sources, tiny_evals, tmp_path / "run", selection=selection)
    assert merger.cli.main(["run", str(write_recipe(tmp_path / "recipe.yaml", data)), "--no-progress"]) == 0
    summary = RunDir(tmp_path / "run").read_summary()
    assert summary is not None and summary.selection is not None
    costs = summary.costs
    assert sum(cost.items for cost in costs.values()) == asked["items"]
    rows = summary.selection.finalists
    reference = max(
        (i for i, row in enumerate(rows) if row.kind != "candidate" and row.dropped_after is None),
        key=lambda i: (rows[i].selection, -i),
    )
    assert summary.selection.tested == [rows[reference].name]
    untuned = {**summary.sources, **{f"baseline: {name}": block for name, block in summary.baselines.items()}}
    assert [name for name, block in untuned.items() if "test" in block.by_split()] == [rows[reference].name]
    # the reference on test (5 items), the winner on fitness (8) and on test unless it is the reference
    assert costs["finals"].items in (5 + 8, 5 + 8 + 5)
    assert costs["finals"].items == 5 + 8 + (5 if summary.selection.chosen != rows[reference].name else 0)
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "`selection.final_table: contenders`" in card
    stopped = write_recipe(tmp_path / "stopped.yaml", small(tiny_sources, tiny_evals, tmp_path / "stopped", selection=selection))
    with pytest.MonkeyPatch.context() as patch:
        signal_at(patch, "finals")  # the first test-set score: the reference's, after selection
        assert merger.cli.main(["run", str(stopped), "--no-progress"]) == 0
    assert "Run the same command again to resume" in capsys.readouterr().out
    assert RunDir(tmp_path / "stopped").read_summary() is None
    assert merger.cli.main(["run", str(stopped), "--no-progress"]) == 0
    resumed = RunDir(tmp_path / "stopped").read_summary()
    assert resumed is not None
    assert without_timings(resumed.model_dump(mode="json")) == without_timings(summary.model_dump(mode="json"))
    shown = summary.score_rows()  # an untuned model with no score at all is only in the finalists table
    assert all(block.by_split() for block in shown.values())
    assert set(shown) - {"WINNER"} <= set(untuned)
    ledger = Ledger(tmp_path / "run")
    try:
        planned = ledger.meta().planned_items
    finally:
        ledger.close()
    assert planned == 8 * 8 + 2 * 2 + 6 * 6 + 2 * (8 + 5)  # the end prices two models on fitness and test


@pytest.mark.slow  # a search
def test_monitoring_turned_off_scores_no_validation_during_the_search(tiny_sources, tiny_evals, tmp_path, asked):
    data = small(tiny_sources, tiny_evals, tmp_path / "run", monitoring={"enabled": False}, selection={"enabled": False})
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0
    ledger = Ledger(tmp_path / "run")
    try:
        assert all(g.validation is None for g in ledger.generations())
        costs = ledger.phase_costs()
    finally:
        ledger.close()
    assert costs["monitoring"].items == 0 and costs["selection"].items == 0
    assert sum(cost.items for cost in costs.values()) == asked["items"]
    summary = RunDir(tmp_path / "run").read_summary()  # the winner by fitness: the untuned models' fitness is read
    assert summary is not None and all("fitness" in scores.by_split() for scores in summary.sources.values())


def test_a_monitoring_subset_larger_than_the_validation_set_is_one_line(
    tiny_sources, tiny_evals, tmp_path, capsys
):
    data = small(tiny_sources, tiny_evals, tmp_path / "run", monitoring={"limit": 7})
    assert merger.cli.main(["run", str(write_recipe(tmp_path / "r.yaml", data)), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "monitoring.limit: 7 items per task is more than the validation set holds" in error
    assert not (tmp_path / "run").exists()


def test_a_monitoring_subset_larger_than_a_whole_validation_task_is_one_line(
    tiny_sources, tiny_evals, tmp_path, capsys
):
    data = small(tiny_sources, tiny_evals, tmp_path / "run", monitoring={"limit": 10_000})
    data["validation"] = {"tasks": ["tiny_gen"]}  # no limit: the task's own size bounds the subset
    assert merger.cli.main(["run", str(write_recipe(tmp_path / "r.yaml", data)), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "monitoring.limit: 10000 items per task is more than validation task tiny_gen" in error
    assert not (tmp_path / "run").exists()


def signal_at(monkeypatch: pytest.MonkeyPatch, phase: str) -> None:
    """SIGTERM to this process when lm-eval is first asked to score for `phase` (no timing involved): the
    fitness set is tiny_mc on 8 items, the test set tiny_mc on 5 (the end scores the untuned models on it
    before selection starts); the validation set is monitored during the search and raced after."""
    run = TaskSuite.run
    sent = False
    ending = False  # the end of the run has started (a test-set score was asked for)

    def is_phase(suite: TaskSuite) -> bool:
        nonlocal ending
        names, limit = [task.name for task in suite.eval_set.tasks], suite.eval_set.limit
        test = names == ["tiny_mc"] and limit == 5
        ending = ending or test
        return {
            "search": names == ["tiny_mc"] and limit == 8,
            "monitoring": names == ["tiny_gen"] and not ending,
            "selection": names == ["tiny_gen"] and ending,
            "finals": test,
        }[phase]

    def signalling(self: TaskSuite, lm: Any, log_samples: bool = False, items: Any = None) -> dict[str, Any]:
        nonlocal sent
        if not sent and is_phase(self):
            sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return run(self, lm, log_samples, items)

    monkeypatch.setattr(TaskSuite, "run", signalling)


@pytest.mark.slow  # an uninterrupted run, and per phase a run stopped in it and resumed
def test_a_stop_in_any_phase_exits_0_and_resumes_to_the_same_result(tiny_sources, tiny_evals, tmp_path, capsys):
    reference_recipe = write_recipe(tmp_path / "ref.yaml", small(tiny_sources, tiny_evals, tmp_path / "ref"))
    assert merger.cli.main(["run", str(reference_recipe), "--no-progress"]) == 0
    reference = RunDir(tmp_path / "ref").read_summary()
    for phase in PHASES:
        run_dir = tmp_path / phase
        recipe = write_recipe(tmp_path / f"{phase}.yaml", small(tiny_sources, tiny_evals, run_dir))
        with pytest.MonkeyPatch.context() as patch:
            signal_at(patch, phase)
            capsys.readouterr()
            assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0, phase
        assert "Run the same command again to resume" in capsys.readouterr().out, phase
        assert RunDir(run_dir).read_summary() is None, phase
        assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0, phase
        resumed = RunDir(run_dir).read_summary()
        assert resumed is not None and reference is not None, phase
        assert without_timings(resumed.model_dump(mode="json")) == without_timings(reference.model_dump(mode="json")), phase


@pytest.mark.slow  # a whole run after the stopped one
def test_a_stop_while_the_run_opens_exits_0_and_the_next_sitting_runs_it(
    tiny_sources, tiny_evals, tmp_path, capsys, monkeypatch
):
    """SIGTERM while the sources load (or the zoo builds, which checks the stop between steps)."""
    import merger.search.open as opening
    from merger.common.stopping import check_stop

    recipe = write_recipe(tmp_path / "r.yaml", small(tiny_sources, tiny_evals, tmp_path / "run"))
    real = opening.make_executor

    def signalled_while_loading(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        check_stop()  # what the zoo build does between its steps
        return real(*args, **kwargs)

    monkeypatch.setattr(opening, "make_executor", signalled_while_loading)
    assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0
    assert "stopped while opening the run" in capsys.readouterr().out
    monkeypatch.setattr(opening, "make_executor", real)
    assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0
    assert RunDir(tmp_path / "run").read_summary() is not None


@pytest.mark.slow  # a search
def test_status_prices_the_end_of_a_run_before_it_starts(tiny_sources, tiny_evals, tmp_path, capsys):
    """Stopped after the search: the end is priced at most every finalist on every validation item and
    every final model on the fitness and test sets."""
    data = small(tiny_sources, tiny_evals, tmp_path / "run")
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    with pytest.MonkeyPatch.context() as patch:
        signal_at(patch, "finals")
        assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0
    capsys.readouterr()
    assert merger.cli.main(["status", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    ledger = Ledger(tmp_path / "run")
    try:
        spent = ledger.phase_costs()["finals"].items  # what the end scored before the stop
    finally:
        ledger.close()
    finalists, final_models = 2 + 1 + 3, 1 + 3 + 1  # top_k, the baseline, the sources; and the winner
    assert f"then the end of the run: at most {finalists * 6 + final_models * (8 + 5) - spent} items" in out


@pytest.mark.slow  # a whole run
def test_the_progress_bar_covers_every_phase_and_ends_at_100_percent(tiny_sources, tiny_evals, tmp_path, monkeypatch):
    from tqdm import tqdm

    shown: list[tuple[int, int | None]] = []
    close = tqdm.close

    def closing(self: tqdm) -> None:
        shown.append((self.n, self.total))
        close(self)

    monkeypatch.setattr(tqdm, "close", closing)
    recipe = write_recipe(tmp_path / "recipe.yaml", small(tiny_sources, tiny_evals, tmp_path / "run"))
    assert merger.cli.main(["run", str(recipe)]) == 0  # with the bar
    summary = RunDir(tmp_path / "run").read_summary()
    assert summary is not None
    spent = sum(cost.items for cost in summary.costs.values())
    assert (spent, spent) in shown  # every phase's items, and the bar full at the end
    ledger = Ledger(tmp_path / "run")
    try:
        planned = ledger.meta().planned_items
    finally:
        ledger.close()
    assert planned is not None and spent <= planned == 8 * 8 + 2 * 2 + 6 * 6 + 5 * (8 + 5)


def test_a_selection_block_below_one_is_one_line(tiny_sources, tiny_evals, tmp_path, capsys):
    data = small(tiny_sources, tiny_evals, tmp_path / "run", selection={"block": 0})
    assert merger.cli.main(["run", str(write_recipe(tmp_path / "r.yaml", data)), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "selection.block: Input should be greater than or equal to 1" in error
    assert not (tmp_path / "run").exists()


def test_the_stored_recipe_reads_back_with_the_monitoring_default(tiny_sources, tiny_evals, tmp_path):
    """recipe.yaml holds every field: the default subset (cut to a 6-item validation set) reads back."""
    from merger.recipe import parse_recipe, recipe_to_yaml

    data = small(tiny_sources, tiny_evals, tmp_path / "run")
    data.pop("monitoring")
    recipe = parse_recipe(data)
    stored = parse_recipe(yaml.safe_load(recipe_to_yaml(recipe)))
    assert stored == recipe and stored.monitoring.items_per_task == 100
    assert parse_recipe({**data, "monitoring": {"limit": "all"}}).monitoring.items_per_task is None
