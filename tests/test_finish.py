"""The end of a run: untuned baselines in every table, finishing resumable after SIGKILL, sources hashed
once per run, and the run directory's typed summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import merger.cli
import merger.registry.files
from merger.common.errors import MergerError
from merger.finish import scores as final_scores
from merger.finish.final import finish_run
from merger.recipe import parse_recipe
from merger.registry import Registry
from merger.rundir.layout import RunDir
from merger.rundir.ledger import Ledger
from merger.search.loop import Search
from merger.search.open import open_run, prepare_run_dir
from tests.recipes import tiny_recipe, without_timings, write_recipe

REPO = Path(__file__).resolve().parent.parent
BASELINES = {"defaults", "linear", "model_stock", "karcher"}
SETS = ("fitness", "validation", "test")
KILLED_AFTER = 5  # final scores before the SIGKILL


def small_recipe(tiny_sources: dict[str, Path], tiny_evals: Path, run_dir: Path, **overrides: Any) -> dict:
    """One generation of 4 TIES candidates; fitness, validation and test sets (the winner has a final score on each)."""
    return tiny_recipe(
        tiny_sources,
        tiny_evals,
        run_dir,
        optimizer={"popsize": 4, "max_evaluations": 4, "seed": 3},
        fitness={"tasks": [{"name": "tiny_mc", "metric": "acc"}], "limit": 8},
        **overrides,
    )


def run_command(recipe: Path, *extra: str) -> int:
    return merger.cli.main(["run", str(recipe), "--no-progress", *extra])




def final_score_rows(run_dir: Path) -> list[tuple[str, str]]:
    ledger = Ledger(run_dir)
    try:
        return [(row.model, row.eval_set) for row in ledger.final_scores()]
    finally:
        ledger.close()


@pytest.mark.slow
def test_every_table_shows_the_untuned_baselines(tiny_sources, tiny_evals, tmp_path, capsys):
    registry = tmp_path / "registry"
    data = small_recipe(
        tiny_sources, tiny_evals, tmp_path / "run", output={"publish": "tiny", "registry": str(registry)}
    )
    assert run_command(write_recipe(tmp_path / "recipe.yaml", data)) == 0
    table = capsys.readouterr().out
    layout = RunDir(tmp_path / "run")
    summary = json.loads(layout.summary.read_text())

    assert set(summary["baselines"]) == BASELINES and summary["baselines_skipped"] == {}
    for name, baseline in summary["baselines"].items():
        assert set(baseline["test"]) == set(summary["winner"]["test"]) == {"tiny_mc"}
        # chosen on validation: no decision reads an untuned model's fitness, so it is not scored
        assert set(baseline["validation"]) == {"tiny_gen"} and "fitness" not in baseline
        assert layout.baseline_config(name).read_text() == baseline["config"]
        assert not layout.baseline(name).exists()  # scored and kept in the ledger: only the YAML stays
    assert summary["baselines"]["defaults"]["method"] == "ties"
    assert "density: 0.5" in summary["baselines"]["defaults"]["config"]
    assert summary["baselines"]["linear"]["config"].count("weight: 0.333333333333") == 3

    # The same numbers in the terminal table, the report and the model card.
    linear_test = f"{summary['baselines']['linear']['test']['tiny_mc']:.3f}"
    row = next(line for line in table.splitlines() if line.startswith("baseline: linear"))
    assert linear_test in row
    assert merger.cli.main(["report", str(layout.path)]) == 0
    page = (layout.path / "report.html").read_text()
    assert "baseline: karcher" in page and "baseline: linear" in page and linear_test in page
    card = (Registry(registry).show("tiny").path / "README.md").read_text()
    card_row = next(line for line in card.splitlines() if line.startswith("| baseline: linear |"))
    assert linear_test in card_row
    assert card == (layout.final / "README.md").read_text()  # one card: the run's is the registry entry's


@pytest.mark.slow
def test_no_baselines_when_the_recipe_turns_them_off(tiny_sources, tiny_evals, tmp_path):
    data = small_recipe(tiny_sources, tiny_evals, tmp_path / "run", baselines=[])
    assert run_command(write_recipe(tmp_path / "recipe.yaml", data)) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["baselines"] == {} and not (tmp_path / "run" / "baselines").exists()
    rows = final_score_rows(tmp_path / "run")
    whole = [model for model, _ in rows if "/" not in model]  # finalist candidates: a validation row each
    assert sorted(set(whole)) == ["source:base", "source:specialist1", "source:specialist2", "winner"]
    # the sources on validation and test, the winner on every set
    assert len(whole) == 3 * 2 + len(SETS) and all(s == "validation" for m, s in rows if "/" in m)


def test_a_baseline_that_does_not_apply_is_skipped_with_its_reason(tiny_sources, tiny_evals, tmp_path):
    from merger.recipe.baselines import plan_baselines

    two = {name: tiny_sources[name] for name in ("base", "specialist1")}
    recipe = parse_recipe(small_recipe(two, tiny_evals, tmp_path / "run"))
    plan = plan_baselines(recipe, two)
    assert set(plan.configs) == {"defaults", "linear", "karcher"}
    assert "model_stock" in plan.skipped["model_stock"] and "3 or more" in plan.skipped["model_stock"]
    linear_genome = {"method": "linear", "parameters": {"weight": {"min": 0.0, "max": 1.0}}}
    linear = parse_recipe(small_recipe(tiny_sources, tiny_evals, tmp_path / "run", genome=linear_genome))
    assert parse_recipe(
        small_recipe(tiny_sources, tiny_evals, tmp_path / "run", baselines=["linear"])
    ).baselines == ["linear"]
    assert plan_baselines(linear, tiny_sources).skipped["linear"] == "the same merge as defaults"


@pytest.mark.slow
def test_sigkill_while_finishing_resumes_with_only_the_missing_scores(
    tiny_sources, tiny_evals, tmp_path, monkeypatch
):
    data = small_recipe(tiny_sources, tiny_evals, tmp_path / "killed")
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    assert run_command(recipe, "--run-dir", str(tmp_path / "uninterrupted")) == 0
    reference = json.loads((tmp_path / "uninterrupted" / "summary.json").read_text())
    total = len(final_score_rows(tmp_path / "uninterrupted"))
    assert total > (3 + 4) * 2  # sources and baselines on test and validation, the finalists, the winner

    # A real `merger run` process, SIGKILLed right after its 5th final score (the test scores of 5 of the
    # 7 untuned models), before selection and the winner's export.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    killed = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "kill_after_final_scores.py"),
            str(KILLED_AFTER),
            "run",
            str(recipe),
            "--no-progress",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    layout = RunDir(tmp_path / "killed")
    before = final_score_rows(layout.path)
    assert len(before) == KILLED_AFTER and not layout.summary.exists()
    exported = {
        path / "model.safetensors": (path / "model.safetensors").stat().st_ino
        for path in (layout.baseline(name) for name in BASELINES)
        if (path / "model.safetensors").exists()
    }

    scored: list[tuple[Any, str]] = []
    scored_files: dict[Path, int] = {}
    original = final_scores.score_models

    def spy(executor: Any, jobs: list, on_result: Any = None) -> list:
        scored.extend(jobs)
        files = [model / "model.safetensors" for model, _ in jobs if isinstance(model, Path)]
        scored_files.update({file: file.stat().st_ino for file in files})
        return original(executor, jobs, on_result)

    monkeypatch.setattr(final_scores, "score_models", spy)
    assert run_command(recipe) == 0
    after = final_score_rows(layout.path)
    assert after[:KILLED_AFTER] == before and len(after) == total
    assert len(scored) <= total - KILLED_AFTER  # only what the ledger lacked (a score reused by identity is not scored)
    assert {file: exported[file] for file in scored_files if file in exported} == {
        file: inode for file, inode in scored_files.items() if file in exported
    }  # exports made before the kill are reused, not redone
    resumed = json.loads(layout.summary.read_text())
    assert without_timings(resumed) == without_timings(reference)
    assert set(resumed["baselines"]) == BASELINES


@pytest.mark.slow  # a search and its end
def test_finishing_hashes_no_source_again(tiny_sources, tiny_evals, tmp_path, monkeypatch):
    """Sources are hashed once, when the run opens; finishing and a resumed session reuse the digests."""
    hashed: list[Path] = []
    sha256_file = merger.registry.files.sha256_file

    def counting(path: Path) -> Any:
        hashed.append(Path(path))
        return sha256_file(path)

    monkeypatch.setattr(merger.registry.files, "sha256_file", counting)
    source_root = next(iter(tiny_sources.values())).parent.resolve()

    def sources_hashed() -> int:
        return sum(path.resolve().is_relative_to(source_root) for path in hashed)

    data = small_recipe(tiny_sources, tiny_evals, tmp_path / "run", baselines=["linear"], validation=None)
    with open_run(parse_recipe(data), tmp_path / "run") as run:
        assert sources_hashed() == 3  # one weight file per source
        result = Search(run).run()
        hashed.clear()
        summary = finish_run(run, result)
    assert sources_hashed() == 0
    assert {name: entry.sha256 for name, entry in summary.lineage.items()} == {
        name: merger.registry.weights_digest(path) for name, path in tiny_sources.items()
    }
    hashed.clear()
    with open_run(parse_recipe(data), tmp_path / "run") as run:
        resuming = run.resuming
    assert resuming and sources_hashed() == 0


def test_old_summaries_still_read(tmp_path):
    """summary.json written before baselines existed (and a winner fitness that is one number)."""
    layout = RunDir(tmp_path)
    old = {
        "winner": {"validation": {"t": 0.5}, "fitness": 0.625, "genotype": [0.1]},
        "sources": {"a": {"validation": {"t": 0.25}}},
        "evaluations": 24,
        "budget": {"evaluations": 24, "seconds": 60},
        "lineage": {"a": {"path": "/x", "registry": None, "sha256": "00"}},
        "something_newer": {"kept": True},
    }
    layout.summary.write_text(json.dumps(old))
    summary = layout.read_summary()
    assert summary is not None and summary.fitness == 0.625 and summary.baselines == {}
    assert list(summary.score_rows()) == ["a", "WINNER"] and summary.score_columns() == [("validation", "t")]
    layout.write_summary(summary)
    assert json.loads(layout.summary.read_text()) == old


def test_a_run_stored_before_baselines_existed_still_resumes(tiny_sources, tiny_evals, tmp_path):
    """A run directory's recipe.yaml written without the `baselines` field is the same recipe."""
    recipe = parse_recipe(small_recipe(tiny_sources, tiny_evals, tmp_path / "run"))
    assert prepare_run_dir(recipe, tmp_path / "run") is False
    stored = RunDir(tmp_path / "run").recipe
    old = yaml.safe_load(stored.read_text())
    del old["baselines"]
    stored.write_text(yaml.safe_dump(old, sort_keys=False))
    assert prepare_run_dir(recipe, tmp_path / "run") is True
    other = parse_recipe(small_recipe(tiny_sources, tiny_evals, tmp_path / "run", baselines=[]))
    with pytest.raises(MergerError, match="different recipe"):
        prepare_run_dir(other, tmp_path / "run")
