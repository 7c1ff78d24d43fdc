"""`engine.fresh_randomness`: each candidate's DARE / DELLA masks are keyed by its genotype, so a resumed
run and Ray workers draw what one uninterrupted in-process run draws, and the export is the scored model."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from merger.engine.factory import build_engine, draw_key
from tests.test_overnight import recipe_data, run_here, start_run, wait_for_rows
from tests.test_scored_weights import final_digest, winner_digest

FRESH: dict[str, Any] = {
    "genome": {
        "method": "dare_ties",
        "layer_granularity": 2,
        "parameters": {"weight": {"min": 0.2, "max": 1.0}, "density": {"min": 0.3, "max": 0.8}},
    },
    "engine": {"fresh_randomness": True},
}


def fresh_data(tiny_sources: dict[str, Path], tiny_evals: Path, **overrides: Any) -> dict[str, Any]:
    # a validation task: each generation's best is merged again between generations
    # the winner is the fitness winner (no selection): the export checked is a scored candidate's
    return recipe_data(
        tiny_sources, tiny_evals, validation={"tasks": ["tiny_gen"]}, selection={"enabled": False}, **FRESH, **overrides
    )


def ledger(run_dir: Path) -> list[tuple]:
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        return db.execute(
            "SELECT generation, idx, genotype, score, digest FROM evaluations ORDER BY 1, 2"
        ).fetchall()


@pytest.mark.parametrize("kind", ["resident", "mergekit"])
def test_draws_follow_the_genotype_not_the_order_of_merges(tiny_sources, kind):
    from tests.test_engine import _config

    paths = {name: tiny_sources[name] for name in ("base", "specialist1", "specialist2")}
    config = _config(
        "dare_ties", paths, ({"weight": 0.7, "density": 0.4}, {"weight": 0.5, "density": 0.6}), {}
    )
    first, second = draw_key(np.array([0.25, 0.5])), draw_key([0.25, 0.5000000001])
    assert first == draw_key([0.25, 0.5]) and first != second
    one, other = (
        build_engine(paths, "base", "dare_ties", kind=kind, fresh_randomness=True) for _ in range(2)
    )
    one.apply_config(config, draw=first)
    after_first = {name: tensor.clone() for name, tensor in one.model.state_dict().items()}
    one.apply_config(config, draw=second)
    now = one.model.state_dict()
    assert any(not torch.equal(tensor, now[name]) for name, tensor in after_first.items())
    other.apply_config(config, draw=second)
    other.apply_config(config, draw=first)
    now = other.model.state_dict()
    assert all(torch.equal(tensor, now[name]) for name, tensor in after_first.items())


@pytest.mark.slow  # `merger run` subprocesses
def test_sigkill_and_resume_with_fresh_randomness_gives_the_uninterrupted_ledger_and_export(
    tiny_sources, tiny_evals, tmp_path
):
    data = fresh_data(tiny_sources, tiny_evals)
    run_here(data, tmp_path / "uninterrupted")
    reference = ledger(tmp_path / "uninterrupted")
    assert len({row[4] for row in reference}) == len(reference)  # a fresh draw (and model) per candidate

    run_dir = tmp_path / "interrupted"
    data = {**data, "output": {"run_dir": str(run_dir)}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    process = start_run(recipe)
    wait_for_rows(process, run_dir, 2)
    process.kill()
    process.communicate(timeout=60)
    assert 2 <= len(ledger(run_dir)) < len(reference)

    run_here(data, run_dir)  # a new process's first merges are the run's later candidates
    assert ledger(run_dir) == reference

    finished = start_run(recipe)  # the search is complete: this only finishes (export, final scores)
    _, err = finished.communicate(timeout=600)
    assert finished.returncode == 0, err[-2000:]
    assert final_digest(run_dir) == winner_digest(run_dir)
    assert "mergekit's export of best.yaml differs from the scored winner" in err
