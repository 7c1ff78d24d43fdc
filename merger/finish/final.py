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
from merger.finish.models import FinalModel
from merger.finish.scores import score_final
from merger.finish.selection import best_untuned, select_winner
from merger.finish.summary import build_summary
from merger.recipe import Recipe
from merger.recipe.baselines import plan_baselines
from merger.rundir.layout import CARD_FILE, RunDir
from merger.rundir.render import model_card
from merger.rundir.summary import MethodChosen, Selection, Summary
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


def untuned_sets(recipe: Recipe) -> list[str]:
    """The eval sets the untuned models are scored on before selection: the test set unless only the
    winner's reference is (`selection.final_table: contenders`, scored after selection: `tested_beside`);
    the validation set unless a selection race scores it; the fitness set only where the winner is chosen
    by fitness (where the winner is chosen on validation, their fitness is a column no decision reads,
    shown where the ledger holds it: 9 untuned models cost the skills recipe 1,800 items, 8% of a run)."""
    skipped = set()
    if recipe.selects:
        skipped.add("fitness")
        skipped |= {"validation"} if recipe.selection.block is not None else set()
        skipped |= {"test"} if recipe.tests_contenders_only else set()
    return [name for name in eval_sets(recipe) if name not in skipped]


def tested_beside(recipe: Recipe, selection: Selection | None, untuned: list[FinalModel]) -> dict[str, FinalModel]:
    """The untuned models still to be scored on the test set beside the winner, by finalist name: under
    `selection.final_table: contenders`, the best untuned finalist on validation (the winner's reference);
    none otherwise (`untuned_sets` scored them all before selection)."""
    if selection is None or not recipe.tests_contenders_only or "test" not in eval_sets(recipe):
        return {}
    reference = best_untuned(selection.finalists)
    if reference is None:
        return {}
    row = selection.finalists[reference]
    return {row.name: next(model for model in untuned if model.identity == row.identity)}


def finish_run(
    run: OpenRun, result: SearchResult, member: str | None = None, method_chosen: MethodChosen | None = None
) -> Summary:
    """Score the untuned models, choose the winner (or the front member `member`), export it, score it on
    every eval set, write the model card and summary.json (with `method_chosen`, how `method: auto` chose);
    each step resumable (its results are in the ledger as they come)."""
    layout = run.layout
    baselines = plan_baselines(run.recipe, run.source_paths)
    untuned = untuned_models(run, baselines)
    scores = score_final(run, untuned, untuned_sets(run.recipe), shown_if_held=("fitness",))
    chosen, selection = select_winner(run, result, untuned, scores, member)
    winner, config_yaml = export_winner(run, chosen)
    beside = tested_beside(run.recipe, selection, untuned)
    for key, tested in score_final(run, list(beside.values()), ["test"]).items():
        scores[key].update(tested)
    if selection is not None and run.recipe.tests_contenders_only:
        selection.tested = list(beside)
    scores.update(score_final(run, [winner]))
    summary = build_summary(run, chosen, result, scores, baselines, selection, method_chosen)
    write_atomic(layout.final / CARD_FILE, model_card(summary, config_yaml).encode())
    layout.write_summary(summary)
    for name in baselines.configs:  # scored and kept in the ledger: only their YAML stays
        shutil.rmtree(layout.baseline(name), ignore_errors=True)
    return summary
