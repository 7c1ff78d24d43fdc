"""The trade-off between skills: with several validation tasks the finalists table shows each task's score
and marks the front (no other finalist better on every task); `merger run --member NAME` exports a front
member instead of the rule's winner, and what it exports is what was scored."""

from __future__ import annotations

import pytest

import merger.cli
from merger.common.errors import MergerError
from merger.engine.weights import checkpoint_digest, parameter_names
from merger.finish.front import dominates, pareto_front
from merger.finish.models import FinalModel
from merger.finish.selection import Contender, choose, selection_note
from merger.recipe import SelectionSpec
from merger.report.report import write_report
from merger.rundir.layout import RunDir
from merger.rundir.ledger import Ledger
from merger.rundir.render import finalist_grid, text_table
from merger.rundir.summary import Finalist
from tests.cli import assert_one_line_error, run_merger
from tests.recipes import tiny_recipe, write_recipe
from tests.tiny_models import write_mc_task

KNOWN = {  # name: (kind, add, sort); the front: linear, gen 2 #1, sort, gen 1 #0 (tied with gen 2 #1 on both)
    "baseline: linear": ("baseline", 0.60, 0.30),
    "add": ("source", 0.70, 0.05),
    "sort": ("source", 0.10, 0.66),
    "gen 2 #1": ("candidate", 0.72, 0.10),
    "gen 1 #0": ("candidate", 0.72, 0.10),
    "gen 1 #3": ("candidate", 0.55, 0.30),
}


def known_rows(dropped: str | None = None) -> list[Finalist]:
    rows = []
    for name, (kind, add, sort) in KNOWN.items():
        rows.append(
            Finalist(
                name=name, kind=kind, fitness=0.5, selection=(add + sort) / 2, tasks={"add": add, "sort": sort},
                dropped_after=200 if name == dropped else None,
            )
        )
    return rows


def test_the_front_of_a_known_table():
    assert dominates({"a": 0.6, "b": 0.3}, {"a": 0.55, "b": 0.3})
    assert not dominates({"a": 0.7, "b": 0.1}, {"a": 0.7, "b": 0.1})  # equals: neither dominates
    assert not dominates({"a": 0.7, "b": 0.05}, {"a": 0.6, "b": 0.3})
    # add (0.70, 0.05) loses to gen 2 #1 (0.72, 0.10) on both; gen 1 #3 to linear (0.60, 0.30)
    assert pareto_front(known_rows()) == ["baseline: linear", "sort", "gen 2 #1", "gen 1 #0"]
    # a finalist the race dropped was scored on fewer items: it is neither on the front nor in its way
    assert pareto_front(known_rows(dropped="baseline: linear")) == ["sort", "gen 2 #1", "gen 1 #0", "gen 1 #3"]
    one_task = [row.model_copy(update={"tasks": {"add": row.tasks["add"]}}) for row in known_rows()]
    assert pareto_front(one_task) is None


def contenders() -> list[Contender]:
    return [Contender(FinalModel(name, None, f"id:{name}"), kind, name) for name, (kind, _, _) in KNOWN.items()]


def test_the_finalists_table_shows_each_task_and_marks_the_front():
    winner, selection = choose(contenders(), known_rows(), SelectionSpec(rule="best"))
    assert winner.name == "baseline: linear" and selection.front == pareto_front(known_rows())
    header, rows = finalist_grid(selection)
    assert header[-4:] == ["add", "sort", "front", ""]
    marked = {row[0] for row in rows if row[-2] == "*"}
    assert marked == set(selection.front or [])
    text = text_table((header, rows))
    assert "0.660" in text and "<- winner" in text


def test_a_front_member_is_chosen_by_name_and_only_from_the_front():
    winner, selection = choose(contenders(), known_rows(), SelectionSpec(rule="confident"), member="sort")
    assert winner.name == "sort" and selection.chosen == "sort" and selection.member == "sort"
    note = selection_note(selection)
    assert note is not None and "'sort'" in note and "sort 0.660" in note and "\n" not in note
    with pytest.raises(MergerError, match="'add' is not on the run's front; its front: baseline: linear; sort"):
        choose(contenders(), known_rows(), SelectionSpec(rule="best"), member="add")
    one_task = [row.model_copy(update={"tasks": {"add": row.tasks["add"]}}) for row in known_rows()]
    with pytest.raises(MergerError, match="one task"):
        choose(contenders(), one_task, SelectionSpec(rule="best"), member="add")


def two_task_recipe(tiny_sources, tiny_evals, tmp_path):
    extra = tmp_path / "evals"
    write_mc_task(extra, "front_plus", "plus", seed=11)
    write_mc_task(extra, "front_minus", "minus", seed=12)
    return tiny_recipe(
        tiny_sources, tiny_evals, tmp_path / "run",
        optimizer={"popsize": 4, "max_evaluations": 5, "seed": 3},
        fitness={"tasks": [{"name": "tiny_mc", "metric": "acc"}], "limit": 8},
        validation={"tasks": [{"name": "front_plus", "metric": "acc"}, {"name": "front_minus", "metric": "acc"}]},
        selection={"top_k": 3, "rule": "best", "block": None},
        task_paths=[str(tiny_evals), str(extra)],
    )


def test_member_on_a_run_that_has_not_finished_is_one_line(tmp_path, tiny_sources, tiny_evals):
    recipe = write_recipe(tmp_path / "recipe.yaml", two_task_recipe(tiny_sources, tiny_evals, tmp_path))
    process = run_merger("run", str(recipe), "--member", "gen 0 #1")
    assert_one_line_error(process, "--member 'gen 0 #1'", "no finished run")
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


@pytest.mark.slow  # a whole run, then its end again with a front member
def test_a_front_member_is_exported_as_scored(tiny_sources, tiny_evals, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", two_task_recipe(tiny_sources, tiny_evals, tmp_path))
    assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0
    assert "front" in capsys.readouterr().out
    layout = RunDir(tmp_path / "run")
    summary = layout.read_summary()
    assert summary is not None and summary.selection is not None
    front = summary.selection.front
    assert front is not None and summary.selection.member is None
    rows = {row.name: row for row in summary.selection.finalists}
    assert all(set(row.tasks or {}) == {"front_plus", "front_minus"} for row in rows.values())
    assert front == pareto_front(summary.selection.finalists)
    others = [name for name in front if name != summary.selection.chosen]
    assert others, f"the fixture's front has one member: {front}"
    member = others[0]

    refused = run_merger("run", str(recipe), "--member", "no such finalist")
    assert_one_line_error(refused, "'no such finalist' is not on the run's front", front[0])

    assert merger.cli.main(["run", str(recipe), "--no-progress", "--member", member]) == 0
    assert f"the front member {member!r}" in capsys.readouterr().out
    chosen = layout.read_summary()
    assert chosen is not None and chosen.selection is not None
    assert chosen.selection.chosen == member and chosen.selection.member == member
    assert chosen.winner.validation == rows[member].tasks  # the member's scores are the winner's
    if rows[member].kind == "baseline":
        name = member.removeprefix("baseline: ")
        assert layout.best_config.read_text() == layout.baseline_config(name).read_text()
    elif rows[member].kind == "source":
        source = tiny_sources[member]
        names = parameter_names(source)
        assert checkpoint_digest(layout.final, names) == checkpoint_digest(source, names)
    else:  # a candidate: final/ holds the weights its ledger row's digest names
        generation, index = (int(part) for part in member.removeprefix("gen ").split(" #"))
        ledger = Ledger(layout.path)
        try:
            record = next(r for r in ledger.evaluations(generation) if r.index == index)
        finally:
            ledger.close()
        assert checkpoint_digest(layout.final, parameter_names(layout.final)) == record.digest
    files = write_report(layout.path)
    assert files.front_plot is not None and files.front_plot.stat().st_size > 0
    assert "front.png" in files.html.read_text()
