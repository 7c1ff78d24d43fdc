"""The baseline an evolutionary search must beat: one task-arithmetic coefficient, grid-searched.

Given a recipe, this evaluates `task_arithmetic` merges with ONE weight shared by every non-base
source and every layer, on an even grid of N values (N = the recipe's evaluation budget unless given),
picks the best on the recipe's fitness tasks, and scores it on the recipe's validation and test sets.
Compare with `summary.json` of `merger run` on the same recipe (same fitness items, same budget).

    python benchmarks/grid_baseline.py recipes/quickstart.yaml [--evaluations N] [--max-weight 1.5]

The last line is JSON: {"grid": [[weight, fitness], ...], "best_weight": .., "validation": {..}, "test": {..}}.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from merger.executors import ScoreJob  # noqa: E402
from merger.executors.worker import CandidateWorker  # noqa: E402
from merger.recipe import Recipe, load_recipe, parse_recipe  # noqa: E402
from merger.search.records import candidate_record  # noqa: E402
from merger.sources.resolve import check_compatible, resolve_sources  # noqa: E402
from merger.space import make_genome  # noqa: E402


def single_coefficient_recipe(recipe: Recipe, max_weight: float, num_layers: int) -> Recipe:
    data = recipe.model_dump()
    data["genome"] = {
        "method": "task_arithmetic",
        "parameters": {"weight": {"min": 0.0, "max": max_weight}},
        "layer_granularity": num_layers,
    }
    return parse_recipe(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--evaluations", type=int, help="grid points (default: the recipe's max_evaluations)")
    parser.add_argument("--max-weight", type=float, default=1.5)
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    paths = resolve_sources(recipe)
    num_layers = check_compatible(paths, recipe.trust_remote_code)
    recipe = single_coefficient_recipe(recipe, args.max_weight, num_layers)
    worker = CandidateWorker(recipe, paths, make_genome(recipe, paths, num_layers))
    count = args.evaluations or recipe.optimizer.max_evaluations or 16
    grid = np.linspace(0.0, 1.0, count)
    results = []
    for index, x in enumerate(grid):
        genotype = np.full(worker.space.dimension, x)
        record = candidate_record(0, index, genotype, worker.score(ScoreJob(f"0/{index}", genotype)), recipe.fitness)
        weight = x * args.max_weight
        results.append((round(float(weight), 4), record.score))
        print(f"weight {weight:.3f}: fitness {record.score:.4f} {record.failure or ''}", flush=True)
    best = int(np.argmax([score for _, score in results]))
    best_genotype = np.full(worker.space.dimension, grid[best])
    report = {"grid": results, "best_weight": results[best][0], "fitness": results[best][1]}
    for set_name in ("validation", "test"):
        if set_name in worker.scorer.suites:
            report[set_name] = worker.score(ScoreJob("best", best_genotype, set_name)).scores
    print(f"best single coefficient {results[best][0]} -> {report}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
