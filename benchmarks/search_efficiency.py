"""What racing and anchors save: item-evaluations spent against the held-out test score of the model
each run exports (after selection on unseen data), paired with `full`'s on the same test items.

Each (recipe, strategy, seed) runs `merger run` in its own run directory under --out, kept and reused: a
finished run is read back, a stopped or killed one resumes, so the table fills up across sittings.
`full` is the bundled recipe as it is, so its runs are merge_quality.py's (--full-runs reads those).

    python benchmarks/search_efficiency.py                          # skills + quickstart, seeds 1-5
    python benchmarks/search_efficiency.py --recipes skills --strategies full racing-paired
    python benchmarks/search_efficiency.py --tiny                   # tiny random models: a self-check

Strategies (chosen before any run of this benchmark on the skills recipe):
- `full`: every candidate scored on every fitness item (max_evaluations candidates);
- `full@budget`: `full` stopped at the item budget the others get (optimizer.max_items; a run finishes
  the generation it started and scores at least one, so it may spend a little more);
- `racing-paired`: paired racing (blocks of 8 items, delta 0.2: the chance of any wrong cut in a
  generation), with the item budget;
- `racing`: racing with an independent Hoeffding bound per candidate (the previous default), budgeted;
- `anchors-irt`, `anchors`: 12 anchor items chosen by a Rasch model / by k-means, budgeted.
The item budget is --fraction (a fifth) of `full`'s fitness items: fitness items x max_evaluations.

Printed per recipe and strategy: item-evaluations spent (search only: the end's selection and test
scores are the same work for every strategy); the exported model's test mean (median and range over
seeds); item-evaluations to reach `full`'s median final validation score (median over seeds; '-' when a
run never reached it); and per seed, the exported model minus `full`'s exported model of the same seed
on the test items, with a paired bootstrap 95% interval. The last line is JSON:
{"RECIPE": {"STRATEGY": {"items": N, "test_median": X, "items_to_match_full": N,
                         "minus_full_median": D, "seeds_above_full": n, "seeds_below_full": n}}}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from bench_runs import (
    EVERY_MODEL_TESTED,
    RECIPES,
    ROOT,
    final_models,
    load,
    run,
    tiny_recipes,
    variant_recipe,
    wall_seconds,
)

from merger.recipe import Recipe, load_recipe
from merger.rundir.layout import RunDir
from merger.rundir.ledger import FINAL_ITEMS_PREFIX, SOURCE_PREFIX, WINNER_KEY, Ledger
from merger.scoring.fitness import TaskSuite, task_paths, weighted_score
from merger.scoring.uncertainty import paired_difference

BUDGETED = "budgeted"  # marks a strategy that gets the item budget
STRATEGIES: dict[str, dict[str, Any]] = {
    "full": {"strategy": "full"},
    "full@budget": {"strategy": "full", BUDGETED: True},
    "racing-paired": {
        "strategy": "racing", "racing": {"block": 8, "pairing": "paired", "delta": 0.2}, BUDGETED: True,
    },
    "racing": {"strategy": "racing", "racing": {"block": 8, "bound": "hoeffding", "delta": 0.2}, BUDGETED: True},
    "anchors-irt": {"strategy": "anchors", "anchors": {"count": 12, "method": "irt"}, BUDGETED: True},
    "anchors": {"strategy": "anchors", "anchors": {"count": 12, "method": "kmeans"}, BUDGETED: True},
}
DEFAULT_STRATEGIES = ["full", "full@budget", "racing-paired", "anchors-irt"]


def fitness_items(recipe: Recipe) -> int:
    suite = TaskSuite(recipe.fitness, task_paths(recipe))
    return sum(len(ids) for ids in suite.item_ids().values())


def changes(strategy: str, item_budget: int) -> dict[str, dict[str, Any]]:
    """The recipe changes a strategy makes; for `full` only merge_quality.py's, so its runs are that script's."""
    if strategy == "full":
        return dict(EVERY_MODEL_TESTED)
    fitness = {key: value for key, value in STRATEGIES[strategy].items() if key != BUDGETED}
    optimizer = {"max_items": item_budget} if STRATEGIES[strategy].get(BUDGETED) else {}
    return {"fitness": fitness, "optimizer": optimizer}


def spent_by_generation(ledger: Ledger) -> dict[int, int]:
    """Item-evaluations spent once each generation had been scored (sources' items come first)."""
    per_generation: dict[int, int] = {}
    sources = 0
    for candidate, tasks in ledger.item_outcomes().items():
        count = sum(len(docs) for docs in tasks.values())
        if candidate.startswith(FINAL_ITEMS_PREFIX):  # scored at the end, not by the search
            continue
        if candidate.startswith(SOURCE_PREFIX):
            sources += count
        else:  # a search candidate: "GEN/IDX"
            generation = int(candidate.split("/")[0])
            per_generation[generation] = per_generation.get(generation, 0) + count
    spent, total = {}, sources
    for generation in sorted(per_generation):
        total += per_generation[generation]
        spent[generation] = total
    return spent


def validation_curve(ledger: Ledger, recipe: Recipe) -> list[tuple[int, float]]:
    """(items spent, best validation score so far) at the end of each generation."""
    assert recipe.validation is not None
    spent = spent_by_generation(ledger)
    curve, best = [], float("-inf")
    for record in ledger.generations():
        if record.validation:
            best = max(best, weighted_score(record.validation, recipe.validation))
        curve.append((spent.get(record.generation, 0), best))
    return curve


def run_result(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    summary = RunDir(run_dir).read_summary()
    assert summary is not None
    ledger = Ledger(run_dir)
    try:
        spent = ledger.items_spent()
        result = {
            "items": spent["candidates"] + spent["sources"],
            "candidates": ledger.count(),
            "curve": validation_curve(ledger, recipe),
            "seconds_per_item": sum(r.eval_seconds for r in ledger.evaluations()) / max(1, spent["candidates"]),
        }
    finally:
        ledger.close()
    winner = final_models(run_dir)[WINNER_KEY]
    return {
        **result,
        "winner": winner,
        "test": winner.mean(recipe),
        "chosen": summary.selection.chosen if summary.selection else "best by fitness",
        "seconds": wall_seconds(run_dir),
    }


def items_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((items for items, score in curve if score >= target - 1e-12), None)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def versus_full(recipe: Recipe, runs: dict[int, dict[str, Any]], full: dict[int, dict[str, Any]]) -> dict[int, tuple[float, float, float]]:
    """Per seed: this strategy's exported model minus full's, paired on the test items."""

    def mean_of(scores: dict[str, float]) -> float:
        assert recipe.test is not None
        return weighted_score(scores, recipe.test)

    return {
        seed: paired_difference(result["winner"].items, full[seed]["winner"].items, mean_of)
        for seed, result in runs.items()
        if seed in full
    }


def table(name: str, recipe: Recipe, runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    full = runs.get("full", {})
    target = median([run["curve"][-1][1] for run in full.values() if run["curve"]])
    print(f"\n{name}: target (full's median final validation) = {target}")
    print(
        f"{'strategy':<14} {'items':>7} {'test median':>12} {'test range':>14} {'items to match full':>20} "
        f"{'- full (median)':>16} {'seeds >0 / <0':>14}"
    )
    out = {}
    for strategy, results in runs.items():
        tests = [run["test"] for run in results.values()]
        items = median([run["items"] for run in results.values()])
        # a run that never reached the target counts as infinitely many items (so the median may be one)
        reach = [items_to_reach(run["curve"], target) for run in results.values()] if target is not None else []
        to_match = median([math.inf if r is None else r for r in reach])
        to_match = None if to_match is None or math.isinf(to_match) else to_match
        paired = versus_full(recipe, results, full) if strategy != "full" else {}
        difference = median([point for point, _, _ in paired.values()])
        above = sum(low > 0 for _, low, _ in paired.values())
        below = sum(high < 0 for _, _, high in paired.values())
        print(
            f"{strategy:<14} {items if items is not None else '-':>7} {median(tests):>12.4f} "
            f"{f'{min(tests):.3f}..{max(tests):.3f}':>14} {to_match if to_match is not None else '-':>20} "
            f"{f'{difference:+.4f}' if difference is not None else '-':>16} {f'{above} / {below}' if paired else '-':>14}"
        )
        for seed, (point, low, high) in sorted(paired.items()):
            print(f"    seed {seed}: {point:+.3f} [{low:+.3f}, {high:+.3f}]  exported: {results[seed]['chosen']}")
        out[strategy] = {
            "items": items, "test_median": median(tests), "items_to_match_full": to_match,
            "minus_full_median": difference, "seeds_above_full": above, "seeds_below_full": below,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "runs" / "search_efficiency")
    parser.add_argument(
        "--full-runs", type=Path, default=ROOT / "benchmarks" / "runs" / "merge_quality",
        help="merge_quality.py's --out: its RECIPE-seedN runs are `full`'s (the bundled recipe as it is)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES, choices=list(STRATEGIES))
    parser.add_argument("--recipes", nargs="+", default=["skills", "quickstart"], choices=list(RECIPES))
    parser.add_argument("--fraction", type=float, default=0.2, help="item budget of the budgeted strategies")
    parser.add_argument("--no-run", action="store_true", help="only read the runs already finished")
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a self-check in minutes")
    args = parser.parse_args()
    out = args.out / "tiny" if args.tiny else args.out
    recipes = tiny_recipes(out / "fixtures") if args.tiny else {name: RECIPES[name] for name in args.recipes}
    strategies = ["full", *(s for s in args.strategies if s != "full")]  # the others are paired with full
    print(f"load at start: {load()}", flush=True)
    report, total_items, total_seconds = {}, 0, 0.0
    for name, path in recipes.items():
        recipe = load_recipe(path)
        per_candidate = fitness_items(recipe)
        full_items = per_candidate * (recipe.optimizer.max_evaluations or 0)
        budget = max(1, round(full_items * args.fraction))
        print(f"\n{name}: {per_candidate} fitness items a candidate; full spends {full_items}, the others get {budget}")
        runs: dict[str, dict[int, dict[str, Any]]] = {}
        for strategy in strategies:
            for seed in args.seeds:
                if strategy == "full" and not args.tiny:
                    run_dir = args.full_runs / f"{name}-seed{seed}"
                else:
                    run_dir = out / name / f"{strategy}-seed{seed}"
                if not args.no_run:
                    run(variant_recipe(path, seed, run_dir, changes(strategy, budget)), args.full_runs / "scores")
                if RunDir(run_dir).read_summary() is None:
                    continue
                result = run_result(recipe, run_dir)
                runs.setdefault(strategy, {})[seed] = result
                total_items += result["items"]
                total_seconds += result["seconds"] or 0.0
                print(f"{name} {strategy} seed {seed}: {result['items']} items, test {result['test']:.4f}", flush=True)
        report[name] = table(name, recipe, runs)
        seconds_per_item = median([run["seconds_per_item"] for run in runs.get("full", {}).values()])
        if seconds_per_item is not None:
            print(f"{name}: one item-evaluation costs {seconds_per_item:.3f} s here (full, median over seeds)")
    print(f"\ntotal cost: {total_items} item-evaluations, {total_seconds / 60:.1f} min of runs; load at the end: {load()}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
