"""fitness.aggregate: the weighted mean (default), the worst task, or the mean with a per-task floor; the
summary and the table show each model's worst task beside its mean."""

from __future__ import annotations

import json

import pytest
import yaml

from merger.common.errors import MergerError
from merger.finish.final import finish_run
from merger.recipe import FitnessSet, parse_recipe
from merger.report.page import score_table_html
from merger.rundir.layout import RunDir
from merger.rundir.render import score_grid, text_table
from merger.scoring.fitness import fitness_score
from merger.search.loop import Search
from merger.search.open import open_run, prepare_run_dir
from tests.recipes import tiny_recipe

SCORES = {"a": 0.9, "b": 0.6, "c": 0.1}  # a known table: three tasks, weights 2, 1, 1


def fitness_set(**fields: object) -> FitnessSet:
    tasks = [{"name": "a", "weight": 2.0}, {"name": "b"}, {"name": "c"}]
    return FitnessSet.model_validate({"tasks": tasks, **fields})


def test_each_aggregate_on_a_known_table():
    mean = (2 * 0.9 + 0.6 + 0.1) / 4
    assert fitness_score(SCORES, fitness_set()) == pytest.approx(mean)
    assert fitness_score(SCORES, fitness_set(aggregate="mean")) == pytest.approx(mean)
    assert fitness_score(SCORES, fitness_set(aggregate="worst")) == pytest.approx(0.1)
    # c misses 0.2 of a 0.3 floor: two thirds of its weight's share (1/4) is taken off the mean
    floored = fitness_score(SCORES, fitness_set(aggregate="floor", floor=0.3))
    assert floored == pytest.approx(mean - (1 / 4) * (0.2 / 0.3))
    # every task at or above the floor: the mean itself
    assert fitness_score(SCORES, fitness_set(aggregate="floor", floor=0.1)) == pytest.approx(mean)
    # nothing scored anywhere: the lowest the floor rule gives
    zeros = dict.fromkeys(SCORES, 0.0)
    assert fitness_score(zeros, fitness_set(aggregate="floor", floor=0.5)) == pytest.approx(-1.0)


def test_the_floor_rule_ranks_a_dropped_skill_below_a_balanced_model():
    dropped, balanced = {"a": 0.9, "b": 0.9, "c": 0.0}, {"a": 0.5, "b": 0.5, "c": 0.4}
    plain = fitness_set()
    assert fitness_score(dropped, plain) > fitness_score(balanced, plain)
    for aggregate in (fitness_set(aggregate="worst"), fitness_set(aggregate="floor", floor=0.3)):
        assert fitness_score(dropped, aggregate) < fitness_score(balanced, aggregate)


@pytest.mark.parametrize(
    ("fitness", "message"),
    [
        ({"aggregate": "worst", "strategy": "racing"}, "fitness: aggregate: worst needs strategy: full"),
        ({"aggregate": "floor", "floor": 0.3, "strategy": "anchors"}, "needs strategy: full"),
        ({"aggregate": "floor"}, "fitness: floor goes with aggregate: floor"),
        ({"aggregate": "worst", "floor": 0.3}, "fitness: floor goes with aggregate: floor"),
        ({"aggregate": "median"}, "aggregate"),
        ({"aggregate": "floor", "floor": 0.0}, "floor"),
    ],
)
def test_bad_aggregates_are_refused_in_one_line(tiny_sources, tiny_evals, tmp_path, fitness, message):
    data = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run", fitness=fitness)
    with pytest.raises(MergerError, match=message) as error:
        parse_recipe(data)
    assert "\n" not in str(error.value)


@pytest.mark.slow  # a search and its end
def test_a_worst_task_search_records_the_worst_task_and_the_summary_shows_it(
    tiny_sources, tiny_evals, tmp_path
):
    tasks = [{"name": "tiny_mc", "metric": "acc"}, {"name": "tiny_gen", "metric": "exact_match"}]
    data = tiny_recipe(
        tiny_sources,
        tiny_evals,
        tmp_path / "run",
        optimizer={"popsize": 4, "max_evaluations": 4, "seed": 3},
        fitness={"tasks": tasks, "limit": 8, "aggregate": "worst"},
        baselines=["linear"],
        selection={"enabled": False},  # validation scores the fitness tasks again: nothing unseen to select on
    )
    with open_run(parse_recipe(data), tmp_path / "run") as run:
        result = Search(run).run()
        records = run.ledger.evaluations()
        assert len(records) == 4 and not any(r.failed for r in records)
        for record in records:
            assert set(record.scores) == {"tiny_mc", "tiny_gen"}
            assert record.score == min(record.scores.values()) and record.objective == -record.score
        summary = finish_run(run, result)

    written = json.loads(RunDir(tmp_path / "run").summary.read_text())
    assert written["winner"]["score"] == result.best.score
    rows = [written["winner"], *written["sources"].values(), *written["baselines"].values()]
    for row in rows:
        for split in ("fitness", "validation", "test"):
            across, by_task = row["across_tasks"][split], row[split]
            assert across["worst"] == min(by_task.values()) and by_task[across["worst_task"]] == across["worst"]
            assert across["mean"] == pytest.approx(sum(by_task.values()) / len(by_task))
    table = text_table(score_grid(summary)).splitlines()
    assert "fitness:(mean)" in table[0] and "fitness:(worst)" in table[0]
    assert "validation:(worst)" not in table[0]  # one task: its column says it all
    winner_row = next(line for line in table if line.startswith("WINNER"))
    assert f"{written['winner']['across_tasks']['fitness']['worst']:.3f}" in winner_row
    assert "(worst)" in score_table_html(summary)  # `merger report` shows the same columns
    assert "fitness:(worst)" in (tmp_path / "run" / "final" / "README.md").read_text()  # and the model card


def test_a_run_stored_before_aggregate_existed_still_resumes(tiny_sources, tiny_evals, tmp_path):
    """A recipe.yaml without `fitness.aggregate` and `fitness.floor` is the same recipe (the mean)."""
    recipe = parse_recipe(tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run"))
    assert prepare_run_dir(recipe, tmp_path / "run") is False
    stored = RunDir(tmp_path / "run").recipe
    old = yaml.safe_load(stored.read_text())
    del old["fitness"]["aggregate"], old["fitness"]["floor"]
    stored.write_text(yaml.safe_dump(old, sort_keys=False))
    assert prepare_run_dir(recipe, tmp_path / "run") is True
    worst = parse_recipe(tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run", fitness={"aggregate": "worst"}))
    with pytest.raises(MergerError, match="different recipe"):
        prepare_run_dir(worst, tmp_path / "run")
