"""What a whole run costs, phase by phase: the settings before issue 30 against the defaults, side by side.

    python benchmarks/run_cost.py --recipes skills --seeds 1 2 3 4 5
    python benchmarks/run_cost.py --tiny            # tiny random models: a self-check in a minute
    python benchmarks/run_cost.py --parallel        # both variants of a seed at once, one thread each

Each (recipe, seed, variant) is one `merger run` of the bundled recipe in its own run directory under
--out, from an empty score cache (nothing shared between runs), one after another on this machine, or
with --parallel the two variants of a seed side by side, each with OMP_NUM_THREADS=1 (under the same
load, on a machine with at least two cores):
- `before`: the recipe as runs went before issue 30: scored in fp32 (`engine.scoring_precision: fp32`),
  a teacher-forced fitness task (`*_tf`, `metric: acc`) replaced by its generated twin with
  `exact_match`, each generation's best monitored on every validation item (`monitoring.limit: all`)
  every finalist scored on every validation item (`selection.block: null`), and every source and
  baseline scored on the test set (`selection.final_table: all`);
- `now`: the recipe as bundled.
A finished run is read back, a stopped one resumed (its wall time adds up over sittings).

Printed per recipe and seed: each variant's item-evaluations and seconds (merging and scoring) per phase
(search, monitoring, selection, finals), its whole wall time, the ratios now / before, and the exported
models' held-out test means with now minus before and its paired bootstrap 95% interval on the same test
items. The load is printed at the start, with each run and at the end. The last line is JSON:
{"RECIPE": {"SEED": {"items_ratio": r, "wall_ratio": r, "now_minus_before": [d, low, high]}}}.
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from bench_runs import RECIPES, ROOT, final_models, load, run, tiny_recipes, variant_recipe, wall_seconds

from merger.recipe import load_recipe
from merger.rundir.layout import RunDir
from merger.rundir.ledger import PHASES, WINNER_KEY
from merger.scoring.fitness import weighted_score
from merger.scoring.uncertainty import paired_difference

BEFORE = {"monitoring": {"limit": "all"}, "selection": {"block": None, "final_table": "all"}, "engine": {"scoring_precision": "fp32"}}
VARIANTS = ("before", "now")


def generated_twin(task: str | dict[str, Any]) -> str | dict[str, Any]:
    """A teacher-forced task as it was before: its generated twin, scored by exact match."""
    if isinstance(task, dict) and task["name"].endswith("_tf"):
        return {**task, "name": task["name"].removesuffix("_tf"), "metric": "exact_match"}
    return task


def variant_changes(recipe_path: Path, variant: str) -> dict[str, dict[str, Any]]:
    if variant == "now":
        return {}
    fitness = yaml.safe_load(recipe_path.read_text())["fitness"]
    return {**BEFORE, "fitness": {"tasks": [generated_twin(task) for task in fitness["tasks"]]}}


def cost_row(run_dir: Path) -> dict[str, Any]:
    summary = RunDir(run_dir).read_summary()
    assert summary is not None and summary.costs, f"{run_dir} has no phase costs"
    return {
        "phases": {phase: (cost.items, cost.seconds) for phase, cost in summary.costs.items()},
        "items": sum(cost.items for cost in summary.costs.values()),
        "wall": wall_seconds(run_dir),
        "exported": summary.selection.chosen if summary.selection is not None else "fitness winner",
    }


def seed_report(recipe_path: Path, runs: dict[str, Path]) -> dict[str, Any]:
    recipe = load_recipe(recipe_path)
    assert recipe.test is not None
    test = recipe.test

    def mean_of(task_means: dict[str, float]) -> float:
        return weighted_score(task_means, test)

    rows = {variant: cost_row(run_dir) for variant, run_dir in runs.items()}
    winners = {variant: final_models(run_dir)[WINNER_KEY] for variant, run_dir in runs.items()}
    before, now = rows["before"], rows["now"]
    return {
        "rows": rows,
        "test": {variant: winner.mean(recipe) for variant, winner in winners.items()},
        "items_ratio": now["items"] / before["items"],
        "wall_ratio": (now["wall"] / before["wall"]) if now["wall"] and before["wall"] else None,
        "now_minus_before": paired_difference(winners["now"].items, winners["before"].items, mean_of),
    }


def print_seed(name: str, seed: int, report: dict[str, Any]) -> None:
    print(f"\n{name} seed {seed}")
    print(f"  {'variant':<8} " + " ".join(f"{phase:>20}" for phase in PHASES) + f" {'items':>8} {'wall s':>8}  exported")
    for variant, row in report["rows"].items():
        cells = " ".join(f"{row['phases'][p][0]:>10} ({row['phases'][p][1]:>6.0f} s)" for p in PHASES)
        wall = "–" if row["wall"] is None else f"{row['wall']:.0f}"
        print(f"  {variant:<8} {cells} {row['items']:>8} {wall:>8}  {row['exported']}")
    wall_ratio = "–" if report["wall_ratio"] is None else f"{report['wall_ratio']:.3f}"
    d, low, high = report["now_minus_before"]
    tests = ", ".join(f"{variant} {value:.3f}" for variant, value in report["test"].items())
    print(f"  now / before: items {report['items_ratio']:.3f}, wall time {wall_ratio}")
    print(f"  test mean of the exported model: {tests}; now - before {d:+.3f} [{low:+.3f}, {high:+.3f}]")


def run_variants(path: Path, seed: int, seed_dir: Path, parallel: bool) -> dict[str, Path]:
    """Each variant's run of `path` at `seed`, one after another or side by side."""
    jobs = {}
    for variant in VARIANTS:
        run_dir = seed_dir / f"{variant}-seed{seed}"
        jobs[variant] = (variant_recipe(path, seed, run_dir, variant_changes(path, variant)), run_dir)

    def run_one(variant: str) -> Path:
        recipe_path, run_dir = jobs[variant]
        run(recipe_path, run_dir.parent / f"{run_dir.name}-scores")
        return run_dir

    if not parallel:
        return {variant: run_one(variant) for variant in VARIANTS}
    with ThreadPoolExecutor(max_workers=len(VARIANTS)) as pool:
        return dict(zip(VARIANTS, pool.map(run_one, VARIANTS), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "runs" / "run_cost")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--recipes", nargs="+", default=["skills"], choices=list(RECIPES))
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a self-check")
    parser.add_argument("--parallel", action="store_true", help="a seed's variants side by side, one thread each")
    args = parser.parse_args()
    if args.parallel:
        os.environ["OMP_NUM_THREADS"] = "1"
    out = args.out / "tiny" if args.tiny else args.out
    recipes = tiny_recipes(out / "fixtures") if args.tiny else {name: RECIPES[name] for name in args.recipes}
    print(f"load at start: {load()}", flush=True)
    result: dict[str, dict[int, Any]] = {}
    for name, path in recipes.items():
        for seed in args.seeds:
            runs = run_variants(path, seed, out / name, args.parallel)
            report = seed_report(path, runs)
            print_seed(name, seed, report)
            result.setdefault(name, {})[seed] = {
                key: report[key] for key in ("items_ratio", "wall_ratio", "now_minus_before")
            }
    print(f"\nload at the end: {load()}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
