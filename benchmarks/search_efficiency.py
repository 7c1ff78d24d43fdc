"""What racing and anchors save: item-evaluations spent against the winner's held-out test score.

Runs each (recipe, strategy, seed) in its own run directory under --out and keeps it: a run that
finished is read back, one that was stopped or killed resumes, so the table fills up across sittings.

    python benchmarks/search_efficiency.py                      # quickstart + efficiency-hard, 3 seeds
    python benchmarks/search_efficiency.py --strategies anchors+grid   # x0: grid as well (on request)
    python benchmarks/search_efficiency.py --tiny               # tiny random models: a quick self-check

`full` runs the recipe as it is (max_evaluations candidates). Every other strategy gets the same
candidates budget and, in addition, an item budget of --fraction of what `full` spends
(optimizer.max_items), so it shows what it reaches with a fifth of the items. `full@budget` is full's
winner among the candidates it had scored when it had spent that same item budget.

Printed per recipe and strategy: item-evaluations spent; the winner's test score (median and range
over seeds); the item-evaluations each run needed to reach the median final validation score of `full`
(median over seeds; '-' when a run never reached it). The last line is JSON:
{"RECIPE": {"STRATEGY": {"items": N, "test_median": X, "items_to_match_full": N}}}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from merger.recipe import Recipe, load_recipe, parse_recipe  # noqa: E402
from merger.rundir.ledger import SOURCE_PREFIX, Ledger  # noqa: E402
from merger.scoring.fitness import TaskSuite, task_paths, weighted_score  # noqa: E402
from merger.search.open import open_search  # noqa: E402
from merger.search.state import load_state  # noqa: E402

RESULT_FILE = "efficiency.json"
STRATEGIES: dict[str, dict[str, Any]] = {
    "full": {"strategy": "full"},
    "racing": {"strategy": "racing", "racing": {"block": 8, "bound": "hoeffding", "delta": 0.2}},
    "anchors": {"strategy": "anchors", "anchors": {"count": 12}},
    "anchors+grid": {"strategy": "anchors", "anchors": {"count": 12}},  # x0: grid as well
    "anchors-irt": {"strategy": "anchors", "anchors": {"count": 12, "method": "irt"}},
    "anchors-irt+grid": {"strategy": "anchors", "anchors": {"count": 12, "method": "irt"}},
}
RECIPES = {
    "quickstart": ROOT / "recipes" / "quickstart.yaml",
    "hard": ROOT / "recipes" / "efficiency-hard.yaml",
}


def load() -> str:
    one, five, fifteen = os.getloadavg()
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min) on {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}"


def fitness_items(recipe: Recipe) -> int:
    suite = TaskSuite(recipe.fitness, task_paths(recipe))
    return sum(len(ids) for ids in suite.item_ids().values())


def variant(recipe: Recipe, strategy: str, seed: int, run_dir: Path, item_budget: int | None) -> Recipe:
    data = json.loads(recipe.model_dump_json())
    data["fitness"].update(STRATEGIES[strategy])
    data["optimizer"]["seed"] = seed
    if strategy != "full":
        data["optimizer"]["max_items"] = item_budget
    if strategy.endswith("+grid"):
        data["optimizer"]["x0"] = "grid"
    data["output"] = {"run_dir": str(run_dir)}
    return parse_recipe(data)


def spent_by_generation(ledger: Ledger) -> dict[int, int]:
    """Item-evaluations spent once each generation (-1: grid, sources before it) had been scored."""
    per_generation: dict[int, int] = {}
    sources = 0
    for candidate, tasks in ledger.item_outcomes().items():
        count = sum(len(docs) for docs in tasks.values())
        if candidate.startswith(SOURCE_PREFIX):
            sources += count
        else:
            generation = int(candidate.split("/")[0])
            per_generation[generation] = per_generation.get(generation, 0) + count
    spent, total = {}, sources
    for generation in sorted(per_generation):
        total += per_generation[generation]
        spent[generation] = total
    return spent


def validation_curve(ledger: Ledger, recipe: Recipe) -> list[tuple[int, float]]:
    """(items spent, best validation score so far) at the end of each generation."""
    spent = spent_by_generation(ledger)
    curve, best = [], float("-inf")
    for record in ledger.generations():
        if record.validation:
            best = max(best, weighted_score(record.validation, recipe.validation))
        curve.append((spent.get(record.generation, 0), best))
    return curve


def winner_within(ledger: Ledger, budget: int, per_candidate: int) -> list[float] | None:
    """`full`'s best genotype among the candidates scored within `budget` item-evaluations."""
    scored = [r for r in ledger.evaluations() if not r.failed][: budget // per_candidate]
    return max(scored, key=lambda r: r.score).genotype if scored else None


def run_one(recipe: Recipe, run_dir: Path, budget: int, per_candidate: int) -> dict[str, Any]:
    result_path = run_dir / RESULT_FILE
    if result_path.is_file():
        return json.loads(result_path.read_text())
    started = time.time()
    search, _ = open_search(recipe, run_dir)
    try:
        result = search.run()
        ledger = search.ledger

        def test_score(genotype: list[float]) -> float:
            import numpy as np

            return weighted_score(search.executor.score_genotype(np.asarray(genotype), "test"), recipe.test)

        spent = ledger.items_spent()
        summary = {
            "items": spent["candidates"] + spent["sources"],
            "candidates": ledger.count(),
            "curve": validation_curve(ledger, recipe),
            "test": test_score(result.best.genotype),
            "search_seconds": load_state(run_dir).seconds,
            # lm-eval's time per item (merging excluded) where whole candidates are scored at once
            "seconds_per_item": sum(r.eval_seconds for r in ledger.evaluations())
            / max(1, spent["candidates"]),
        }
        if recipe.fitness.strategy == "full":
            genotype = winner_within(ledger, budget, per_candidate)
            summary["test_at_budget"] = test_score(genotype) if genotype is not None else None
        summary["seconds"] = time.time() - started + 0.0
    finally:
        search.executor.close()
        search.ledger.close()
    result_path.write_text(json.dumps(summary))
    return summary


def items_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((items for items, score in curve if score >= target - 1e-12), None)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def table(name: str, runs: dict[str, list[dict[str, Any]]], budget: int) -> dict[str, dict[str, Any]]:
    full = runs.get("full", [])
    target = median([run["curve"][-1][1] for run in full if run["curve"]])
    rows: dict[str, list[dict[str, Any]]] = dict(runs)
    if full and all(run.get("test_at_budget") is not None for run in full):
        rows["full@budget"] = [
            {**run, "test": run["test_at_budget"], "items": budget, "curve": []} for run in full
        ]
    print(f"\n{name}: target (full's median final validation) = {target}")
    print(f"{'strategy':<14} {'items':>8} {'test median':>12} {'test range':>16} {'items to match full':>20}")
    out = {}
    for strategy, results in rows.items():
        tests = [run["test"] for run in results]
        items = median([run["items"] for run in results if run["items"] is not None])
        # a run that never reached the target counts as infinitely many items (so the median may be one)
        reach = [items_to_reach(run["curve"], target) for run in results] if target is not None else []
        to_match = median([math.inf if r is None else r for r in reach])
        to_match = None if to_match is None or math.isinf(to_match) else to_match
        print(
            f"{strategy:<14} {items if items is not None else '-':>8} {median(tests):>12.4f} "
            f"{f'{min(tests):.4f}..{max(tests):.4f}':>16} {to_match if to_match is not None else '-':>20}"
        )
        out[strategy] = {"items": items, "test_median": median(tests), "items_to_match_full": to_match}
    return out


def tiny_recipes(root: Path) -> dict[str, Path]:
    """Two recipes on tiny random models (built once under `root`): the mechanics, not the quality."""
    import yaml

    from tests.tiny_models import build_sources, write_tasks

    if not (root / "sources" / "base").is_dir():
        build_sources(root / "sources")
        write_tasks(root / "evals")
    recipes = {}
    for name, genome, limit in (
        ("tiny-quick", {"layer_granularity": 2}, 12),
        ("tiny-hard", {"layer_granularity": 2, "tensor_classes": ["attention", "mlp"]}, None),
    ):
        data = {
            "sources": [
                {"name": n, "path": str(root / "sources" / n)} for n in ("base", "specialist1", "specialist2")
            ],
            "base_model": "base",
            "genome": {
                "method": "task_arithmetic",
                "parameters": {"weight": {"min": 0.0, "max": 1.0}},
                **genome,
            },
            "optimizer": {"popsize": 4, "max_evaluations": 12},
            "fitness": {"tasks": [{"name": "tiny_mc", "metric": "acc"}], "limit": limit},
            "validation": {"tasks": [{"name": "tiny_mc", "metric": "acc"}]},
            "test": {"tasks": [{"name": "tiny_mc", "metric": "acc"}]},
            "task_paths": [str(root / "evals")],
        }
        recipes[name] = root / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump(data))
    return recipes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "search_efficiency")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--strategies", nargs="+", default=["full", "racing", "anchors"], choices=list(STRATEGIES)
    )
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help="names: quickstart, hard")
    parser.add_argument("--fraction", type=float, default=0.2, help="item budget of the other strategies")
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a self-check in minutes")
    args = parser.parse_args()
    out = args.out / "tiny" if args.tiny else args.out
    recipes = tiny_recipes(out / "fixtures") if args.tiny else {name: RECIPES[name] for name in args.recipes}
    started = time.time()
    print(f"load at start: {load()}", flush=True)
    report, total_items, total_seconds = {}, 0, 0.0
    for name, path in recipes.items():
        recipe = load_recipe(path)
        per_candidate = fitness_items(recipe)
        full_items = per_candidate * (recipe.optimizer.max_evaluations or 0)
        budget = max(1, round(full_items * args.fraction))
        runs: dict[str, list[dict[str, Any]]] = {}
        for strategy in args.strategies:
            for seed in args.seeds:
                run_dir = out / name / strategy / f"seed{seed}"
                summary = run_one(
                    variant(recipe, strategy, seed, run_dir, budget), run_dir, budget, per_candidate
                )
                runs.setdefault(strategy, []).append(summary)
                total_items += summary["items"]
                total_seconds += summary["seconds"]
                print(
                    f"{name} {strategy} seed {seed}: {summary['items']} items, test {summary['test']:.4f}",
                    flush=True,
                )
        print(
            f"\n{name}: {per_candidate} fitness items a candidate; full spends {full_items}, the others get {budget}"
        )
        report[name] = table(name, runs, budget)
        seconds_per_item = median(
            [run["seconds_per_item"] for run in runs.get("full", []) if "seconds_per_item" in run]
        )
        if seconds_per_item is not None:
            print(
                f"{name}: one item-evaluation costs {seconds_per_item:.3f} s here (full, median over seeds)"
            )
    print(
        f"\ntotal cost: {total_items} item-evaluations, {total_seconds:.0f} s of runs "
        f"({time.time() - started:.0f} s in this sitting); load at the end: {load()}"
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
