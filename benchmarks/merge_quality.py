"""Does the winner hold on data it never saw? The winner against every untuned baseline and every source
on the held-out test items, over several seeds, with paired bootstrap intervals.

Each (recipe, seed) runs `merger run` in its own run directory under --out, kept and reused: a finished
run is read back, a stopped or killed one resumes, so the table fills up across sittings. The runs share
their sources' and baselines' final scores through MERGER_SCORE_CACHE (default: --out/scores): those do
not depend on the seed, and scoring is deterministic.

    python benchmarks/merge_quality.py                          # quickstart and skills, seeds 1-5
    python benchmarks/merge_quality.py --recipes skills --seeds 1 2
    python benchmarks/merge_quality.py --recipes skills --baselines all --out benchmarks/runs/merge_quality_all
    python benchmarks/merge_quality.py --recipes skills --baselines all --method auto --floor-member

Per seed: the held-out test mean (and worst task) of every source, every baseline and the winner (and
which finalist selection chose); the winner minus the best baseline and minus the best source (the best
on the test items themselves: the strictest comparison), each with a paired bootstrap 95% interval over
the test items (resampled within each task). Also the winner minus the best untuned merge on the
validation set (what a practitioner who tried every baseline on a dev set would ship; the finalist that
selection ranked highest among the baselines) and minus TIES at density 0.5 where the run scored it
(`--baselines all`), and per test task the winner against the best source on it (its specialist) with the
share of the gap from the best source to the oracle (each test item answered by the source best on it; on
the mixed task, each skill's items by its specialist) the winner closes.
The last line is JSON:
{"RECIPE": {"winner_minus_best_baseline": median, "seeds_interval_above_zero": n,
            "winner_minus_best_on_validation": median, "seeds_above_best_on_validation": n,
            "gap_closed": median, "winner_minus_best_source": median, "seeds": n}}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from bench_runs import (
    EVERY_MODEL_TESTED,
    RECIPES,
    ROOT,
    Model,
    final_models,
    load,
    run,
    variant_recipe,
    wall_seconds,
)

from merger.recipe import Recipe, load_recipe, parse_recipe, recipe_to_yaml
from merger.rundir.layout import RunDir
from merger.rundir.ledger import BASELINE_PREFIX, SOURCE_PREFIX, WINNER_KEY, baseline_key
from merger.rundir.summary import Summary
from merger.scoring.fitness import weighted_score, worst_task
from merger.scoring.uncertainty import paired_difference

PRACTITIONER_FIRST_TRY = "ties_d0.5"  # issue 31: the strongest untuned merge plain mergekit gave on skills


def best_on_validation(summary: Summary) -> str | None:
    """The baseline selection ranked highest: scored longest in the race, then the best validation score."""
    if summary.selection is None:
        return None
    baselines = [f for f in summary.selection.finalists if f.kind == "baseline"]
    if not baselines:
        return None
    best = max(baselines, key=lambda f: (f.dropped_after is None, f.items or 0, f.selection))
    return baseline_key(best.name.removeprefix("baseline: "))


def skill_gaps(
    test: dict[str, float], sources: dict[str, Model], mean_of: Callable[[dict[str, float]], float]
) -> dict[str, Any]:
    """Per test task the best source (its specialist); the oracle that answers each test item with the
    best source on that item (on a mixed task: each item's skill by its specialist); the share of the gap
    from the best source overall to that oracle that `test` closes."""
    specialists = {task: max(sources, key=lambda s: sources[s].test[task]) for task in test}
    oracle_tasks = {
        task: statistics.fmean(max(model.items[task][doc] for model in sources.values()) for doc in docs)
        for task, docs in next(iter(sources.values())).items.items()
    }
    oracle = mean_of(oracle_tasks)
    best_source = max(mean_of(model.test) for model in sources.values())
    closed = (mean_of(test) - best_source) / (oracle - best_source) if oracle > best_source else None
    return {
        "tasks": {task: (test[task], specialists[task], sources[specialists[task]].test[task]) for task in test},
        "oracle": oracle,
        "gap_closed": closed,
    }


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
    compared = {"best_on_validation": best_on_validation(summary), "ties_d0.5": baseline_key(PRACTITIONER_FIRST_TRY)}
    against = {
        label: (key, paired_difference(winner.items, models[key].items, mean_of))
        for label, key in compared.items()
        if key in models
    }
    return {
        "chosen": summary.selection.chosen if summary.selection else "best by fitness",
        "models": {key: (model.mean(recipe), worst_task(model.test)) for key, model in models.items()},
        "best_baseline": best_baseline.name,
        "best_source": best_source.name,
        "minus_baseline": paired_difference(winner.items, best_baseline.items, mean_of),
        "minus_source": paired_difference(winner.items, best_source.items, mean_of),
        "against": against,
        "skills": skill_gaps(winner.test, sources, mean_of),
        "front": front_rows(summary),
        "seconds": wall_seconds(run_dir),
    }


def front_rows(summary: Summary) -> dict[str, Any] | None:
    """The finalists' front on the validation tasks (merger.finish.front): each member's score per task and,
    per task, the best source's there (its specialist; a source the race dropped, on its items so far); the
    member whose worst task keeps the largest share of its specialist's score (chosen on validation only)."""
    selection = summary.selection
    if selection is None or selection.front is None:
        return None
    rows = {row.name: row for row in selection.finalists}
    sources = [row for row in selection.finalists if row.kind == "source" and row.tasks]
    specialists = {task: max(sources, key=lambda row: row.tasks[task]) for task in sources[0].tasks}  # type: ignore[index]

    def share(name: str) -> float:
        tasks = rows[name].tasks or {}
        return min(tasks[task] / best.tasks[task] for task, best in specialists.items() if best.tasks[task] > 0)  # type: ignore[index]

    return {
        "members": {name: (rows[name].tasks, share(name)) for name in selection.front},
        "specialists": {task: (row.name, row.tasks[task], row.items) for task, row in specialists.items()},  # type: ignore[index]
        "floor_member": max(selection.front, key=share),
        "chosen": selection.chosen,
    }


def floor_member_test(recipe: Recipe, run_dir: Path, member: str) -> dict[str, Any]:
    """`merger run --member` on a copy of the run (the run itself keeps its winner): the floor member's test
    scores, and its test mean minus the winner's with a paired interval."""
    recipe_path = run_dir.parent / f"{run_dir.name}.yaml"  # the variant recipe the run was made from
    copy = run_dir.parent / f"{run_dir.name}-member"
    done = RunDir(copy).read_summary()
    if done is None or done.selection is None or done.selection.member != member:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("final", "wall_seconds.json"))
        data = yaml.safe_load(recipe_path.read_text())
        data["output"]["run_dir"] = str(copy)
        copied_recipe = copy.parent / f"{copy.name}.yaml"
        copied_recipe.write_text(yaml.safe_dump(data, sort_keys=False))
        (copy / "recipe.yaml").write_text(recipe_to_yaml(parse_recipe(data, str(copied_recipe))))
        subprocess.run(
            [sys.executable, "-m", "merger.cli", "run", str(copied_recipe), "--no-progress", "--member", member],
            check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    chosen = final_models(copy)[WINNER_KEY]
    winner = final_models(run_dir)[WINNER_KEY]
    difference = paired_difference(chosen.items, winner.items, lambda scores: weighted_score(scores, recipe.test))  # type: ignore[arg-type]
    return {"member": member, "test": chosen.test, "minus_winner": difference}


def print_seed(name: str, seed: int, row: dict[str, Any]) -> None:
    print(f"\n{name}, seed {seed}: winner = {row['chosen']}")
    for key, (mean, (task, worst)) in row["models"].items():
        print(f"  {key:28s} test mean {mean:.3f}   worst {task} {worst:.3f}")
    for label, best in (("baseline", "best_baseline"), ("source", "best_source")):
        point, low, high = row[f"minus_{label}"]
        print(f"  winner - best {label} ({row[best]}): {point:+.3f} [{low:+.3f}, {high:+.3f}]")
    for label, (key, (point, low, high)) in row["against"].items():
        print(f"  winner - {label} ({key}): {point:+.3f} [{low:+.3f}, {high:+.3f}]")
    skills = row["skills"]
    for task, (score, specialist, theirs) in skills["tasks"].items():
        print(f"  {task:28s} winner {score:.3f}   best source {specialist} {theirs:.3f}")
    closed = "–" if skills["gap_closed"] is None else f"{skills['gap_closed']:.2f}"
    print(f"  item oracle (each item by its best source) {skills['oracle']:.3f}; share of the gap from the best source closed: {closed}")
    front = row["front"]
    if front is not None:
        specialists = ", ".join(f"{task} {who} {score:.3f}" for task, (who, score, _) in front["specialists"].items())
        print(f"  front on validation (specialists there: {specialists}):")
        for member, (tasks, share) in front["members"].items():
            marks = " <- winner" if member == front["chosen"] else ""
            marks += " <- floor member" if member == front["floor_member"] else ""
            scores = "  ".join(f"{task} {score:.3f}" for task, score in tasks.items())
            print(f"    {member:26s} {scores}   worst share of specialist {share:.2f}{marks}")
    floor = row.get("floor")
    if floor is not None:
        point, low, high = floor["minus_winner"]
        scores = "  ".join(f"{task} {score:.3f}" for task, score in floor["test"].items())
        print(f"  floor member {floor['member']!r} exported with --member, test: {scores}")
        print(f"  floor member - winner, test mean: {point:+.3f} [{low:+.3f}, {high:+.3f}]")


def median_of(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def median_against(rows: dict[int, dict[str, Any]], label: str) -> float | None:
    return median_of([r["against"][label][1][0] if label in r["against"] else None for r in rows.values()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "runs" / "merge_quality")
    parser.add_argument("--no-run", action="store_true", help="only read the runs already finished")
    parser.add_argument("--baselines", choices=["recipe", "all"], default="recipe",
                        help="all: score every untuned merge merger knows (`baselines: all`)")
    parser.add_argument("--method", help="the genome's method instead of the recipe's (auto: the best baseline's)")
    parser.add_argument("--floor-member", action="store_true",
                        help="also export, in a copy of each run, the front member whose worst skill keeps the "
                        "largest share of its specialist's validation score (`merger run --member`), and score it")
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
                changes: dict[str, Any] = dict(EVERY_MODEL_TESTED)
                changes |= {"baselines": "all"} if args.baselines == "all" else {}
                if args.method:
                    changes["genome"] = {"method": args.method}
                run(variant_recipe(RECIPES[name], seed, run_dir, changes), args.out / "scores")
            if RunDir(run_dir).read_summary() is None:
                continue
            rows[seed] = seed_row(recipe, run_dir)
            front = rows[seed]["front"]
            if args.floor_member and front is not None and front["floor_member"] != front["chosen"]:
                rows[seed]["floor"] = floor_member_test(recipe, run_dir, front["floor_member"])
            print_seed(name, seed, rows[seed])
            total += rows[seed]["seconds"] or 0.0
        if rows:
            result[name] = {
                "winner_minus_best_baseline": statistics.median(r["minus_baseline"][0] for r in rows.values()),
                "seeds_interval_above_zero": sum(r["minus_baseline"][1] > 0 for r in rows.values()),
                "winner_minus_best_on_validation": median_against(rows, "best_on_validation"),
                "seeds_above_best_on_validation": sum(
                    r["against"]["best_on_validation"][1][1] > 0 for r in rows.values() if "best_on_validation" in r["against"]
                ),
                "gap_closed": median_of([r["skills"]["gap_closed"] for r in rows.values()]),
                "winner_minus_best_source": statistics.median(r["minus_source"][0] for r in rows.values()),
                "floor_member_minus_winner": median_of(
                    [r["floor"]["minus_winner"][0] if "floor" in r else None for r in rows.values()]
                ),
                "seeds": len(rows),
            }
    print(f"\nend: {load()}; total cost of the runs: {total / 60:.1f} min wall")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
