"""Non-finite sources are refused as they load; the exported winner is proven to be the model scored."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from merger.common.errors import MergerError
from merger.engine.reference import MergekitEngine, export_merge
from merger.engine.resident import ResidentEngine
from merger.engine.weights import checkpoint_digest, parameter_names
from merger.executors import ScoreJob
from merger.executors.in_process import InProcessExecutor
from merger.finish.scored_export import match_scored_weights
from merger.recipe import parse_recipe
from merger.registry import Registry
from merger.search.records import candidate_record
from merger.sources.resolve import resolve_sources
from merger.space.parameters import Genome
from tests.cli import assert_one_line_error, run_merger
from tests.recipes import tiny_recipe as plain_recipe
from tests.recipes import write_recipe

BAD_TENSOR = "model.layers.1.mlp.up_proj.weight"
DARE = {
    "method": "dare_ties",
    "layer_granularity": 2,
    "parameters": {"weight": {"min": 0.2, "max": 1.0}, "density": {"min": 0.3, "max": 0.8}},
}


def tiny_recipe(*args: Any, **overrides: Any) -> dict[str, Any]:
    """The tests' recipe, its winner the fitness winner and no untuned warm start: these tests follow a
    searched candidate's export, and count the candidates of whole generations."""
    return plain_recipe(*args, **{"selection": {"enabled": False}, "baselines": [], **overrides})


def nonfinite_copy(source: Path, out: Path, value: float = float("nan")) -> Path:
    """A copy of a checkpoint with `value` in a few elements of one MLP tensor."""
    shutil.copytree(source, out)
    weights = load_file(out / "model.safetensors")
    weights[BAD_TENSOR][3, :5] = value
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def nan_sources(tiny_sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nan_sources")
    return {**tiny_sources, "specialist1": nonfinite_copy(tiny_sources["specialist1"], root / "specialist1")}


def ledger_rows(run_dir: Path) -> list[tuple]:
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        return db.execute(
            "SELECT generation, idx, score, digest, failure FROM evaluations ORDER BY 1, 2"
        ).fetchall()


def assert_ends_in_error(process: Any, *expected: str) -> None:
    """Status 2, and after the run's own progress lines one `merger: error:` line holding `expected`."""
    assert process.returncode == 2, process.stderr[-2000:]
    last = process.stderr.strip().splitlines()[-1]
    assert last.startswith("merger: error: ") and all(text in last for text in expected), last
    assert "Traceback" not in process.stderr


def winner_digest(run_dir: Path) -> str:
    winner = json.loads((run_dir / "summary.json").read_text())["winner"]
    rows = {(row[0], row[1]): row[3] for row in ledger_rows(run_dir)}
    return rows[winner["generation"], winner["index"]]


def final_digest(run_dir: Path) -> str:
    final = run_dir / "final"
    return checkpoint_digest(final, parameter_names(final))


# ---- non-finite sources -------------------------------------------------------------------------------


@pytest.mark.slow  # loads every source
def test_a_nan_source_is_refused_in_one_line_before_the_run_directory(nan_sources, tiny_evals, tmp_path):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(nan_sources, tiny_evals, run_dir))
    line = assert_one_line_error(run_merger("run", str(recipe)), "source specialist1", BAD_TENSOR, "5 NaN")
    assert "allow_nonfinite" in line
    assert not run_dir.exists()  # nothing written: fixing the checkpoint and running again just starts


def test_allow_nonfinite_needs_the_mergekit_engine(nan_sources, tiny_evals, tmp_path):
    recipe = write_recipe(
        tmp_path / "recipe.yaml", tiny_recipe(nan_sources, tiny_evals, tmp_path / "run", allow_nonfinite=True)
    )
    assert_one_line_error(run_merger("run", str(recipe)), "allow_nonfinite: true needs engine.kind: mergekit")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a `merger run` subprocess
def test_allowed_nan_source_goes_to_mergekit_and_its_candidates_fail_with_the_reason(
    nan_sources, tiny_evals, tmp_path
):
    """Allowed, the NaN reaches mergekit's merge (what the export computes too); merged weights holding NaN
    fail their candidate, recorded with the reason, never scored."""
    run_dir = tmp_path / "run"
    data = tiny_recipe(
        nan_sources,
        tiny_evals,
        run_dir,
        allow_nonfinite=True,
        engine={"kind": "mergekit"},
        genome={
            "method": "task_arithmetic",
            "layer_granularity": 2,
            "parameters": {"weight": {"min": 0.1, "max": 1.0}},
        },
        optimizer={"popsize": 4, "max_evaluations": 4, "seed": 3},
    )
    process = run_merger("run", str(write_recipe(tmp_path / "recipe.yaml", data)), "--no-progress")
    assert_ends_in_error(process, "every candidate failed")
    rows = ledger_rows(run_dir)
    assert len(rows) == 4
    assert all("NaN or inf" in row[4] and BAD_TENSOR in row[4] for row in rows)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("engine", ["resident", "streaming", "mergekit"])
def test_every_engine_refuses_a_nonfinite_source_as_it_loads(tiny_sources, tmp_path, value, engine):
    sources = {
        **tiny_sources,
        "specialist2": nonfinite_copy(tiny_sources["specialist2"], tmp_path / "s2", value),
    }
    with pytest.raises(MergerError, match=f"source specialist2: tensor {BAD_TENSOR} holds"):
        if engine == "mergekit":
            MergekitEngine(sources, "base", dtype=torch.float32, device="cpu", seed=0)
        else:
            ResidentEngine(sources, "base", "ties", streaming=engine == "streaming")


# ---- the exported winner is the scored one ------------------------------------------------------------


@pytest.mark.slow  # a `merger run` subprocess
def test_ledger_digests_and_the_export_is_verified_when_mergekit_is_bit_identical(
    tiny_sources, tiny_evals, tmp_path
):
    """TIES: mergekit's export is the engine's candidate bit for bit; final/ is mergekit's, digest equal."""
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tiny_sources, tiny_evals, run_dir))
    process = run_merger("run", str(recipe), "--no-progress")
    assert process.returncode == 0, process.stderr[-2000:]
    digests = [row[3] for row in ledger_rows(run_dir)]
    assert all(d.startswith("xxh3-128:") for d in digests) and len(set(digests)) == len(digests)
    assert final_digest(run_dir) == winner_digest(run_dir)
    assert "differs from the scored winner" not in process.stderr


@pytest.mark.slow  # a `merger run` subprocess
def test_dare_export_holds_the_scored_weights_not_mergekits_own_draw(tiny_sources, tiny_evals, tmp_path):
    """DARE below density 1: the engine's random numbers are not mergekit's, so mergekit's export of
    best.yaml is another model; final/ holds the scored weights, proven by the digest."""
    run_dir = tmp_path / "run"
    data = tiny_recipe(tiny_sources, tiny_evals, run_dir, genome=DARE)
    process = run_merger("run", str(write_recipe(tmp_path / "recipe.yaml", data)), "--no-progress")
    assert process.returncode == 0, process.stderr[-2000:]
    assert "mergekit's export of best.yaml differs from the scored winner" in process.stderr
    assert final_digest(run_dir) == winner_digest(run_dir)
    mergekit_only = tmp_path / "mergekit"
    from mergekit.config import MergeConfiguration

    export_merge(MergeConfiguration.model_validate(_yaml(run_dir / "best.yaml")), mergekit_only, seed=3)
    assert checkpoint_digest(mergekit_only, parameter_names(mergekit_only)) != winner_digest(run_dir)


def _yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.mark.slow  # two `merger run` subprocesses
def test_a_winner_whose_weights_are_not_the_scored_ones_is_not_exported_nor_published(
    tiny_sources, tiny_evals, tmp_path
):
    run_dir = tmp_path / "run"
    data = tiny_recipe(
        tiny_sources,
        tiny_evals,
        run_dir,
        output={"run_dir": str(run_dir), "publish": "tiny-winner", "registry": str(tmp_path / "registry")},
    )
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    first = run_merger("run", str(recipe), "--no-progress")
    assert first.returncode == 0 and "published tiny-winner@1" in first.stdout, first.stderr[-2000:]
    winner = json.loads((run_dir / "summary.json").read_text())["winner"]
    # as if what was scored had been another model: the ledger's digest of the winner no longer matches
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        db.execute(
            "UPDATE evaluations SET digest = 'xxh3-128:0' WHERE generation = ? AND idx = ?",
            (winner["generation"], winner["index"]),
        )
    shutil.rmtree(run_dir / "final")
    (run_dir / "summary.json").unlink()
    second = run_merger("run", str(recipe), "--no-progress")
    assert_ends_in_error(second, "is not the model that was scored", "xxh3-128:0", "nothing was exported")
    assert not (run_dir / "final").exists()
    assert [entry.ref.version for entry in Registry(tmp_path / "registry").entries("tiny-winner")] == [1]


def test_match_scored_weights_on_a_tampered_export(tiny_sources, tiny_evals, tmp_path):
    """A final/ whose file changed after the engine wrote it is refused; the unchanged one passes."""
    recipe = parse_recipe(tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run"))
    paths = resolve_sources(recipe)
    genome = Genome(recipe, paths, 4)
    executor = InProcessExecutor(recipe, paths, genome)
    genotype = np.full(genome.dimension, 0.4)
    record = candidate_record(0, 0, genotype, executor.worker.score(ScoreJob("0/0", genotype)), recipe.fitness)
    staging = tmp_path / "staging"
    export_merge(genome.to_config(genotype), staging, seed=3)
    match_scored_weights(executor, record, staging)  # TIES: mergekit's own export is the scored model
    weights = load_file(staging / "model.safetensors")
    weights[BAD_TENSOR][0, 0] += 1.0
    save_file(weights, staging / "model.safetensors", metadata={"format": "pt"})
    match_scored_weights(executor, record, staging)  # the engine's weights are written back
    assert checkpoint_digest(staging, parameter_names(staging)) == record.digest
    record.digest = "xxh3-128:0"
    with pytest.raises(MergerError, match="is not the model that was scored"):
        match_scored_weights(executor, record, staging)


def test_a_ledger_from_before_digests_gains_the_column_and_keeps_its_rows(tmp_path):
    from merger.rundir.ledger import SCHEMA, EvaluationRecord, Ledger

    old_schema = SCHEMA.replace("    digest TEXT,\n", "")
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        db.executescript(old_schema)
        db.execute("INSERT INTO evaluations VALUES (0, 0, '[0.5]', 'x', '{}', 0.5, -0.5, 1, 1, NULL, 0)")
    ledger = Ledger(tmp_path)
    ledger.record_evaluation(EvaluationRecord(0, 1, [0.25], "y", score=0.75, digest="xxh3-128:1"))
    assert [(r.index, r.score, r.digest) for r in ledger.evaluations()] == [
        (0, 0.5, None),
        (1, 0.75, "xxh3-128:1"),
    ]
    ledger.close()


BIT_IDENTICAL = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "della"]


@pytest.mark.parametrize("method", [*BIT_IDENTICAL, "linear", "slerp"])
def test_which_methods_mergekit_reproduces_bit_for_bit(tiny_sources, method):
    """What `scored_export` relies on and the README states: mergekit's merge is the resident engine's
    candidate bit for bit for these methods (DARE / DELLA at density 1), and within float32 rounding, not
    bit for bit, for linear and slerp; there the scored weights are written over mergekit's export."""
    from merger.engine.reference import merge_in_memory
    from tests.test_engine import DETERMINISTIC, _config, _engine, _plan, _weights

    paths = {name: tiny_sources[name] for name in ("base", "specialist1", "specialist2")}
    first, second, shared = DETERMINISTIC[method]
    config = _config(method, paths, (first, second), shared)
    engine = _engine(paths, method)
    engine.apply(_plan(engine, config, paths))
    ours, reference = _weights(engine), merge_in_memory(config, seed=0)
    identical = all(torch.equal(ours[name], reference[name]) for name in ours)
    assert identical == (method in BIT_IDENTICAL)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=3e-7)


@pytest.mark.slow  # a `merger run` subprocess
def test_racing_records_carry_digests_and_the_export_is_verified(tiny_sources, tiny_evals, tmp_path):
    """fitness.strategy racing merges a candidate per item block: its record still has the merge's digest."""
    run_dir = tmp_path / "run"
    data = tiny_recipe(tiny_sources, tiny_evals, run_dir, genome=DARE, fitness={"strategy": "racing"})
    process = run_merger("run", str(write_recipe(tmp_path / "recipe.yaml", data)), "--no-progress")
    assert process.returncode == 0, process.stderr[-2000:]
    digests = [row[3] for row in ledger_rows(run_dir)]
    assert digests and all(d and d.startswith("xxh3-128:") for d in digests)
    assert final_digest(run_dir) == winner_digest(run_dir)
