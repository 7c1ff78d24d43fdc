"""The end of a run, in order: the untuned models scored (merger.finish.baselines), the winner chosen
on the validation set or by fitness (merger.finish.selection), exported by mergekit and checked against
what was scored (merger.finish.export), scored on every eval set (merger.finish.scores), and the model
card (merger.rundir.render) and summary.json (merger.finish.summary) written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from merger.common.files import write_atomic
from merger.finish.baselines import untuned_models
from merger.finish.export import export_winner
from merger.finish.scores import score_final
from merger.finish.selection import select_winner
from merger.finish.summary import build_summary
from merger.recipe import Recipe
from merger.recipe.baselines import plan_baselines
from merger.rundir.layout import CARD_FILE, RunDir
from merger.rundir.render import model_card
from merger.rundir.summary import MethodChosen, Summary
from merger.scoring.fitness import eval_sets
from merger.search.loop import SearchResult
from merger.search.open import OpenRun


def finished_summary(run_dir: Path, result: SearchResult, recipe: Recipe, member: str | None = None) -> Summary | None:
    """The summary of a run that already finished with this result (rerunning it re-scores nothing), and
    with `member` as its winner when one is asked for."""
    layout = RunDir(run_dir)
    if not layout.final.is_dir():
        return None
    summary = layout.read_summary()
    if summary is None or summary.evaluations != result.evaluations:
        return None
    if recipe.selects:
        if summary.selection is None or (member is not None and summary.selection.chosen != member):
            return None
        return summary
    same_winner = summary.selection is None and result.best is not None and summary.winner.genotype == list(result.best.genotype)
    return summary if same_winner else None


def finish_run(
    run: OpenRun, result: SearchResult, member: str | None = None, method_chosen: MethodChosen | None = None
) -> Summary:
    """Score the untuned models, choose the winner (or the front member `member`), export it, score it on
    every eval set, write the model card and summary.json (with `method_chosen`, how `method: auto` chose);
    each step resumable (its results are in the ledger as they come)."""
    layout = run.layout
    baselines = plan_baselines(run.recipe, run.source_paths)
    untuned = untuned_models(run, baselines)
    raced = run.recipe.selects and run.recipe.selection.block is not None
    # under a selection race the untuned models' validation scores come from the race
    scores = score_final(run, untuned, [s for s in eval_sets(run.recipe) if not (raced and s == "validation")])
    chosen, selection = select_winner(run, result, untuned, scores, member)
    winner, config_yaml = export_winner(run, chosen)
    scores.update(score_final(run, [winner]))
    summary = build_summary(run, chosen, result, scores, baselines, selection, method_chosen)
    write_atomic(layout.final / CARD_FILE, model_card(summary, config_yaml).encode())
    layout.write_summary(summary)
    for name in baselines.configs:  # scored and kept in the ledger: only their YAML stays
        shutil.rmtree(layout.baseline(name), ignore_errors=True)
    return summary
