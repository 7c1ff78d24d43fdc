"""Seconds to build a candidate and resident memory: layer path (DFS) next to parameter merge (PS).

Both on the quickstart's sources (the zoo: SmolLM2-135M-Instruct, add, cap; built and cached on first
use). PS: `recipes/quickstart.yaml`'s task-arithmetic genome on the resident engine (config -> plan ->
fused in-place merge). DFS: `recipes/dfs-zoo.yaml`'s layer path on the layer-path engine (config ->
path -> views of the sources' layers); the probe forward with which `apply_config` refuses a path whose
activations overflow is timed apart. The
candidates are drawn as CMA-ES's first generation would be: x0 plus sigma0 noise, clipped to the cube.
Each engine runs in its own fresh process, so its resident set is measured alone.

    python benchmarks/layer_path_build.py [--candidates 10] [--threads 1]

The last line is JSON with both sides and the ratios (PS / DFS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RECIPES = {"ps": REPO / "recipes" / "quickstart.yaml", "dfs": REPO / "recipes" / "dfs-zoo.yaml"}


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def candidates(genome: Any, sigma0: float, count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    x0 = genome.initial()
    return [np.clip(x0 + sigma0 * rng.standard_normal(x0.shape), 0.0, 1.0) for _ in range(count)]


def measure(space: str, count: int, threads: int) -> dict[str, Any]:
    """In this process: build one engine, then `count` candidates; seconds and bytes."""
    import torch

    from merger.recipe import load_recipe
    from merger.sources.resolve import check_compatible, resolve_sources
    from merger.space import make_genome

    torch.set_num_threads(threads)
    recipe = load_recipe(RECIPES[space])
    paths = resolve_sources(recipe)
    num_layers = check_compatible(paths, False)
    genome = make_genome(recipe, paths, num_layers)
    before = rss_bytes()
    started = time.perf_counter()
    if space == "dfs":
        from merger.engine.layer_path import LayerPathEngine, path_of_config

        engine = LayerPathEngine(paths, recipe.anchor, dtype=torch.float32, device="cpu")

        def build(x: np.ndarray) -> None:  # apply_config without its probe forward (timed apart)
            anchor, path = path_of_config(genome.to_config(x), engine.source_names, num_layers)
            engine.assemble(path, anchor)
    else:
        from merger.engine.factory import build_engine

        engine = build_engine(paths, recipe.base_model, recipe.genome.method, dtype=torch.float32, device="cpu")

        def build(x: np.ndarray) -> None:
            engine.apply_config(genome.to_config(x))

    setup = time.perf_counter() - started
    xs = candidates(genome, recipe.optimizer.sigma0, count + 1)
    build(xs[0])  # warm-up (first-call allocations, kernel caches)
    seconds = []
    for x in xs[1:]:
        started = time.perf_counter()
        build(x)
        seconds.append(time.perf_counter() - started)
    result = {
        "space": space,
        "genome": genome.describe(),
        "setup_s": round(setup, 2),
        "candidate_s_median": statistics.median(seconds),
        "candidate_s_max": max(seconds),
        "engine_bytes": engine.resident_bytes()["total"],
        "threads": threads,
    }
    if space == "dfs":
        probe, layers = [], []
        for x in xs[1:]:
            engine.apply_config(genome.to_config(x))
            layers.append(int(engine.model.config.num_hidden_layers))
            started = time.perf_counter()
            engine.check_finite()
            probe.append(time.perf_counter() - started)
        result["probe_s_median"] = statistics.median(probe)
        result["layers"] = layers
    # after every candidate ran (DFS: forward passes too): transformers memory-maps the sources'
    # safetensors, so a layer-path engine's resident set grows with the layers its candidates touch
    result["rss_growth_bytes"] = rss_bytes() - before
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=("ps", "dfs"), help=argparse.SUPPRESS)  # one side, in a child
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, args.candidates, args.threads)))
        return 0
    results = {}
    for space in ("ps", "dfs"):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--only",
                space,
                "--candidates",
                str(args.candidates),
                "--threads",
                str(args.threads),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        results[space] = json.loads(child.stdout.strip().splitlines()[-1])
    ps, dfs = results["ps"], results["dfs"]
    gib = 1024**3
    print(f"{'':28}{'PS (task_arithmetic)':>22}{'DFS (layer path)':>20}{'PS / DFS':>10}")
    rows = [
        ("candidate build, median s", "candidate_s_median", 1, ".4f"),
        ("candidate build, max s", "candidate_s_max", 1, ".4f"),
        ("engine setup s (once)", "setup_s", 1, ".2f"),
        ("engine bytes, GiB", "engine_bytes", gib, ".3f"),
        ("process RSS growth, GiB", "rss_growth_bytes", gib, ".3f"),
    ]
    for label, key, unit, form in rows:
        ratio = ps[key] / dfs[key] if dfs[key] else float("inf")
        print(f"{label:28}{ps[key] / unit:>22{form}}{dfs[key] / unit:>20{form}}{ratio:>10.2f}")
    print(
        "DFS probe forward (apply_config's overflow check, once per candidate), median s: "
        f"{dfs['probe_s_median']:.4f}"
    )
    print(f"DFS path lengths: {dfs['layers']}")
    ratios = {key: ps[key] / dfs[key] for _, key, _, _ in rows if dfs[key]}
    print(json.dumps({"ps": ps, "dfs": dfs, "ratios_ps_over_dfs": ratios}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
