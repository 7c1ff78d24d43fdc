"""What the benchmarks that run whole searches share: a bundled recipe varied per (seed, strategy), one
`merger run` per variant in its own run directory (kept, resumed, read back), and the held-out test
items of every model its end scored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from merger.finish.score_cache import SCORE_CACHE_ENV  # noqa: E402
from merger.recipe import Recipe  # noqa: E402
from merger.rundir.layout import RunDir  # noqa: E402
from merger.rundir.ledger import Ledger, final_items_key  # noqa: E402
from merger.scoring.fitness import weighted_score  # noqa: E402
from merger.scoring.uncertainty import ItemValues  # noqa: E402

RECIPES = {"quickstart": ROOT / "recipes" / "quickstart.yaml", "skills": ROOT / "recipes" / "skills.yaml"}
WALL_FILE = "wall_seconds.json"  # beside each run: how long `merger run` took here, over its sittings
# the benchmarks that set the winner beside every source and baseline on the test set score them all there
# (the bundled multi-skill recipes score only the winner's reference: `selection.final_table: contenders`)
EVERY_MODEL_TESTED: dict[str, Any] = {"selection": {"final_table": "all"}}


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
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}"


def variant_recipe(recipe_path: Path, seed: int, run_dir: Path, changes: dict[str, Any] | None = None) -> Path:
    """The bundled recipe with the optimizer's seed and `changes` (section -> keys, or a value) applied, written
    beside the run."""
    data = yaml.safe_load(recipe_path.read_text())
    data["optimizer"]["seed"] = seed
    for section, values in (changes or {}).items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    data["output"] = {**data.get("output", {}), "run_dir": str(run_dir), "publish": None}
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(recipe_path: Path, score_cache: Path) -> Path:
    """`merger run` on a variant recipe unless its run has a summary; its wall time is added to WALL_FILE.
    Runs share the final scores of weights that do not depend on the seed through `score_cache`."""
    recipe = yaml.safe_load(recipe_path.read_text())
    run_dir = Path(recipe["output"]["run_dir"])
    if RunDir(run_dir).read_summary() is not None:
        return run_dir
    started = time.perf_counter()
    print(f"running {recipe_path} ({load()})", file=sys.stderr, flush=True)
    shared = {SCORE_CACHE_ENV: os.environ.get(SCORE_CACHE_ENV) or str(score_cache)}
    subprocess.run(
        [sys.executable, "-m", "merger.cli", "run", str(recipe_path), "--no-progress"],
        check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **shared},
    )
    add_wall_seconds(run_dir, time.perf_counter() - started)
    if RunDir(run_dir).read_summary() is None:  # stopped (SIGINT/SIGTERM): the next sitting resumes it
        raise SystemExit(f"{run_dir} stopped before it finished; run the benchmark again to resume it")
    return run_dir


def add_wall_seconds(directory: Path, seconds: float) -> None:
    """Add one sitting's `seconds` to WALL_FILE in `directory` (a stopped job's sittings add up)."""
    wall = directory / WALL_FILE
    wall.write_text(json.dumps({"seconds": (wall_seconds(directory) or 0.0) + seconds}))


def wall_seconds(run_dir: Path) -> float | None:
    wall = run_dir / WALL_FILE
    return json.loads(wall.read_text())["seconds"] if wall.exists() else None


def final_models(run_dir: Path) -> dict[str, Model]:
    """The test scores and test items of every model the end of the run scored, by ledger key."""
    ledger = Ledger(run_dir)
    try:
        models = {}
        for row in ledger.final_scores():
            if row.eval_set != "test":
                continue
            key = final_items_key(row.identity)  # every set's items of these weights: keep the test tasks'
            items = ledger.outcomes_of(key)
            models[row.model] = Model(row.model, row.scores, {task: items[task] for task in row.scores if task in items})
        return models
    finally:
        ledger.close()


def tiny_recipes(root: Path) -> dict[str, Path]:
    """A recipe on tiny random models (built once under `root`): the mechanics, not the quality."""
    from tests.tiny_models import build_sources, write_tasks

    if not (root / "sources" / "base").is_dir():
        build_sources(root / "sources")
        write_tasks(root / "evals")
    data = {
        "sources": [{"name": n, "path": str(root / "sources" / n)} for n in ("base", "specialist1", "specialist2")],
        "base_model": "base",
        "genome": {"method": "task_arithmetic", "parameters": {"weight": {"min": 0.0, "max": 1.0}}, "layer_granularity": 2},
        "optimizer": {"popsize": 4, "max_evaluations": 13},
        "fitness": {"tasks": [{"name": "tiny_mc", "metric": "acc"}]},
        "validation": {"tasks": [{"name": "tiny_gen", "metric": "exact_match"}]},
        "test": {"tasks": [{"name": "tiny_gen", "metric": "exact_match"}]},
        "task_paths": [str(root / "evals")],
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return {"tiny": path}
