"""benchmarks/fitness_ranking.py: the rank correlation of each fitness with held-out accuracy, its
bootstrap intervals, and the item agreement of the greedy match with generated exact_match."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from merger.recipe import parse_recipe
from merger.scoring.fitness import TaskSuite
from merger.scoring.lm_eval_bridge import quiet_lm
from tests.recipes import tiny_recipe
from tests.test_teacher_forced import TASK, TRAINED, fine_tuned, sum_rows, tf_evals, trained_texts  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "fitness_ranking", REPO / "benchmarks" / "fitness_ranking.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fitness_ranking"] = module
    spec.loader.exec_module(module)
    return module


HELD_OUT = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


def test_a_fitness_that_orders_candidates_as_held_out_does_correlates_fully(bench: ModuleType) -> None:
    fitness = {
        "exact_match": [0.0, 0.2, 0.1, 0.3, 0.5, 0.4, 0.6, 0.7],  # two neighbouring swaps
        "gold_prob": [value / 2 for value in HELD_OUT],  # the same order on another scale
        "acc": HELD_OUT[::-1],
    }
    result = bench.rank_agreement(fitness, HELD_OUT, resamples=300, seed=1)
    assert result["gold_prob"].rho == pytest.approx(1.0)
    assert (result["gold_prob"].low, result["gold_prob"].high) == pytest.approx((1.0, 1.0))
    assert result["acc"].rho == pytest.approx(-1.0)
    swapped = result["exact_match"]
    assert 0.9 < swapped.rho < 1.0 and swapped.low <= swapped.rho <= swapped.high <= 1.0
    assert result["exact_match"].minus_reference == pytest.approx((0.0, 0.0))  # paired with itself
    low, high = result["gold_prob"].minus_reference
    assert 0.0 <= low <= high  # never worse than the swapped one on any resample
    assert result["acc"].minus_reference[1] < 0.0


def test_a_fitness_with_no_ranking_has_no_correlation(bench: ModuleType) -> None:
    """All candidates tied: Spearman is undefined, reported as NaN rather than a made-up number."""
    result = bench.rank_agreement({"exact_match": HELD_OUT, "acc": [0.5] * 8}, HELD_OUT, resamples=50)
    assert result["acc"].rho != result["acc"].rho


def test_candidates_are_spread_over_the_run_in_its_order(bench: ModuleType) -> None:
    keys = [f"{generation}/{index}" for generation in range(5) for index in range(4)]
    picked = bench.spread(keys, 5)
    assert picked[0] == "0/0" and picked[-1] == "4/3" and len(picked) == 5
    assert picked == sorted(picked, key=keys.index)
    assert bench.spread(keys, None) == keys == bench.spread(keys, 40)


def test_twin_set_scores_the_same_items_of_each_twin(bench: ModuleType, tiny_sources, tf_evals) -> None:  # noqa: F811
    recipe = parse_recipe(fitness_recipe(tiny_sources, tf_evals, limit=5))
    twins = bench.twin_set(recipe.fitness)
    assert [(task.name, task.metric) for task in twins.tasks] == [(TASK + "_tf", "gold_prob")]
    paths = (str(tf_evals),)
    twin_items = TaskSuite(twins, paths).item_ids()[TASK + "_tf"]
    assert twin_items == TaskSuite(recipe.fitness, paths).item_ids()[TASK] == list(range(5))


def fitness_recipe(sources: dict[str, Path], evals: Path, limit: int | None = None) -> dict:
    task = {"tasks": [{"name": TASK, "metric": "exact_match"}], "batch_size": 4, "limit": limit}
    return tiny_recipe(sources, evals, evals / "run", fitness=task, validation=task, test=task)


@pytest.mark.slow  # scores every candidate twice
def test_scored_candidates_agree_item_by_item_unless_normalisation_hides_a_difference(
    bench: ModuleType,
    tiny_sources: dict[str, Path],
    tf_evals: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Two fine-tuned tiny models as candidates: one learnt the items exactly, one learnt item 0 with a
    space before the newline, which exact_match forgives and the greedy match does not."""
    recipe = parse_recipe(fitness_recipe(tiny_sources, tf_evals))
    paths = (str(tf_evals),)
    generated = TaskSuite(recipe.fitness, paths)
    twins = TaskSuite(bench.twin_set(recipe.fitness), paths)
    rows = sum_rows()[:TRAINED]
    spaced = [f"{trained_texts(rows)[0][:-1]} \n", *trained_texts(rows[1:])]
    table = bench.Table()
    for key, texts in (("exact", trained_texts(rows)), ("spaced", spaced)):
        model, tokenizer = fine_tuned(tmp_path / key, texts)
        scored = bench.score_fitness(recipe, generated, twins, quiet_lm(model, tokenizer, batch_size=4))
        fitness = scored.fitness(recipe)
        assert 0.0 < fitness["gold_prob"] < 1.0
        assert fitness["blend"] == pytest.approx((fitness["acc"] + fitness["gold_prob"]) / 2)
        table.add(key, scored, fitness, held_out=fitness["exact_match"])
    total, differ = bench.disagreements(table)
    assert total == 2 * len(sum_rows())
    assert [(d.candidate, d.doc, d.exact_match, d.greedy) for d in differ] == [("spaced", 0, 1.0, 0.0)]
    assert (
        differ[0].continuation == f" {rows[0]['answer']}\n"
        and differ[0].generated.rstrip() == f" {rows[0]['answer']}"
    )
    assert differ[0].reason.startswith("surrounding spaces")


def test_the_tiny_self_check_prints_a_json_last_line(
    bench: ModuleType, capsys: pytest.CaptureFixture
) -> None:
    assert bench.main(["--tiny"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["candidates"] == 6 and result["fitness_items"] == len(sum_rows())
    assert set(result["spearman"]) == {"exact_match", "gold_prob", "acc", "blend"}
    assert result["agreement"]["items"] == 6 * len(sum_rows())
