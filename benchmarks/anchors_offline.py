"""How well k-means and IRT anchors estimate full-set fitness, from a finished run's ledger alone.

No model runs: the ledger already holds candidates' outcomes on every fitness item (a `full` run has
them for every candidate). The first --calibrate generations (and the sources, where the ledger has
their outcomes) stand for what an anchors run knows at its start: both methods choose their k anchors
from them. Every later candidate is then estimated from its own outcomes on those anchors only, and
compared with its true full-set score: mean absolute error and Spearman rank correlation, each averaged
over the anchor seeds (--seeds). For scale, the same for k items drawn at random (their weighted mean;
averaged over --draws draws).

    python benchmarks/anchors_offline.py /work/det/skills-s1 /work/det/after --count 8 12 40

The ledger is opened read-only. The last line is JSON:
{"RUN_DIR": {"K": {"METHOD": {"mae": X, "spearman": R}}}}.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from merger.recipe import load_recipe  # noqa: E402
from merger.rundir.ledger import SOURCE_PREFIX  # noqa: E402
from merger.scoring.items import ItemSet, Values  # noqa: E402
from merger.search.anchors import choose_anchors  # noqa: E402
from merger.search.irt_anchors import choose_irt_anchors  # noqa: E402

Outcomes = dict[str, dict[str, dict[int, float]]]  # model -> task -> doc -> value


def read_outcomes(run_dir: Path) -> Outcomes:
    uri = f"file:{run_dir / 'ledger.sqlite'}?mode=ro"
    table: Outcomes = {}
    with sqlite3.connect(uri, uri=True) as db:
        for model, task, doc, value in db.execute("SELECT candidate, task, doc_id, value FROM item_outcomes"):
            table.setdefault(model, {}).setdefault(task, {})[doc] = value
    return table


def generation_of(model: str) -> int:
    return int(model.split("/")[0])


def split_models(outcomes: Outcomes, item_set: ItemSet, calibrate: int) -> tuple[list[str], list[str]]:
    """Models scored on every item: (calibration models, models to estimate)."""
    complete = [m for m, values in outcomes.items() if not item_set.missing(values, item_set.items)]
    sources = sorted(m for m in complete if m.startswith(SOURCE_PREFIX))
    candidates = sorted(
        (m for m in complete if not m.startswith(SOURCE_PREFIX)), key=lambda m: tuple(map(int, m.split("/")))
    )
    calibration = sources + [m for m in candidates if generation_of(m) < calibrate]
    return calibration, [m for m in candidates if generation_of(m) >= calibrate]


def mean_errors(estimates: list[list[float]], truth: list[float]) -> dict[str, float]:
    """Mean absolute error and Spearman correlation against the truth, each averaged over estimators."""
    return {
        "mae": round(float(np.mean([np.mean(np.abs(np.array(e) - truth)) for e in estimates])), 4),
        "spearman": round(float(np.mean([spearmanr(e, truth).statistic for e in estimates])), 3),
    }


def random_items(item_set: ItemSet, count: int, draws: int) -> list[Callable[[Values], float]]:
    """Estimators from `count` items drawn at random: their weight-normalised sum."""

    def estimator(picked: list) -> Callable[[Values], float]:
        total = sum(item_set.weight(item) for item in picked)
        return lambda values: item_set.score(values, picked) / total

    return [
        estimator(
            [item_set.items[i] for i in np.random.default_rng(draw).choice(len(item_set), count, False)]
        )
        for draw in range(draws)
    ]


def compare(run_dir: Path, counts: list[int], calibrate: int, seeds: list[int], draws: int) -> dict:
    recipe = load_recipe(run_dir / "recipe.yaml")
    outcomes = read_outcomes(run_dir)
    ids: dict[str, set[int]] = {}
    for values in outcomes.values():
        for task, docs in values.items():
            ids.setdefault(task, set()).update(docs)
    item_set = ItemSet.of({task: sorted(docs) for task, docs in ids.items()}, recipe.fitness)
    calibration, estimated = split_models(outcomes, item_set, calibrate)
    truth = [item_set.score(outcomes[m]) for m in estimated]
    print(
        f"{run_dir}: {len(item_set)} items; anchors chosen from {len(calibration)} models, "
        f"{len(estimated)} candidates estimated (true scores {min(truth):.3f}-{max(truth):.3f})"
    )
    known = [outcomes[m] for m in calibration]
    result: dict = {}
    for count in counts:
        estimators = {
            "kmeans": [choose_anchors(item_set, known, count, seed).estimate for seed in seeds],
            "irt": [choose_irt_anchors(item_set, known, count, seed).estimate for seed in seeds],
            "random": random_items(item_set, count, draws),
        }
        result[count] = {
            name: mean_errors([[f(outcomes[m]) for m in estimated] for f in group], truth)
            for name, group in estimators.items()
        }
        for name, row in result[count].items():
            print(f"  k={count:3d}  {name:7s} MAE {row['mae']:.4f}  Spearman {row['spearman']:.3f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--count", nargs="+", type=int, default=[12], help="anchors (k), one row each")
    parser.add_argument("--calibrate", type=int, default=1, help="generations the anchors are chosen from")
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="anchor seeds to average"
    )
    parser.add_argument("--draws", type=int, default=20, help="random k-item draws to average")
    args = parser.parse_args()
    table = {str(d): compare(d, args.count, args.calibrate, args.seeds, args.draws) for d in args.run_dirs}
    print(json.dumps(table))


if __name__ == "__main__":
    main()
