"""SIGTERM at random moments of one run: how long each stop takes, and whether the resumed run is the run.

    python benchmarks/stop_anywhere.py [--recipe recipes/quickstart.yaml] [--stops 20] [--seed 0] [--out DIR]
    python benchmarks/stop_anywhere.py --recipe RUN.yaml --reference RUN_DIR   # a finished run of RUN.yaml

First an uninterrupted `merger run` of the recipe in OUT/reference (kept: a second call reuses it), or
`--reference`, a finished run of the same recipe under the same threads and no shared score cache (its
wall time from `wall_seconds.json` beside it, as benchmarks/bench_runs.py writes it). Then the
same recipe in OUT/stopped, started again and again: each sitting gets SIGTERM after a random delay, and
the seconds from the signal to the process's exit are measured. The moments are `--stops` points drawn
uniformly over the reference's work (its wall time less `--opening`, the seconds a sitting spends on
imports and loading before it does any of the run's work), sorted; each sitting's delay is `--opening`
plus the gap from the previous point, so the stops fall all over the run (search, monitoring, selection,
finals) and the run does not end before the last of them (a sitting that opens faster than `--opening`
moves the run on a little more; the points are drawn over 90% of the work to leave room for that). After `--stops` stops the last sitting runs to the end, and the two run directories are
compared as `compare_runs.py` does (every ledger table but timings, the summary, best.yaml, the weights).

Printed per stop: the delay, seconds to exit, the exit status, the phases whose item count grew in that
sitting, and the line the run printed on stopping. The load is printed at the start and the end. With
`--track` the stopped run also logs to MLflow (a store in OUT), and the end checks that the run directory
has exactly one MLflow run and that no metric holds a step twice. The last line is JSON:
{"stops": n, "max_exit_seconds": s, "all_exit_0": b, "same_run": b[, "mlflow_runs": n, "steps_twice": n]}.
Every run scores without a shared score cache; build the zoo first (`merger zoo build --zoo skills`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench_runs import ROOT, WALL_FILE, load
from compare_runs import compare

from merger.finish.score_cache import SCORE_CACHE_ENV
from merger.rundir.layout import RunDir
from merger.rundir.ledger import Ledger

EXIT_LIMIT = 120.0  # a sitting still alive this long after SIGTERM is killed and reported


def merger_run(recipe: Path, run_dir: Path) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key != SCORE_CACHE_ENV}
    return subprocess.Popen(
        [sys.executable, "-m", "merger.cli", "run", str(recipe), "--run-dir", str(run_dir), "--no-progress"],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )


def items_by_phase(run_dir: Path) -> dict[str, int]:
    if not (run_dir / "ledger.sqlite").is_file():
        return {}
    ledger = Ledger(run_dir)
    try:
        return {phase: cost.items for phase, cost in ledger.phase_costs().items()}
    finally:
        ledger.close()


def reference_run(recipe: Path, run_dir: Path) -> float:
    """The uninterrupted run's wall seconds (remembered beside it)."""
    wall_file = run_dir / WALL_FILE
    if RunDir(run_dir).read_summary() is not None and wall_file.is_file():
        return json.loads(wall_file.read_text())["seconds"]
    started = time.perf_counter()
    process = merger_run(recipe, run_dir)
    process.communicate()
    if process.returncode != 0 or RunDir(run_dir).read_summary() is None:
        raise SystemExit(f"the reference run in {run_dir} failed ({process.returncode})")
    seconds = time.perf_counter() - started
    wall_file.write_text(json.dumps({"seconds": seconds}))
    return seconds


def stopped_sitting(recipe: Path, run_dir: Path, delay: float) -> dict[str, object] | None:
    """One sitting stopped by SIGTERM after `delay` seconds; None when the run ended before it."""
    before = items_by_phase(run_dir)
    process = merger_run(recipe, run_dir)
    try:
        process.wait(timeout=delay)
        process.communicate()
        return None
    except subprocess.TimeoutExpired:
        pass
    sent = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    try:
        out, _ = process.communicate(timeout=EXIT_LIMIT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    seconds = time.perf_counter() - sent
    after = items_by_phase(run_dir)
    grew = [phase for phase, items in after.items() if items > before.get(phase, 0)]
    said = next((line for line in reversed(out.splitlines()) if line.startswith("stopped")), "(nothing said)")
    return {"delay": delay, "exit_seconds": seconds, "status": process.returncode, "phases": grew, "said": said}


def tracked_recipe(recipe: Path, out: Path) -> Path:
    """The recipe with `tracking:` into a store in `out` (what it tracks does not change what it scores)."""
    import yaml

    data = yaml.safe_load(recipe.read_text())
    data["tracking"] = {"kind": "mlflow", "uri": f"sqlite:///{out.resolve()}/mlflow.db", "experiment": "stop_anywhere"}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tracked.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def mlflow_check(out: Path, run_dir: Path) -> dict[str, int]:
    """How many MLflow runs the run directory has, and how many metrics hold some step more than once."""
    from mlflow.tracking import MlflowClient

    from merger.tracking.mlflow_store import RUN_DIR_TAG

    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve()}/mlflow.db")
    ids = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(ids, filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir.resolve()}'")
    twice = 0
    for found in runs:
        for key in found.data.metrics:
            steps = [metric.step for metric in client.get_metric_history(found.info.run_id, key)]
            twice += len(steps) != len(set(steps))
    return {"mlflow_runs": len(runs), "steps_twice": twice}


def stop_delays(wall: float, stops: int, opening: float, seed: int) -> list[float]:
    """Each sitting's delay: `opening` plus the gap to its moment, `stops` sorted points drawn uniformly
    over 90% of the reference's work (`wall` less one opening)."""
    work = 0.9 * max(wall - opening, 1.0)
    draw = random.Random(seed)
    moments = sorted(draw.uniform(0.0, work) for _ in range(stops))
    return [opening + now - before for before, now in zip([0.0, *moments], moments, strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    parser.add_argument("--stops", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--opening", type=float, default=20.0, help="seconds a sitting takes to open (imports, loading)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "runs" / "stop_anywhere")
    parser.add_argument("--reference", type=Path, help="a finished uninterrupted run of --recipe")
    parser.add_argument("--track", action="store_true", help="the stopped run logs to MLflow (checked at the end)")
    args = parser.parse_args()
    print(f"load at start: {load()}", flush=True)
    reference, stopped = args.reference or args.out / "reference", args.out / "stopped"
    wall = reference_run(args.recipe.resolve(), reference)
    print(f"reference run: {wall:.0f} s uninterrupted", flush=True)
    sittings = tracked_recipe(args.recipe, args.out) if args.track else args.recipe.resolve()
    stops = []
    print(f"{'stop':>4} {'delay s':>8} {'exit s':>7} {'status':>6}  phases         said")
    for delay in stop_delays(wall, args.stops, args.opening, args.seed):
        sitting = stopped_sitting(sittings, stopped, delay)
        if sitting is None:
            print("the run ended before the next stop")
            break
        stops.append(sitting)
        phases = ",".join(sitting["phases"]) or "-"  # type: ignore[arg-type]
        print(f"{len(stops):>4} {sitting['delay']:>8.1f} {sitting['exit_seconds']:>7.1f} {sitting['status']:>6}  "
              f"{phases:<14} {sitting['said']}", flush=True)
    process = merger_run(sittings, stopped)
    process.communicate()
    lines = compare(reference, stopped)
    for what, same in lines:
        if not same:
            print(f"{what}: DIFFERS")
    same_run = all(same for _, same in lines)
    print(f"resumed run against the reference: {'the same run' if same_run else 'NOT the same run'} "
          f"({len(lines)} tables, summary fields and files compared)")
    tracked = mlflow_check(args.out, stopped) if args.track else {}
    if tracked:
        print(f"MLflow: {tracked['mlflow_runs']} run(s) for the run directory, {tracked['steps_twice']} metric(s) "
              "with a step logged twice")
    print(f"load at the end: {load()}")
    print(json.dumps({
        "stops": len(stops),
        "max_exit_seconds": max((float(s["exit_seconds"]) for s in stops), default=None),  # type: ignore[arg-type]
        "all_exit_0": all(s["status"] == 0 for s in stops),
        "same_run": same_run,
        **tracked,
    }))


if __name__ == "__main__":
    main()
