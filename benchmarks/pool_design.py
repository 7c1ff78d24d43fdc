"""A designed pool over several seeds of its groups' searches, and what a design costs beside one run.

    python benchmarks/pool_design.py --seeds 1 2 3 --out DIR     # the bundled recipes/design-skills.yaml

1. Seed 1's design (`merger pool design`: the bundled design, its recipe's optimizer seed set, no
   publishing) and one `merger run recipes/skills.yaml` (seed 1) side by side, each with OMP_NUM_THREADS=1
   and its own empty score cache: the items and seconds of each step, the whole wall time of each, and
   the design's over the run's.
2. Every other seed's design, two at a time. Each starts from seed 1's pairwise measurement (copied: it
   merges untuned, so it does not depend on the seed; it is counted once, in step 1).
3. `merger router eval POOL --splits 3` on each designed pool and on the four specialists
   (recipes/pool-skills.yaml without the base: MiniLM needs no member to embed), on the same items and
   splits: accuracy, its interval, per skill, resident GiB, seconds per answer, and the designed pool's
   accuracy and resident weights over the specialists'.
Everything is kept under --out: a rerun reads back what finished and resumes what did not (a design or
run stopped by SIGINT/SIGTERM resumes where it stopped; its wall time adds up over sittings). The load is
printed at the start, before each command and at the end. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from bench_runs import RECIPES, ROOT, add_wall_seconds, load, run, variant_recipe, wall_seconds
from run_cost import cost_row

from merger.finish.score_cache import SCORE_CACHE_ENV
from merger.rundir.layout import RunDir

DESIGN = ROOT / "recipes" / "design-skills.yaml"
SPLITS = 3


def design_file(out: Path, seed: int) -> Path:
    """The bundled design over a copy of its recipe with the optimizer's `seed`, under out/seedN."""
    seed_dir = out / f"seed{seed}"
    recipe = variant_recipe(RECIPES["skills"], seed, seed_dir / "recipe")
    data = yaml.safe_load(DESIGN.read_text())
    data.pop("publish", None)
    data.update(recipe=str(recipe), pool=str((DESIGN.parent / data["pool"]).resolve()), work_dir=str(seed_dir / "design"))
    path = seed_dir / "design.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def work_dir(out: Path, seed: int) -> Path:
    return out / f"seed{seed}" / "design"


def designed(work: Path) -> bool:
    return any((work / "router").rglob("head.json"))


def merger(arguments: list[str], wall_dir: Path | None = None, score_cache: Path | None = None) -> None:
    """`merger ARGUMENTS` with one thread; its wall seconds added to `wall_dir`'s (over sittings)."""
    print(f"merger {' '.join(arguments)} ({load()})", file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if score_cache is not None:
        env[SCORE_CACHE_ENV] = str(score_cache)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "merger.cli", *arguments], check=True, cwd=ROOT, env=env)
    if wall_dir is not None:
        add_wall_seconds(wall_dir, time.perf_counter() - started)


def design(out: Path, seed: int) -> Path:
    """Seed `seed`'s design, built unless finished; the measurement copied from seed 1's where it has one."""
    path, work = design_file(out, seed), work_dir(out, seed)
    if designed(work):
        return work
    first = work_dir(out, 1) / "measure"
    if seed != 1 and first.is_dir() and not (work / "measure").exists():
        shutil.copytree(first, work / "measure")
    merger(["pool", "design", str(path), "--no-progress"], work.parent, work.parent / "scores")
    if not designed(work):
        raise SystemExit(f"the design in {work} stopped before it finished; run the benchmark again to resume it")
    return work


def skills_run(out: Path) -> Path:
    run_dir = out / "skills-run" / "seed1"
    return run(variant_recipe(RECIPES["skills"], 1, run_dir), run_dir.parent / "scores")


def outcome_rows(work: Path) -> list[dict[str, Any]]:
    return [row for path in sorted(work.glob("outcomes/*.json")) for row in json.loads(path.read_text())]


def design_cost(work: Path) -> dict[str, Any]:
    """Items and scoring seconds per step of a finished design; wall seconds of the whole."""
    steps: dict[str, tuple[int, float]] = {}
    measured = outcome_rows(work / "measure")
    steps["pairwise measurement"] = (len(measured), sum(row["latency_s"] for row in measured))
    for group in sorted((work / "groups").iterdir()):
        summary = RunDir(group).read_summary()
        assert summary is not None and summary.costs, f"{group} has no phase costs"
        steps[f"search {group.name}"] = (
            sum(cost.items for cost in summary.costs.values()), sum(cost.seconds for cost in summary.costs.values())
        )
    routed = outcome_rows(work / "router")
    steps["router outcome table"] = (len(routed), sum(row["latency_s"] for row in routed))
    return {"steps": steps, "items": sum(items for items, _ in steps.values()), "wall": wall_seconds(work.parent)}


def group_results(work: Path) -> dict[str, dict[str, Any]]:
    """Each searched group: what its run exported and its test means."""
    results = {}
    for group in sorted((work / "groups").iterdir()):
        summary = RunDir(group).read_summary()
        assert summary is not None
        chosen = summary.selection.chosen if summary.selection is not None else "fitness winner"
        results[group.name] = {"exported": chosen}
    return results


def specialists_pool(out: Path) -> Path:
    """recipes/pool-skills.yaml without the base, its work under out/specialists."""
    template = ROOT / "recipes" / "pool-skills.yaml"
    data = yaml.safe_load(template.read_text())
    data["members"] = [member for member in data["members"] if member["name"] != "base"]
    data["tasks"]["include_path"] = str((template.parent / data["tasks"]["include_path"]).resolve())
    data["work_dir"] = str(out / "specialists")
    path = out / "specialists.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def router_eval(pool: Path, work: Path) -> dict[str, Any]:
    """The pool's merge-or-route report over SPLITS splits (read back when it was written)."""
    report = work / "comparison.json"
    if not report.exists():
        merger(["router", "eval", str(pool), "--splits", str(SPLITS)])
    return json.loads(report.read_text())


def print_cost(design_row: dict[str, Any], run_row: dict[str, Any]) -> dict[str, Any]:
    print("\nwhat the design costs beside one run (seed 1, side by side, one thread each)")
    for step, (items, seconds) in design_row["steps"].items():
        print(f"  design  {step:28s} {items:>7,} items {seconds:>7.0f} s scoring")
    for phase, (items, seconds) in run_row["phases"].items():
        print(f"  run     {phase:28s} {items:>7,} items {seconds:>7.0f} s")
    items_ratio = design_row["items"] / run_row["items"]
    wall_ratio = design_row["wall"] / run_row["wall"]
    print(f"  design: {design_row['items']:,} items, {design_row['wall']:.0f} s wall; run: {run_row['items']:,} "
          f"items, {run_row['wall']:.0f} s wall; design / run: items {items_ratio:.2f}, wall {wall_ratio:.2f}")
    return {"design_items": design_row["items"], "run_items": run_row["items"], "items_ratio": items_ratio,
            "design_wall": design_row["wall"], "run_wall": run_row["wall"], "wall_ratio": wall_ratio}


def print_pools(specialists: dict[str, Any], pools: dict[int, dict[str, Any]], groups: dict[int, Any]) -> dict[str, Any]:
    reference = specialists["rows"]["router"]
    encoder_gib = float(specialists["encoder"].get("gib") or 0.0)
    tasks = list(reference["tasks"])
    print(f"\nrouted on the same held-out items ({SPLITS} splits of {specialists['items']} items)")
    print(f"  {'pool':34s} {'accuracy':>8s} {'95% interval':>15s} " + " ".join(f"{t.split('_')[1]:>5s}" for t in tasks)
          + f" {'GiB':>6s} {'s/answer':>8s}  over specialists: accuracy, member GiB")
    result = {}

    def line(name: str, row: dict[str, Any], extra: str) -> None:
        low, high = row["interval"]
        per_task = " ".join(f"{row['tasks'][t]:5.3f}" for t in tasks)
        print(f"  {name:34s} {row['accuracy']:8.3f} [{low:.3f}, {high:.3f}] {per_task} {row['resident_gib']:6.3f} "
              f"{row['seconds_per_answer']:8.4f}  {extra}")

    line("router over the four specialists", reference, "")
    for seed, report in pools.items():
        row = report["rows"]["router"]
        accuracy = row["accuracy"] / reference["accuracy"]
        gib = (row["resident_gib"] - encoder_gib) / (reference["resident_gib"] - encoder_gib)
        line(f"designed K=2, seed {seed}", row, f"{accuracy:.3f}, {gib:.3f}")
        exported = ", ".join(f"{name}: {value['exported']}" for name, value in groups[seed].items())
        print(f"  {'':34s} exported {exported}")
        result[str(seed)] = {"accuracy": row["accuracy"], "interval": row["interval"], "over_specialists": accuracy,
                             "member_gib_ratio": gib, "exported": groups[seed]}
    print(f"  GiB: the resident members and the encoder ({encoder_gib:.3f} GiB); s/answer: the chosen member's "
          "recorded seconds per item (teacher-forced, batched) plus embedding and choosing")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "runs" / "pool_design")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    if 1 not in args.seeds:
        parser.error("--seeds must include 1: seed 1's design is the one measured beside a run")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = "1"
    print(f"load at start: {load()}", flush=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        first, run_dir = pool.submit(design, args.out, 1), pool.submit(skills_run, args.out)
        works = {1: first.result()}
        run_row = cost_row(run_dir.result())
        others = [seed for seed in args.seeds if seed != 1]
        works.update(zip(others, pool.map(lambda seed: design(args.out, seed), others), strict=True))
        specialists = pool.submit(router_eval, specialists_pool(args.out), args.out / "specialists")
        reports = dict(zip(works, pool.map(lambda w: router_eval(w / "pool.yaml", w / "router"), works.values()), strict=True))
        specialists_report = specialists.result()
    cost = print_cost(design_cost(works[1]), run_row)
    pools = print_pools(specialists_report, reports, {seed: group_results(work) for seed, work in works.items()})
    print(f"\nload at the end: {load()}")
    print(json.dumps({"cost": cost, "seeds": pools}))


if __name__ == "__main__":
    main()
