"""Selection on unseen data: the finalists (top candidates by fitness, every baseline, every source) are
scored on the validation set and the best is exported; the baselines the genome can express are warm
starts; bad selection blocks are refused in one line before any weights load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import merger.cli
from merger.finish.models import FinalModel
from merger.finish.selection import Contender, choose, selection_note, with_margins
from merger.recipe import SelectionSpec, parse_recipe
from merger.rundir.layout import RunDir
from merger.rundir.ledger import WARM_START_GENERATION, Ledger
from merger.rundir.summary import Finalist
from merger.scoring.uncertainty import paired_difference, standard_error
from merger.space.parameters import Genome
from tests.recipes import tiny_recipe, without_timings, write_recipe

REPO = Path(__file__).resolve().parent.parent


def contender(kind: str, name: str) -> Contender:
    return Contender(FinalModel(name, None, f"id:{name}"), kind, name)


def row(kind: str, name: str, fitness: float, selection: float) -> Finalist:
    return Finalist(name=name, kind=kind, fitness=fitness, selection=selection)


KNOWN = [  # (kind, name, fitness, selection): the best fitness is not the best on selection
    ("baseline", "baseline: linear", 0.50, 0.70),
    ("source", "add", 0.30, 0.40),
    ("candidate", "gen 2 #1", 0.80, 0.65),
    ("candidate", "gen 1 #3", 0.75, 0.60),
]


BEST = SelectionSpec(top_k=2, rule="best")
CONFIDENT = SelectionSpec(top_k=2, rule="confident")


def test_selection_picks_the_baseline_when_it_is_better_on_the_selection_set():
    contenders = [contender(kind, name) for kind, name, _, _ in KNOWN]
    rows = [row(*entry) for entry in KNOWN]
    for rule in (BEST, CONFIDENT):
        winner, selection = choose(contenders, rows, rule)
        assert winner.name == "baseline: linear" and selection.kind == "baseline"
        assert selection.chosen == "baseline: linear" and len(selection.finalists) == 4
    note = selection_note(selection)
    assert note is not None and "'linear'" in note and "0.700" in note and "0.650" in note and "\n" not in note


def test_a_candidate_wins_only_when_better_than_every_untuned_model():
    contenders = [contender(kind, name) for kind, name, _, _ in KNOWN]
    better = [row(*entry) for entry in KNOWN]
    better[2] = row("candidate", "gen 2 #1", 0.80, 0.71)
    winner, selection = choose(contenders, better, BEST)
    assert winner.name == "gen 2 #1" and selection_note(selection) is None
    tied = [row(*entry) for entry in KNOWN]
    tied[2] = row("candidate", "gen 2 #1", 0.80, 0.70)
    assert choose(contenders, tied, BEST)[0].name == "baseline: linear"


def items(values: list[float]) -> dict[str, dict[int, float]]:
    return {"t": dict(enumerate(values))}


def test_the_confident_rule_needs_a_lead_beyond_the_noise():
    """On 200 shared items: a candidate one item ahead of the best untuned finalist is noise, one 30
    items ahead is not; the confident rule exports the first only under `best`."""
    rng = np.random.default_rng(0)
    base = (rng.random(200) < 0.5).astype(float)
    baseline = base.copy()
    slightly = base.copy()
    slightly[np.flatnonzero(base == 0)[:1]] = 1.0  # one more item right
    clearly = base.copy()
    clearly[np.flatnonzero(base == 0)[:30]] = 1.0  # thirty more
    mean = lambda means: means["t"]  # noqa: E731
    for candidate, expected in ((slightly, "baseline: linear"), (clearly, "gen 2 #1")):
        names = [("baseline", "baseline: linear"), ("candidate", "gen 2 #1")]
        values = [baseline, candidate]
        rows = [row(kind, name, 0.5, float(v.mean())) for (kind, name), v in zip(names, values, strict=True)]
        rows = with_margins(rows, [items(list(v)) for v in values], mean, confidence=0.95)
        contenders = [contender(kind, name) for kind, name in names]
        assert choose(contenders, rows, CONFIDENT)[0].name == expected
        assert choose(contenders, rows, BEST)[0].name == "gen 2 #1"
        assert rows[1].reference == "baseline: linear" and rows[1].lower_bound is not None
        assert (rows[1].lower_bound > 0) == (expected == "gen 2 #1")


def test_bootstrap_standard_error_and_paired_interval():
    rng = np.random.default_rng(1)
    a = {"t": {i: float(v) for i, v in enumerate(rng.random(200) < 0.7)}}
    se = standard_error(a, lambda means: means["t"])
    assert se == pytest.approx(np.sqrt(0.7 * 0.3 / 200), rel=0.2)
    b = {"t": {i: value if i % 5 else 0.0 for i, value in a["t"].items()}}  # a, with every 5th item lost
    point, low, high = paired_difference(a, b, lambda means: means["t"])
    assert low <= point <= high and low > 0  # paired: the shared items cancel, the gap is clear
    assert paired_difference(a, a, lambda means: means["t"]) == (0.0, 0.0, 0.0)


def test_the_searched_methods_untuned_merge_is_the_warm_start(tiny_sources, tiny_evals, tmp_path):
    data = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run")
    genome = Genome(parse_recipe(data), tiny_sources, 4)
    (start,) = genome.warm_start()
    assert start.label == "baseline defaults"
    values = {gene.parameter: value for gene, value in zip(genome.genes, genome.decode(start.genotype), strict=True)}
    assert values == {"weight": pytest.approx(0.5), "density": pytest.approx(0.5)}  # 1/2 specialists; 0.5
    fixed = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run", genome={"parameters": {
        "weight": {"min": 0.0, "max": 1.0}, "density": 0.9}})
    assert Genome(parse_recipe(fixed), tiny_sources, 4).warm_start() == []  # density fixed off its untuned 0.5
    narrow = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run", genome={"parameters": {
        "weight": {"min": 0.6, "max": 1.0}, "density": {"min": 0.2, "max": 1.0}}})
    assert Genome(parse_recipe(narrow), tiny_sources, 4).warm_start() == []  # 0.5 is outside the range
    grid = tiny_recipe(tiny_sources, tiny_evals, tmp_path / "run", optimizer={"x0": "grid"})
    labels = [start.label for start in Genome(parse_recipe(grid), tiny_sources, 4).warm_start()]
    assert labels[0] == "baseline defaults" and len(labels) == 6


def small(tiny_sources, tiny_evals, run_dir: Path, **overrides) -> dict:
    settings = {
        "optimizer": {"popsize": 4, "max_evaluations": 5, "seed": 3},
        "fitness": {"tasks": [{"name": "tiny_mc", "metric": "acc"}], "limit": 8},
        "validation": {"tasks": ["tiny_gen"], "limit": 8},
        "selection": {"top_k": 3},
    }
    return tiny_recipe(tiny_sources, tiny_evals, run_dir, **{**settings, **overrides})


def final_rows(run_dir: Path) -> list[tuple[str, str, str]]:
    ledger = Ledger(run_dir)
    try:
        return [(row.model, row.eval_set, row.identity) for row in ledger.final_scores()]
    finally:
        ledger.close()


@pytest.mark.slow  # a whole run
def test_a_run_selects_on_validation_and_exports_what_it_selected(tiny_sources, tiny_evals, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", small(tiny_sources, tiny_evals, tmp_path / "run"))
    assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0
    out = capsys.readouterr().out
    layout = RunDir(tmp_path / "run")
    summary = layout.read_summary()
    assert summary is not None and summary.selection is not None
    selection = summary.selection
    kinds = [finalist.kind for finalist in selection.finalists]
    assert kinds == ["baseline"] * 4 + ["source"] * 3 + ["candidate"] * 3
    untuned = [f for f in selection.finalists if f.kind != "candidate"]
    top = max((f for f in selection.finalists if f.kind == "candidate"), key=lambda f: f.selection)
    eligible = untuned + ([top] if (top.lower_bound or 0.0) > 0.0 else [])
    best = max(finalist.selection for finalist in eligible)
    chosen = next(f for f in selection.finalists if f.name == selection.chosen)
    assert selection.rule == "confident" and chosen in eligible
    assert chosen.selection == best and summary.winner.validation == {"tiny_gen": best}
    assert all(f.lower_bound is not None for f in selection.finalists if f.kind == "candidate")
    assert all(f.selection_se is not None for f in selection.finalists)
    assert all(f.fitness_se is not None for f in selection.finalists if f.kind == "candidate")
    # the winner is chosen on validation, so no decision reads the untuned models' fitness: not scored
    assert all(f.fitness is None for f in untuned) and "fitness" in summary.winner.by_split()
    assert "finalist" in out and selection.chosen in out and "±" in out
    winner_rows = [row for row in final_rows(layout.path) if row[0] == "winner"]
    assert len(winner_rows) == 3 and all(identity == winner_rows[0][2] for _, _, identity in winner_rows)
    if selection.kind != "candidate":  # the winner is that model's weights: its rows are the winner's
        assert winner_rows[0][2] == chosen.identity
    ledger = Ledger(layout.path)
    try:
        warm = ledger.evaluations(WARM_START_GENERATION)
        assert len(warm) == 1 and ledger.meta().warm_starts == ["baseline defaults"]
        assert ledger.count() == 5  # the warm start is paid from the budget
    finally:
        ledger.close()
    if selection.kind == "candidate":
        generation, index = (int(part) for part in selection.chosen.removeprefix("gen ").split(" #"))
        assert (summary.winner.generation, summary.winner.index) == (generation, index)
    elif selection.kind == "baseline":
        name = selection.chosen.removeprefix("baseline: ")
        assert layout.best_config.read_text() == layout.baseline_config(name).read_text()
        assert selection.chosen in out.splitlines()[-1] or "selection:" in out
    card = (layout.final / "README.md").read_text()
    assert "## Selection" in card and selection.chosen in card


@pytest.mark.slow  # two searches, a SIGKILLed `merger run` and a resume
def test_sigkill_during_selection_resumes_to_the_same_winner(tiny_sources, tiny_evals, tmp_path):
    data = small(tiny_sources, tiny_evals, tmp_path / "killed")
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    assert merger.cli.main(["run", str(recipe), "--no-progress", "--run-dir", str(tmp_path / "whole")]) == 0
    reference = json.loads((tmp_path / "whole" / "summary.json").read_text())
    rows = final_rows(tmp_path / "whole")
    untuned = (3 + 4) * 2  # sources and baselines on validation and test (not fitness: no decision reads it)
    assert all("/" in model and eval_set == "validation" for model, eval_set, _ in rows[untuned:untuned + 3])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    killed = subprocess.run(
        [sys.executable, str(REPO / "tests" / "kill_after_final_scores.py"), str(untuned + 1), "run", str(recipe),
         "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(final_rows(tmp_path / "killed")) == untuned + 1  # killed after the first finalist's selection score
    assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0
    resumed = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert without_timings(resumed) == without_timings(reference)
    assert final_rows(tmp_path / "killed") == rows


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"validation": {"tasks": ["tiny_mc"]}}, "validation: task 'tiny_mc' shares items with fitness task 'tiny_mc'"),
        ({"selection": {"top_k": 0}}, "selection.top_k: Input should be greater than or equal to 1"),
        ({"validation": None, "selection": {"top_k": 2}}, "selection: nothing to select on"),
    ],
)
def test_bad_selection_blocks_get_one_line_before_any_weights_load(
    tiny_sources, tiny_evals, tmp_path, capsys, overrides, message
):
    data = small(tiny_sources, tiny_evals, tmp_path / "run")
    data.update(overrides)
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "ledger.sqlite").exists()


@pytest.mark.slow  # a whole run
def test_selection_turned_off_exports_the_fitness_winner(tiny_sources, tiny_evals, tmp_path):
    data = small(tiny_sources, tiny_evals, tmp_path / "run", selection={"enabled": False})
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    assert merger.cli.main(["run", str(recipe), "--no-progress"]) == 0
    summary = RunDir(tmp_path / "run").read_summary()
    ledger = Ledger(tmp_path / "run")
    try:
        best = ledger.best()
    finally:
        ledger.close()
    assert summary is not None and summary.selection is None and best is not None
    assert summary.winner.genotype == best.genotype


@pytest.mark.slow  # two whole runs
def test_a_shared_score_cache_spares_another_seed_the_untuned_models(
    tiny_sources, tiny_evals, tmp_path, monkeypatch
):
    from merger.finish import scores as final_scores
    from merger.finish.score_cache import SCORE_CACHE_ENV

    monkeypatch.setenv(SCORE_CACHE_ENV, str(tmp_path / "scores"))
    first = write_recipe(tmp_path / "first.yaml", small(tiny_sources, tiny_evals, tmp_path / "first"))
    assert merger.cli.main(["run", str(first), "--no-progress"]) == 0
    scored: list = []
    original = final_scores.score_models

    def spy(executor, jobs, on_result=None):
        scored.extend(jobs)
        return original(executor, jobs, on_result)

    monkeypatch.setattr(final_scores, "score_models", spy)
    data = small(tiny_sources, tiny_evals, tmp_path / "second", optimizer={"popsize": 4, "max_evaluations": 5, "seed": 4})
    second = write_recipe(tmp_path / "second.yaml", data)
    assert merger.cli.main(["run", str(second), "--no-progress"]) == 0
    assert not any(isinstance(model, Path) and model.parent == tiny_sources["base"].parent for model, _ in scored)
    assert not any(isinstance(model, Path) and model.parent.name == "baselines" for model, _ in scored)
    one, two = (RunDir(tmp_path / name).read_summary() for name in ("first", "second"))
    assert one is not None and two is not None
    assert one.sources == two.sources and one.baselines == two.baselines
    ledger = Ledger(tmp_path / "second")
    try:
        rows = ledger.final_scores()
        assert len(rows) >= 7 * 2 and all(ledger.item_outcomes(f"final:{row.identity}") for row in rows)
    finally:
        ledger.close()
    # another thread count may score differently (bf16 kernels split their sums by thread): no sharing
    import torch

    threads = torch.get_num_threads()
    scored.clear()
    torch.set_num_threads(2 if threads == 1 else 1)
    try:
        third = write_recipe(tmp_path / "third.yaml", {**data, "output": {"run_dir": str(tmp_path / "third")}})
        assert merger.cli.main(["run", str(third), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert any(isinstance(model, Path) and model.parent == tiny_sources["base"].parent for model, _ in scored)
