"""Does the winner hold on data it never saw? The winner against every untuned baseline and every source
on the held-out test items, over several seeds, with paired bootstrap intervals.

Each (recipe, seed) runs `merger run` in its own run directory under --out, kept and reused: a finished
run is read back, a stopped or killed one resumes, so the table fills up across sittings. The runs share
their sources' and baselines' final scores through MERGER_SCORE_CACHE (default: --out/scores): those do
not depend on the seed, and scoring is deterministic.

    python benchmarks/merge_quality.py                          # quickstart and skills, seeds 1-5
    python benchmarks/merge_quality.py --recipes skills --seeds 1 2

Per seed: the held-out test mean (and worst task) of every source, every baseline and the winner (and
which finalist selection chose); the winner minus the best baseline and minus the best source (the best
on the test items themselves: the strictest comparison), each with a paired bootstrap 95% interval over
the test items (resampled within each task). The last line is JSON:
{"RECIPE": {"winner_minus_best_baseline": median, "seeds_interval_above_zero": n,
            "winner_minus_best_source": median, "seeds": n}}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from merger.finish.score_cache import SCORE_CACHE_ENV  # noqa: E402
from merger.recipe import Recipe, load_recipe  # noqa: E402
from merger.rundir.layout import RunDir  # noqa: E402
from merger.rundir.ledger import BASELINE_PREFIX, SOURCE_PREFIX, WINNER_KEY, Ledger, final_items_key  # noqa: E402
from merger.scoring.fitness import weighted_score, worst_task  # noqa: E402
from merger.scoring.uncertainty import ItemValues, paired_difference  # noqa: E402

RECIPES = {"quickstart": ROOT / "recipes" / "quickstart.yaml", "skills": ROOT / "recipes" / "skills.yaml"}
WALL_FILE = "wall_seconds.json"  # beside each run: how long `merger run` took here, over its sittings


@dataclass
class Model:
    name: str
    test: dict[str, float]  # task -> score
    items: ItemValues

    def mean(self, recipe: Recipe) -> float:
        assert recipe.test is not None
        return weighted_score(self.test, recipe.test)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def seeded_recipe(recipe_path: Path, seed: int, run_dir: Path) -> Path:
    """The bundled recipe with only the optimizer's seed changed, written beside the run."""
    data = yaml.safe_load(recipe_path.read_text())
    data["optimizer"]["seed"] = seed
    data["output"] = {**data.get("output", {}), "run_dir": str(run_dir), "publish": None}
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(recipe_path: Path, seed: int, run_dir: Path) -> None:
    """`merger run` on one seed unless its summary is there; its wall time is added to WALL_FILE."""
    if RunDir(run_dir).read_summary() is not None:
        return
    recipe = seeded_recipe(recipe_path, seed, run_dir)
    started = time.perf_counter()
    print(f"running {recipe} ({load()})", file=sys.stderr, flush=True)
    shared = {SCORE_CACHE_ENV: os.environ.get(SCORE_CACHE_ENV) or str(run_dir.parent / "scores")}
    subprocess.run(
        [sys.executable, "-m", "merger.cli", "run", str(recipe), "--no-progress"],
        check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **shared},
    )
    wall = run_dir / WALL_FILE
    spent = json.loads(wall.read_text())["seconds"] if wall.exists() else 0.0
    wall.write_text(json.dumps({"seconds": spent + time.perf_counter() - started}))
    if RunDir(run_dir).read_summary() is None:  # stopped (SIGINT/SIGTERM): the next sitting resumes it
        raise SystemExit(f"{run_dir} stopped before it finished; run the benchmark again to resume it")


def final_models(run_dir: Path) -> dict[str, Model]:
    """The test scores and test items of every model the end of the run scored, by ledger key."""
    ledger = Ledger(run_dir)
    try:
        models = {}
        for row in ledger.final_scores():
            if row.eval_set != "test":
                continue
            key = final_items_key(row.identity)  # every set's items of these weights: keep the test tasks'
            items = ledger.item_outcomes(key).get(key, {})
            models[row.model] = Model(row.model, row.scores, {task: items[task] for task in row.scores if task in items})
        return models
    finally:
        ledger.close()


def seed_row(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    summary = RunDir(run_dir).read_summary()
    assert summary is not None
    models = final_models(run_dir)
    test_tasks = {task.name for task in recipe.test.tasks} if recipe.test else set()

    def mean_of(aggregate_items: dict[str, float]) -> float:
        assert recipe.test is not None
        return weighted_score(aggregate_items, recipe.test)

    winner = models[WINNER_KEY]
    baselines = {key: model for key, model in models.items() if key.startswith(BASELINE_PREFIX)}
    sources = {key: model for key, model in models.items() if key.startswith(SOURCE_PREFIX)}
    best_baseline = max(baselines.values(), key=lambda model: model.mean(recipe))
    best_source = max(sources.values(), key=lambda model: model.mean(recipe))
    assert set(winner.items) == test_tasks, "the winner's test items were not recorded"
    return {
        "chosen": summary.selection.chosen if summary.selection else "best by fitness",
        "models": {key: (model.mean(recipe), worst_task(model.test)) for key, model in models.items()},
        "best_baseline": best_baseline.name,
        "best_source": best_source.name,
        "minus_baseline": paired_difference(winner.items, best_baseline.items, mean_of),
        "minus_source": paired_difference(winner.items, best_source.items, mean_of),
        "seconds": json.loads((run_dir / WALL_FILE).read_text())["seconds"] if (run_dir / WALL_FILE).exists() else None,
    }


def print_seed(name: str, seed: int, row: dict[str, Any]) -> None:
    print(f"\n{name}, seed {seed}: winner = {row['chosen']}")
    for key, (mean, (task, worst)) in row["models"].items():
        print(f"  {key:28s} test mean {mean:.3f}   worst {task} {worst:.3f}")
    for label, best in (("baseline", "best_baseline"), ("source", "best_source")):
        point, low, high = row[f"minus_{label}"]
        print(f"  winner - best {label} ({row[best]}): {point:+.3f} [{low:+.3f}, {high:+.3f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "runs" / "merge_quality")
    parser.add_argument("--no-run", action="store_true", help="only read the runs already finished")
    args = parser.parse_args()
    print(f"start: {load()}")
    result: dict[str, Any] = {}
    total = 0.0
    for name in args.recipes:
        recipe = load_recipe(RECIPES[name])
        rows = {}
        for seed in args.seeds:
            run_dir = args.out / f"{name}-seed{seed}"
            if not args.no_run:
                run(RECIPES[name], seed, run_dir)
            if RunDir(run_dir).read_summary() is None:
                continue
            rows[seed] = seed_row(recipe, run_dir)
            print_seed(name, seed, rows[seed])
            total += rows[seed]["seconds"] or 0.0
        if rows:
            result[name] = {
                "winner_minus_best_baseline": statistics.median(r["minus_baseline"][0] for r in rows.values()),
                "seeds_interval_above_zero": sum(r["minus_baseline"][1] > 0 for r in rows.values()),
                "winner_minus_best_source": statistics.median(r["minus_source"][0] for r in rows.values()),
                "seeds": len(rows),
            }
    print(f"\nend: {load()}; total cost of the runs: {total / 60:.1f} min wall")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
