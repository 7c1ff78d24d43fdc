"""Does scoring in bf16 change decisions, and what does it save? fp32 and bf16 side by side, in one run.

Candidates are sampled as one generation of the recipe's search (CMA-ES's first `ask`, popsize
--candidates). Each is merged once (in engine.dtype, as a run does) and its fitness items are scored
on the merged model (fp32) and on a bf16 copy refreshed from it (`merger.scoring.precision`); which
precision goes first alternates between candidates.

Printed: per-item agreement (% of items whose value is the same in both), the Spearman rank correlation
of the candidates' fitness, seconds per candidate for each precision (fp32: merge + score; bf16:
merge + cast + score) and their ratio, and the load average and OMP_NUM_THREADS it ran under. The last
line is JSON: {"recipe", "candidates", "items", "agreement", "spearman", "fp32_s", "bf16_s", "speedup",
"loadavg", "omp_num_threads", "torch_threads"}.

Usage: python benchmarks/scoring_precision.py [--recipe recipes/quickstart.yaml] [--candidates 8]
       python benchmarks/scoring_precision.py --tiny      # tiny random models: a quick self-check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from merger.executors.worker import CandidateWorker  # noqa: E402
from merger.recipe import Recipe, load_recipe, parse_recipe  # noqa: E402
from merger.scoring.fitness import ItemScores, Scorer  # noqa: E402
from merger.scoring.precision import ScoringModel  # noqa: E402

PRECISIONS = ("fp32", "bf16")


@dataclass
class Side:
    """One precision's results over the candidates."""

    fitness: list[float] = field(default_factory=list)
    items: list[ItemScores] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # merge (+ cast) + score, per candidate


def generation(recipe: Recipe, worker: CandidateWorker, count: int) -> list[np.ndarray]:
    """`count` candidates as the search's first generation would ask for them."""
    from merger.search.state import new_state

    sized = recipe.model_copy(update={"optimizer": recipe.optimizer.model_copy(update={"popsize": count})})
    return [np.asarray(x) for x in new_state(sized, worker.space).es.ask()]


def open_worker(recipe: Recipe) -> CandidateWorker:
    """A worker that merges as the recipe says and scores the merge as built (fp32)."""
    from merger.sources.resolve import check_compatible, resolve_sources
    from merger.space import make_genome

    engine = recipe.engine.model_copy(update={"scoring_precision": "fp32"})
    recipe = recipe.model_copy(update={"engine": engine})
    paths = resolve_sources(recipe)
    genome = make_genome(recipe, paths, check_compatible(paths, recipe.trust_remote_code))
    return CandidateWorker(recipe, paths, genome)


def compare_precisions(recipe: Recipe, count: int) -> dict[str, Any]:
    """Score `count` candidates of one generation in fp32 and in bf16; the summary the JSON line holds."""
    worker = open_worker(recipe)
    copy = ScoringModel(worker.model, "bf16")
    scorers = {"fp32": worker.scorer, "bf16": Scorer(recipe, copy.model, worker.tokenizer)}
    sides = {precision: Side() for precision in PRECISIONS}
    for index, genotype in enumerate(generation(recipe, worker, count)):
        started = time.perf_counter()
        worker.merge(genotype)
        merge_seconds = time.perf_counter() - started
        for precision in PRECISIONS if index % 2 == 0 else PRECISIONS[::-1]:
            started = time.perf_counter()
            if precision == "bf16":
                copy.refresh()
            scores, items = scorers[precision].score_logged("fitness")
            side = sides[precision]
            side.seconds.append(merge_seconds + time.perf_counter() - started)
            side.fitness.append(scorers[precision].fitness(scores))
            side.items.append(items)
    return summarize(recipe, sides)


def item_agreement(first: list[ItemScores], second: list[ItemScores]) -> tuple[float, int]:
    """The share of (candidate, task, item) whose value is the same in both, and how many there were."""
    pairs = [
        (values[doc], theirs[task][doc])
        for mine, theirs in zip(first, second, strict=True)
        for task, values in mine.items()
        for doc in values
    ]
    same = sum(abs(a - b) <= 1e-9 for a, b in pairs)
    return (same / len(pairs) if pairs else float("nan")), len(pairs)


def spearman(first: list[float], second: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(set(first)) < 2 or len(set(second)) < 2:
        return 1.0 if first == second else float("nan")  # constant scores: ranks agree only if equal
    return float(spearmanr(first, second).statistic)


def summarize(recipe: Recipe, sides: dict[str, Side]) -> dict[str, Any]:
    agreement, items = item_agreement(sides["fp32"].items, sides["bf16"].items)
    fp32_s = statistics.median(sides["fp32"].seconds)
    bf16_s = statistics.median(sides["bf16"].seconds)
    return {
        "recipe": recipe.output.run_dir,
        "candidates": len(sides["fp32"].fitness),
        "items": items,
        "agreement": round(agreement, 4),
        "spearman": round(spearman(sides["fp32"].fitness, sides["bf16"].fitness), 4),
        "fp32_s": round(fp32_s, 3),
        "bf16_s": round(bf16_s, 3),
        "speedup": round(fp32_s / bf16_s, 2) if bf16_s > 0 else None,
        "fitness": {precision: [round(f, 4) for f in side.fitness] for precision, side in sides.items()},
        "loadavg": [round(load, 2) for load in os.getloadavg()],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
    }


def tiny_recipe_here(root: Path) -> Recipe:
    """The tests' tiny random models and tasks, in a recipe of their own (the mechanics, not the quality)."""
    from tests.recipes import tiny_recipe
    from tests.tiny_models import build_sources, write_tasks

    sources = build_sources(root / "sources")
    write_tasks(root / "evals")
    return parse_recipe(tiny_recipe(sources, root / "evals", root / "run"))


def report(result: dict[str, Any]) -> str:
    lines = [
        f"recipe: {result['recipe']}  candidates: {result['candidates']}  items: {result['items']}",
        f"item agreement fp32 vs bf16: {100 * result['agreement']:.1f}%",
        f"Spearman rank correlation of fitness: {result['spearman']}",
        f"seconds per candidate: fp32 {result['fp32_s']}  bf16 {result['bf16_s']}  (fp32/bf16 {result['speedup']}x)",
        f"load average {result['loadavg']}  OMP_NUM_THREADS={result['omp_num_threads']}  "
        f"torch threads {result['torch_threads']}",
        json.dumps(result),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a quick self-check")
    args = parser.parse_args(argv)
    if args.tiny:
        with tempfile.TemporaryDirectory() as root:
            result = compare_precisions(tiny_recipe_here(Path(root)), args.candidates)
            result["recipe"] = "tiny"
    else:
        result = compare_precisions(load_recipe(args.recipe), args.candidates)
        result["recipe"] = str(args.recipe)
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
