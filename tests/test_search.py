"""The search end to end: a short run, resume after SIGKILL, failing candidates, reproducibility."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from merger.cli import main
from merger.recipe import parse_recipe
from merger.rundir.ledger import Ledger
from merger.search.loop import Search
from merger.search.open import open_run
from tests.recipes import tiny_recipe, write_recipe
from tests.tiny_models import with_tensor_filled

REPO = Path(__file__).resolve().parent.parent


def run_in_process(recipe_data: dict, run_dir: Path) -> tuple[object, list[tuple[int, int]]]:
    """Run (or resume) a search here; returns its result and the (generation, index) it evaluated."""
    evaluated: list[tuple[int, int]] = []

    def progress(info: dict) -> None:
        if "record" in info:
            evaluated.append((info["generation"], info["record"].index))

    with open_run(parse_recipe(recipe_data), run_dir) as run:
        return Search(run, progress).run(), evaluated


def ledger_count(run_dir: Path) -> int:
    path = run_dir / "ledger.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.mark.slow  # `merger run` in a subprocess
def test_short_run_end_to_end(tiny_sources, tiny_evals, tmp_path, capsys):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tiny_sources, tiny_evals, run_dir))
    assert main(["run", str(recipe), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "WINNER" in out and "specialist1" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["evaluations"] == 1 + 4 and summary["seed"] == 3  # the untuned TIES merge, one generation
    assert set(summary["winner"]["validation"]) == {"tiny_gen"}
    assert set(summary["winner"]["test"]) == {"tiny_mc"}
    assert set(summary["sources"]) == {"base", "specialist1", "specialist2"}
    for scores in [summary["winner"], *summary["sources"].values()]:
        assert all(0.0 <= v <= 1.0 for s in ("validation", "test") for v in scores[s].values())
    assert summary["winner"]["fitness"]["tiny_mc"] == pytest.approx(summary["winner"]["score"])
    final = run_dir / "final"
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    assert "evolutionary-merge" in (final / "README.md").read_text()

    # best.yaml reproduces the winner's weights with plain mergekit
    reproduced = tmp_path / "reproduced"
    subprocess.run(["mergekit-yaml", str(run_dir / "best.yaml"), str(reproduced)], check=True, capture_output=True)
    ours, theirs = load_file(final / "model.safetensors"), load_file(reproduced / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name])

    assert main(["status", str(run_dir)]) == 0
    status = capsys.readouterr().out
    assert "evaluations: 5" in status and "best:" in status


def assert_resume_after_sigkill_equals_an_uninterrupted_run(
    data: dict, tmp_path: Path, popsize: int, total: int
) -> None:
    """`merger run` SIGKILLed inside its second generation, then resumed: nothing finished is evaluated
    again and the run ends as an uninterrupted one does."""
    reference, _ = run_in_process(data, tmp_path / "uninterrupted")
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "merger.cli", "run", str(recipe), "--no-progress"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while ledger_count(tmp_path / "killed") < popsize + 1:  # inside the second generation
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before = ledger_count(tmp_path / "killed")
    assert popsize < finished_before < total

    resumed, evaluated = run_in_process(data, tmp_path / "killed")
    assert len(evaluated) == total - finished_before  # nothing finished is evaluated again
    assert resumed.evaluations == total
    assert resumed.best.genotype == pytest.approx(reference.best.genotype)
    assert resumed.best.score == reference.best.score
    assert (resumed.best.generation, resumed.best.index) == (reference.best.generation, reference.best.index)


@pytest.mark.slow  # `merger run` subprocesses, one SIGKILLed
def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny_sources, tiny_evals, tmp_path):
    data = tiny_recipe(
        tiny_sources, tiny_evals, tmp_path / "killed", optimizer={"popsize": 4, "max_evaluations": 12},
        baselines=[],  # no warm start: the kill lands in a generation the helper can count
    )
    data["validation"] = None
    assert_resume_after_sigkill_equals_an_uninterrupted_run(data, tmp_path, popsize=4, total=12)


@pytest.mark.slow  # a search
def test_failing_candidates_do_not_stop_the_run(tiny_sources, tiny_evals, tmp_path):
    """A source with huge weights overflows to inf for large merge weights: those candidates fail."""
    huge_tensor = "model.layers.1.mlp.up_proj.weight"
    huge = with_tensor_filled(tiny_sources["specialist2"], tmp_path / "huge", huge_tensor, 3e38)
    sources = {**tiny_sources, "specialist2": huge}
    data = tiny_recipe(
        sources, tiny_evals, tmp_path / "run",
        genome={
            "method": "task_arithmetic", "layer_granularity": 4, "tensor_classes": [],
            "parameters": {"weight": {"min": 0.0, "max": 2.0}},
        },
        optimizer={"popsize": 6, "max_evaluations": 12, "sigma0": 0.5},
        baselines=[],  # no warm start at the untuned weights: CMA-ES starts at the centre, 1.0, which overflows
    )
    result, evaluated = run_in_process(data, tmp_path / "run")
    assert len(evaluated) == 12
    failures = [r for r in Ledger(tmp_path / "run").evaluations() if r.failed]
    assert failures, "expected some candidates to overflow"
    assert all("NaN or inf" in r.failure for r in failures)
    assert all(r.objective == 1.0 and r.score == 0.0 for r in failures)
    assert not result.best.failed


@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("linear", {"weight": {"min": 0.1, "max": 1.0}}),
        ("task_arithmetic", {"weight": {"min": 0.0, "max": 1.0}}),
        ("ties", {"weight": {"min": 0.0, "max": 1.0}, "density": {"min": 0.2, "max": 1.0}}),
        ("breadcrumbs_ties", {"weight": {"min": 0.0, "max": 1.0}, "density": {"min": 0.5, "max": 0.9}}),
    ],
)
def test_genome_configs_merge_in_memory_as_mergekit_writes_them(tiny_sources, tiny_evals, tmp_path, method, parameters):
    from merger.engine.reference import export_merge, merge_in_memory
    from merger.space.parameters import Genome

    data = tiny_recipe(tiny_sources, tiny_evals, tmp_path, genome={"method": method, "parameters": parameters})
    genome = Genome(parse_recipe(data), tiny_sources, 4)
    config = genome.to_config(np.random.default_rng(2).uniform(size=genome.dimension))
    in_memory = merge_in_memory(config)
    export_merge(config, tmp_path / "out")
    on_disk = load_file(tmp_path / "out" / "model.safetensors")
    assert in_memory.keys() == on_disk.keys()
    for name, tensor in on_disk.items():
        torch.testing.assert_close(in_memory[name], tensor)
