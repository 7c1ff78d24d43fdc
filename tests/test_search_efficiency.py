"""fitness.strategy racing and anchors, the warm-start grid and item budgets, on the tiny fixtures."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import yaml

from merger.commands.status import status_text
from merger.common.errors import MergerError
from merger.executors.in_process import InProcessExecutor
from merger.recipe import EvalSet, parse_recipe
from merger.rundir.ledger import Ledger, source_key
from merger.scoring.items import ItemSet, item_accounting
from merger.search.anchors import choose_anchors
from merger.search.racing import bounds, cuts, ranking_values
from merger.search.strategies import RacingStrategy
from merger.sources.resolve import check_compatible, resolve_sources
from merger.space.parameters import X0_GRID, Genome
from tests.test_overnight import recipe_data, run_here, start_run

STRATEGIES: dict[str, dict[str, Any]] = {
    "full": {"strategy": "full"},
    # a loose bound on all 24 items, so that the tiny fixtures' candidates (all near 0.5) get cut
    "racing": {"strategy": "racing", "limit": 24, "racing": {"block": 2, "bound": "hoeffding", "delta": 0.9}},
    "paired": {"strategy": "racing", "limit": 24, "racing": {"block": 2, "pairing": "paired", "delta": 0.9}},
    "anchors": {"strategy": "anchors", "anchors": {"count": 4}},
    "anchors-irt": {"strategy": "anchors", "anchors": {"count": 4, "method": "irt"}},
}


def strategy_data(tiny_sources: dict[str, Path], tiny_evals: Path, strategy: str, **optimizer: Any) -> dict:
    data = recipe_data(tiny_sources, tiny_evals)
    data["baselines"] = []  # no untuned warm start: the budgets and generations below are the strategies' own
    data["fitness"] = {**data["fitness"], **STRATEGIES[strategy]}
    data["optimizer"] = {**data["optimizer"], **optimizer}
    return data


def one_task_set(name: str, size: int) -> tuple[ItemSet, list[tuple[str, int]]]:
    eval_set = EvalSet(tasks=[{"name": name}])
    item_set = ItemSet.of({name: list(range(size))}, eval_set)
    return item_set, list(item_set.items)


# -- anchors ---------------------------------------------------------------------------------------
def test_anchor_estimate_is_exact_when_items_go_as_their_cluster():
    """Three kinds of item (12, 6, 6 of 24) by the sources' outcomes; a model that answers each kind
    alike is estimated exactly from one anchor per kind, each weighing its kind's share."""
    item_set, items = one_task_set("t", 24)
    kind = [0] * 12 + [1] * 6 + [2] * 6
    patterns = {0: (1.0, 1.0, 1.0), 1: (1.0, 0.0, 0.0), 2: (0.0, 0.0, 1.0)}
    outcomes = [{"t": {doc: patterns[kind[doc]][model] for doc in range(24)}} for model in range(3)]
    anchors = choose_anchors(item_set, outcomes, count=3, seed=1)
    assert sorted(kind[doc] for _, doc in anchors.items) == [0, 1, 2]
    assert sorted(anchors.weights) == pytest.approx([0.25, 0.25, 0.5])
    new_model = {"t": {doc: {0: 1.0, 1: 0.0, 2: 1.0}[kind[doc]] for doc in range(24)}}
    assert anchors.estimate(new_model) == pytest.approx(item_set.score(new_model)) == pytest.approx(0.75)
    # fewer distinct outcome vectors than anchors asked for: the rest sample the clusters again, in
    # proportion to their weight (12, 6, 6 items: 4, 2, 2 of 8 anchors), and the estimate stays exact
    more = choose_anchors(item_set, outcomes, count=8, seed=1)
    assert sorted(kind[doc] for _, doc in more.items) == [0, 0, 0, 0, 1, 1, 2, 2]
    assert len(set(more.items)) == 8 and sum(more.weights) == pytest.approx(1.0)
    assert more.estimate(new_model) == pytest.approx(0.75)


def test_stratified_anchors_estimate_a_model_that_varies_within_a_cluster():
    """One outcome vector for all 40 items (one cluster): 10 anchors are a sample of 10 items, and the
    estimate is their mean, where one anchor could only say 0 or 1."""
    item_set, _ = one_task_set("t", 40)
    outcomes = [{"t": dict.fromkeys(range(40), 1.0)} for _ in range(3)]
    anchors = choose_anchors(item_set, outcomes, count=10, seed=3)
    assert len(anchors.items) == 10 and anchors.weights == pytest.approx([0.1] * 10)
    half = {"t": {doc: float(doc % 2) for doc in range(40)}}
    sampled = [half["t"][doc] for _, doc in anchors.items]
    assert anchors.estimate(half) == pytest.approx(sum(sampled) / 10)
    assert len(choose_anchors(item_set, outcomes, count=1, seed=3).items) == 1


def test_item_weights_follow_task_weights():
    eval_set = EvalSet(tasks=[{"name": "a", "weight": 3.0}, {"name": "b", "weight": 1.0}])
    item_set = ItemSet.of({"a": [0, 1, 2], "b": [5]}, eval_set)
    values = {"a": {0: 1.0, 1: 0.0, 2: 1.0}, "b": {5: 1.0}}
    assert item_set.score(values) == pytest.approx(0.75 * 2 / 3 + 0.25)


# -- racing bounds ---------------------------------------------------------------------------------
def test_the_known_worst_is_cut_after_one_block_by_hoeffding_not_by_the_exact_bound():
    """24 items, blocks of 4: candidate 0 gets its first block wrong, the others right."""
    item_set, items = one_task_set("t", 24)
    values = {
        0: {"t": {d: 0.0 for d in range(4)}},
        **{c: {"t": {d: 1.0 for d in range(4)}} for c in (1, 2, 3)},
    }
    seen = items[:4]
    exact = {c: bounds(item_set, values[c], seen, "exact", 0.2) for c in values}
    assert cuts(exact, values, mu=2) == set()  # 20 items left: anything can still happen
    hoeffding = {c: bounds(item_set, values[c], seen, "hoeffding", 0.2) for c in values}
    assert cuts(hoeffding, values, mu=2) == {0}
    # never fewer than mu left in the race
    assert cuts(hoeffding, [0, 1], mu=2) == set()


def test_cut_candidates_rank_below_the_mu_best_complete_ones():
    item_set, items = one_task_set("t", 8)
    high = {"t": {d: 1.0 for d in range(4)}}
    known = {
        0: bounds(item_set, high, items[:4], "exact", 0.1),  # cut after 4 items, all right: estimate 1.0
        1: bounds(item_set, {"t": {d: float(d % 2) for d in range(8)}}, items, "exact", 0.1),  # 0.5
        2: bounds(item_set, {"t": {d: float(d < 6) for d in range(8)}}, items, "exact", 0.1),  # 0.75
        3: bounds(item_set, {"t": {d: float(d < 2) for d in range(8)}}, items, "exact", 0.1),  # 0.25
    }
    value = ranking_values(known, complete={1, 2, 3}, mu=2)
    assert value[2] > value[1] > value[0] > value[3]


# -- a real race -----------------------------------------------------------------------------------
def mc_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_race_cuts_the_known_worst_candidate_after_its_first_block(tiny_sources, tmp_path):
    """Labels are set from the models' own answers: the worst candidate (the base) answers every kept
    item wrongly, the three others rightly; it is cut after its first block and scores no more."""
    from tests.tiny_models import write_tasks

    evals = tmp_path / "evals"
    files = write_tasks(evals, num_items=120)
    rows = mc_rows(files["tiny_mc"])
    for row in rows:
        row["label"] = 0
    files["tiny_mc"].write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = recipe_data(tiny_sources, evals)
    data["fitness"] = {
        "tasks": [{"name": "tiny_mc", "metric": "acc"}],
        "strategy": "racing",
        "racing": {"block": 4, "bound": "hoeffding", "delta": 0.2},
    }
    recipe = parse_recipe(data)
    paths = resolve_sources(recipe)
    genome = Genome(recipe, paths, check_compatible(paths, False))
    worst, others = np.zeros(genome.dimension), [np.full(genome.dimension, v) for v in (1.0, 0.9, 0.8)]
    executor = InProcessExecutor(recipe, paths, genome)
    picks = []  # each genotype's choice per item (acc against label 0)
    for genotype in [worst, *others]:
        executor.worker.merge(genotype)
        picks.append(
            executor.worker.scorer.score_items("fitness", {"tiny_mc": list(range(len(rows)))})["tiny_mc"]
        )
    kept = [
        {**row, "label": int(picks[1][doc] == 0.0)}
        for doc, row in enumerate(rows)
        if picks[0][doc] != picks[1][doc] and picks[1][doc] == picks[2][doc] == picks[3][doc]
    ]
    assert len(kept) >= 12, "the fixtures' models disagree too rarely for this test"
    files["tiny_mc"].write_text("".join(json.dumps(row) + "\n" for row in kept[:12]))

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ledger = Ledger(run_dir)
    executor = InProcessExecutor(recipe, paths, genome)
    strategy = RacingStrategy(recipe, genome, executor, ledger, lambda info: None, paths)
    records = strategy.evaluate(0, [worst, *others], mu=2, should_stop=lambda: False)
    assert records is not None
    estimates = ledger.estimates()
    assert estimates[(0, 0)].item_count == 4 and estimates[(0, 0)].full_score is None
    assert [estimates[(0, c)].full_score for c in (1, 2, 3)] == [1.0, 1.0, 1.0]
    assert sum(len(docs) for docs in ledger.item_outcomes("0/0")["0/0"].values()) == 4
    assert records[0].score == 0.0 and min(r.objective for r in records[1:]) < records[0].objective
    assert records[1].config == genome.to_config(others[0]).to_yaml()  # as the worker rendered it
    assert ledger.best().index == 1  # the first of the complete ones; the cut one never competes


# -- warm start and item budgets --------------------------------------------------------------------
@pytest.mark.slow  # a search
def test_grid_warm_start_is_paid_from_the_budget_and_starts_cma_at_its_best(
    tiny_sources, tiny_evals, tmp_path
):
    data = strategy_data(tiny_sources, tiny_evals, "full", x0="grid", max_evaluations=9)
    result, evaluated = run_here(data, tmp_path / "run")
    ledger = Ledger(tmp_path / "run")
    grid = ledger.evaluations(-1)
    assert [r.genotype[0] for r in grid] == list(X0_GRID)
    assert result.evaluations == len(X0_GRID) + 4  # one generation fits in what the grid left
    best_grid = max(grid, key=lambda r: r.score)
    from merger.search.state import load_state

    assert load_state(tmp_path / "run").es.x0 == pytest.approx(best_grid.genotype)
    assert ledger.items_spent()["candidates"] == 12 * result.evaluations
    assert "(0 generations)" in status_text(ledger)  # status counts the grid as the loop does


@pytest.mark.slow  # a search
def test_an_item_budget_ends_the_run(tiny_sources, tiny_evals, tmp_path):
    """A generation starts only when the items left pay for what the last one cost: 48 items a
    generation, so a budget of 100 pays for 2 and never for a third (144)."""
    data = strategy_data(tiny_sources, tiny_evals, "full", max_evaluations=None, max_items=100)
    result, _ = run_here(data, tmp_path / "run")
    ledger = Ledger(tmp_path / "run")
    spent = ledger.items_spent()["candidates"]
    assert spent == 96 and result.generations == 2
    status = status_text(ledger)
    # seconds per item beside the items: the candidates' scoring seconds over the items they scored
    eval_seconds = sum(record.eval_seconds for record in ledger.evaluations())
    assert eval_seconds > 0
    per_item = f"{eval_seconds / spent:.4f} s per item ({eval_seconds:.1f} s scoring candidates)"
    assert f"item-evaluations: {spent} ({spent} on candidates, 0 on sources), {per_item}" in status
    assert "(0 generations)" in status  # the item budget is spent
    from merger.report.data import load_run
    from merger.report.page import overview_rows

    rows = dict((row[0], row[1]) for row in overview_rows(load_run(tmp_path / "run")))
    assert rows["item-evaluations"].startswith(f"{spent} ({spent} on candidates, 0 on sources), {per_item}")


def test_seconds_per_item_are_shown_only_where_items_were_scored_and_timed():
    assert item_accounting({"candidates": 40, "sources": 8}, 2, 20, eval_seconds=2.0) == (
        "item-evaluations: 48 (40 on candidates, 8 on sources), 0.0500 s per item (2.0 s scoring candidates)"
        "; full would have spent 40: saved -8 (-20%)"
    )
    assert item_accounting({"candidates": 0, "sources": 0}, 0, None, eval_seconds=1.0) == (
        "item-evaluations: 0 (0 on candidates, 0 on sources)"
    )
    assert "s per item" not in item_accounting({"candidates": 40}, 2, 20)  # a ledger without timings


def test_a_generation_that_scored_no_item_does_not_end_an_item_budget(tmp_path):
    from merger.search.budget import generations_within_items

    ledger = Ledger(tmp_path)
    assert generations_within_items(ledger, 100, 0) == 100  # nothing scored: failures cost no items
    ledger.record_items("0/0", {"t": {1: 1.0, 2: 0.0}})
    ledger.record_items("0/1", {"t": {1: 1.0}})
    ledger.record_items("10/0", {"t": {1: 1.0}})  # another generation's candidate, not priced in
    assert ledger.generation_items(0) == 3 and generations_within_items(ledger, 100, 0) == (100 - 4) // 3


def test_saved_is_priced_on_evaluated_candidates_only(tmp_path):
    """Mid-generation under racing, items of candidates still being scored are spent (the budget
    counts them) but not yet priced against `full`: status never shows a negative saving for them."""
    from merger.rundir.ledger import EvaluationRecord

    ledger = Ledger(tmp_path)
    ledger.record_evaluation(EvaluationRecord(0, 0, [0.5], "x", score=0.5))
    ledger.record_items("0/0", {"t": {1: 1.0, 2: 0.0}})
    ledger.record_items("1/0", {"t": {1: 1.0, 2: 1.0, 3: 0.0}})  # generation 1 in progress
    ledger.record_items(source_key("base"), {"t": {1: 1.0}})
    assert ledger.items_spent() == {"candidates": 5, "sources": 1}
    assert ledger.items_spent(evaluated_only=True) == {"candidates": 2, "sources": 1}
    ledger.set_meta(fitness_items=3)
    status = status_text(ledger)
    assert "item-evaluations: 3 (2 on candidates, 1 on sources)" in status
    assert "full would have spent 3: saved 0 (0%)" in status


def test_source_outcomes_of_an_older_ledger_take_the_one_source_key(tmp_path):
    Ledger(tmp_path).close()
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:  # as anchors runs wrote them before
        db.execute("INSERT INTO item_outcomes VALUES ('source/base', 't', 1, 1.0, 0)")
    ledger = Ledger(tmp_path)
    assert ledger.item_outcomes() == {source_key("base"): {"t": {1: 1.0}}}
    assert ledger.items_spent() == {"candidates": 0, "sources": 1}


def test_a_checkpoint_written_before_the_search_package_split_loads(tmp_path, monkeypatch):
    import merger.search
    from merger.search.state import SearchState, load_state, save_state

    monkeypatch.setattr(SearchState, "__module__", "merger.search")  # where it was pickled from then
    monkeypatch.setattr(merger.search, "SearchState", SearchState, raising=False)
    state = SearchState(generation=3, es=SimpleNamespace(sigma=0.5))  # pycma's object is not the point
    save_state(tmp_path, state)
    monkeypatch.undo()
    assert load_state(tmp_path) == state


@pytest.mark.slow  # loads sources and tasks per strategy
def test_itemwise_strategies_refuse_a_metric_that_is_not_a_mean(tiny_evals):
    from merger.recipe import FitnessSet
    from merger.scoring.fitness import TaskSuite

    TaskSuite(FitnessSet(tasks=[{"name": "tiny_mc", "metric": "acc"}]), (str(tiny_evals),)).check_itemwise(
        "x"
    )
    (tiny_evals / "tiny_f1.yaml").write_text(
        (tiny_evals / "tiny_mc.yaml")
        .read_text()
        .replace("task: tiny_mc", "task: tiny_f1")
        .replace("metric: acc\n    aggregation: mean", "metric: f1\n    aggregation: f1")
    )
    suite = TaskSuite(FitnessSet(tasks=[{"name": "tiny_f1", "metric": "f1"}]), (str(tiny_evals),))
    with pytest.raises(MergerError, match="fitness.strategy racing needs a mean-aggregated metric"):
        suite.check_itemwise("fitness.strategy racing")


def test_a_budget_is_required():
    with pytest.raises(MergerError, match="max_items"):
        parse_recipe(
            {
                "sources": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
                "genome": {"method": "linear", "parameters": {"weight": {"min": 0, "max": 1}}},
                "optimizer": {"max_evaluations": None},
                "fitness": {"tasks": ["x"], "strategy": "anchors"},
            }
        )


# -- resume after SIGKILL ----------------------------------------------------------------------------
def item_rows(run_dir: Path) -> list[tuple]:
    try:
        with sqlite3.connect(run_dir / "ledger.sqlite", timeout=5) as db:
            return db.execute(
                "SELECT candidate, task, doc_id, value FROM item_outcomes ORDER BY 1, 2, 3"
            ).fetchall()
    except sqlite3.OperationalError:
        return []


def ledger_state(run_dir: Path) -> tuple:
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        evaluations = db.execute(
            "SELECT generation, idx, genotype, score, objective, failure FROM evaluations ORDER BY 1, 2"
        ).fetchall()
        estimates = db.execute("SELECT * FROM fitness_estimates ORDER BY 1, 2").fetchall()
    return evaluations, estimates, item_rows(run_dir)


@pytest.mark.slow  # a `merger run` subprocess per strategy
@pytest.mark.parametrize("strategy", ["full", "racing", "paired", "anchors", "anchors-irt"])
def test_sigkill_mid_run_resumes_to_the_uninterrupted_result(strategy, tiny_sources, tiny_evals, tmp_path):
    data = strategy_data(tiny_sources, tiny_evals, strategy, x0="grid", max_evaluations=13)
    reference, _ = run_here(data, tmp_path / "uninterrupted")
    expected = ledger_state(tmp_path / "uninterrupted")

    run_dir = tmp_path / "killed"
    data = {**data, "output": {"run_dir": str(run_dir)}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    process = start_run(recipe)
    deadline = time.time() + 300
    while len(item_rows(run_dir)) < len(expected[2]) // 2:
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert 0 < len(item_rows(run_dir)) < len(expected[2])
    if strategy in ("racing", "paired"):
        assert any(row[6] is None for row in expected[1]), "no candidate was cut: the race is not tested"

    resumed, _ = run_here(data, run_dir)
    evaluations, estimates, items = ledger_state(run_dir)
    assert (estimates, items) == expected[1:]
    assert [row[:2] + row[3:] for row in evaluations] == [row[:2] + row[3:] for row in expected[0]]
    for ours, theirs in zip(evaluations, expected[0], strict=True):
        assert json.loads(ours[2]) == pytest.approx(json.loads(theirs[2]))
    assert resumed.best.genotype == pytest.approx(reference.best.genotype)
    assert resumed.best.score == reference.best.score
    status = status_text(Ledger(run_dir))
    assert "item-evaluations:" in status
    assert ("anchor check, generation 1 best" in status) == strategy.startswith("anchors")


def test_fitness_generation_is_capped(tiny_evals):
    from merger.recipe import FitnessSet
    from merger.scoring.fitness import TaskSuite

    capped = TaskSuite(FitnessSet(tasks=["tiny_gen"], max_gen_toks=2), (str(tiny_evals),))
    task = capped.loaded["tasks"]["tiny_gen"]
    assert task.get_config("generation_kwargs")["max_gen_toks"] == 2
    kept = TaskSuite(FitnessSet(tasks=["tiny_gen"], max_gen_toks=50), (str(tiny_evals),))
    assert kept.loaded["tasks"]["tiny_gen"].get_config("generation_kwargs")["max_gen_toks"] == 4
