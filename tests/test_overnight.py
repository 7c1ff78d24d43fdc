"""Runs left alone: SIGTERM/SIGINT finish what is in flight and resume to the uninterrupted result;
the wall-clock budget holds across sessions."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from merger.commands.status import status_text
from merger.common.stopping import StopRequest
from merger.recipe import parse_recipe
from merger.rundir.ledger import Ledger
from merger.search.loop import Search
from merger.search.open import open_run
from merger.search.state import load_state

REPO = Path(__file__).resolve().parent.parent
POPSIZE = 4


def recipe_data(sources: dict[str, Path], evals: Path, **overrides: Any) -> dict[str, Any]:
    """A small task-arithmetic search on the tiny fixtures: 2 layer groups x 2 specialists."""
    data: dict[str, Any] = {
        "sources": [{"name": name, "path": str(path)} for name, path in sources.items()],
        "base_model": "base",
        "genome": {
            "method": "task_arithmetic",
            "layer_granularity": 2,
            "parameters": {"weight": {"min": 0.0, "max": 1.0}},
        },
        "optimizer": {"popsize": POPSIZE, "max_evaluations": 8, "seed": 5},
        "fitness": {"tasks": [{"name": "tiny_mc", "metric": "acc"}], "limit": 12},
        "task_paths": [str(evals)],
        "baselines": [],  # no untuned warm start: generations of POPSIZE from the first evaluation
    }
    data.update(overrides)
    return data


def run_here(data: dict[str, Any], run_dir: Path, stop_after: int | None = None) -> tuple[Any, list]:
    """Run (or resume) the search in this process; with `stop_after`, a stop is requested after that
    many new evaluations, as the first SIGTERM would."""
    evaluated: list[tuple[int, int]] = []
    stop = StopRequest()

    def progress(info: dict) -> None:
        if "record" in info:
            evaluated.append((info["generation"], info["record"].index))
            if stop_after is not None and len(evaluated) >= stop_after:
                stop.requested = True

    with open_run(parse_recipe(data), run_dir) as run:
        return Search(run, progress).run(stop), evaluated


def ledger_rows(run_dir: Path) -> list[tuple]:
    path = run_dir / "ledger.sqlite"
    if not path.exists():
        return []
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return db.execute(
                "SELECT generation, idx, genotype, score FROM evaluations ORDER BY 1, 2"
            ).fetchall()
    except sqlite3.OperationalError:  # created but the schema not yet written
        return []


def start_run(recipe: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "merger.cli", "run", str(recipe), "--no-progress"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_rows(process: subprocess.Popen, run_dir: Path, count: int) -> None:
    deadline = time.time() + 300
    while len(ledger_rows(run_dir)) < count:
        if process.poll() is not None:
            pytest.fail(f"the run ended before the signal: {process.communicate()[1][-2000:]}")
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.02)


@pytest.mark.slow  # three `merger run` subprocesses
def test_sigterm_mid_generation_then_resume_equals_an_uninterrupted_run(tiny_sources, tiny_evals, tmp_path):
    data = recipe_data(tiny_sources, tiny_evals)
    reference, _ = run_here(data, tmp_path / "uninterrupted")

    run_dir = tmp_path / "interrupted"
    recipe = tmp_path / "recipe.yaml"
    data = {**data, "output": {"run_dir": str(run_dir)}}  # the run directory is part of the stored recipe
    recipe.write_text(yaml.safe_dump(data))

    # First session: one SIGTERM right after the first evaluation of generation 0.
    process = start_run(recipe)
    wait_for_rows(process, run_dir, 1)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    status = out.strip().splitlines()
    assert len(status) == 1 and status[0].startswith("stopped after") and "resume" in status[0]
    first_session = ledger_rows(run_dir)
    assert 1 <= len(first_session) < POPSIZE  # the evaluation in flight finished and was recorded
    state = load_state(run_dir)
    assert state is not None and state.generation == 0 and state.pending is not None

    # Second session: two signals after one more evaluation. The second stops it at once (exit 130)
    # unless the tiny evaluation in flight already finished and the run stopped cleanly in between:
    # then the second lands after the stop (exit 0) or in interpreter shutdown (killed by SIGINT).
    # test_a_second_signal_stops_at_once covers the second signal without this race.
    process = start_run(recipe)
    wait_for_rows(process, run_dir, len(first_session) + 1)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode in (0, 130, -signal.SIGINT), err[-2000:]
    if process.returncode == 0:
        assert out.strip().startswith("stopped after"), out
    second_session = ledger_rows(run_dir)
    assert second_session[: len(first_session)] == first_session  # nothing recorded was lost or changed

    # Third session: resume to the end; only what the ledger lacked is evaluated.
    resumed, evaluated = run_here(data, run_dir)
    assert len(evaluated) == 8 - len(second_session)
    assert not set(evaluated) & {(row[0], row[1]) for row in second_session}
    assert resumed.evaluations == 8 and not resumed.stopped_early
    assert resumed.best.genotype == pytest.approx(reference.best.genotype)
    assert resumed.best.score == reference.best.score
    assert [row[:2] + (row[3],) for row in ledger_rows(run_dir)] == [
        row[:2] + (row[3],) for row in ledger_rows(tmp_path / "uninterrupted")
    ]


@pytest.mark.slow  # a search and a resume
def test_wall_clock_budget_holds_across_a_resume(tiny_sources, tiny_evals, tmp_path):
    """max_seconds counts every session: a stopped run resumes its pending generation, then ends."""
    data = recipe_data(
        tiny_sources, tiny_evals, optimizer={"popsize": POPSIZE, "max_evaluations": None, "max_seconds": 0.01}
    )
    run_dir = tmp_path / "run"
    first, evaluated = run_here(data, run_dir, stop_after=1)
    assert first.stopped_early and len(evaluated) == 1
    spent = load_state(run_dir).seconds
    assert spent > 0.01  # over budget already, but mid-generation

    second, evaluated = run_here(data, run_dir)
    assert not second.stopped_early
    assert len(evaluated) == POPSIZE - 1  # the pending generation is completed, no new one is asked
    assert second.generations == 1 and second.evaluations == POPSIZE
    assert load_state(run_dir).seconds > spent
    ledger = Ledger(run_dir)
    assert "estimated time left: 0 s (0 generations)" in status_text(ledger)  # the clock, not evaluations
    ledger.close()

    third, evaluated = run_here(data, run_dir)
    assert evaluated == [] and third.evaluations == POPSIZE


def test_a_second_signal_stops_at_once():
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)


def test_an_interrupted_command_exits_130_with_one_line(monkeypatch, capsys):
    from merger import cli
    from merger.commands import run as run_command

    def interrupted(args: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(run_command, "run_command", interrupted)
    assert cli.main(["run", "recipe.yaml"]) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "merger: interrupted"

