"""The end of a run: the winner chosen (on the validation set, merger.finish.selection, or by fitness),
best.yaml and the winner exported by mergekit, its scores next to every source's and every untuned
baseline's, summary.json. What is scored and kept on the way: merger.finish.models.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from mergekit.config import MergeConfiguration

from merger.common.files import write_atomic
from merger.finish.baselines import BaselinePlan, plan_baselines
from merger.finish.models import FinalModel, ScoreTable, config_identity, export_once, merge_yaml, score_final
from merger.finish.scored_export import match_scored_weights
from merger.finish.selection import (
    Contender,
    candidate_contenders,
    choose,
    finalist_rows,
    fitness_winner,
    untuned_contenders,
)
from merger.recipe import PASSTHROUGH, Recipe
from merger.rundir.layout import (
    LEAD_HEADER,
    AcrossTasks,
    Baseline,
    LineageEntry,
    RunDir,
    Scores,
    Selection,
    Summary,
    Winner,
    selection_rule_text,
)
from merger.rundir.ledger import WINNER_KEY, baseline_key, source_key
from merger.scoring.fitness import eval_sets, weighted_score, worst_task
from merger.search.loop import Search, SearchResult
from merger.sources.lineage import LINEAGE_META
from merger.space.layer_path import path_card_lines


def export_winner(search: Search, winner: Contender) -> tuple[FinalModel, str]:
    """best.yaml and final/: the chosen model as mergekit exports it (reused when already exported).

    A candidate's export is checked against the weights it was scored with; a baseline's is its own
    merge again; a source's is mergekit's passthrough of it. Returns the winner as scored at the end
    (identified by its best.yaml) and best.yaml's text.
    """
    layout = RunDir(search.run_dir)
    check = None
    if winner.record is not None:
        record = winner.record
        config = search.genome.to_config(np.asarray(record.genotype))
        check = lambda staging: match_scored_weights(  # noqa: E731
            search.executor, record, staging, search.recipe.trust_remote_code
        )
    elif winner.model.config is not None:
        config = winner.model.config
    else:
        config = passthrough_config(search, winner.model)
    config_yaml = merge_yaml(config)
    exported = FinalModel(WINNER_KEY, layout.final, config_identity(config_yaml), config, layout.best_config)
    export_once(exported, search, check=check)
    return FinalModel(WINNER_KEY, exported.path, exported.identity), config_yaml


def passthrough_config(search: Search, source: FinalModel) -> MergeConfiguration:
    """A source as mergekit exports it alone: its weights in the recipe's dtype, with the run's tokenizer."""
    recipe = search.recipe
    data: dict[str, Any] = {
        "merge_method": PASSTHROUGH,
        "models": [{"model": str(source.path)}],
        "dtype": recipe.engine.dtype,
    }
    if recipe.tokenizer_source:
        data["tokenizer_source"] = str(search.source_paths[recipe.tokenizer_source])
    return MergeConfiguration.model_validate(data)


def untuned_models(search: Search, baselines: BaselinePlan) -> list[FinalModel]:
    """Each source (its recorded digest: no source is hashed again), then each baseline."""
    layout = RunDir(search.run_dir)
    lineage = search.ledger.meta()[LINEAGE_META]
    sources = [
        FinalModel(source_key(name), search.source_paths[name], "weights:" + lineage[name]["sha256"])
        for name in search.recipe.source_names
    ]
    merges = []
    for name, data in baselines.configs.items():
        config = MergeConfiguration.model_validate(data)
        identity = config_identity(merge_yaml(config))
        merges.append(
            FinalModel(baseline_key(name), layout.baseline(name), identity, config, layout.baseline_config(name))
        )
    return [*sources, *merges]


def select_winner(
    search: Search, result: SearchResult, untuned: list[FinalModel], scores: ScoreTable
) -> tuple[Contender, Selection | None]:
    """The finalist best on the validation set (`selection:`), or the best candidate by fitness."""
    recipe = search.recipe
    if not recipe.selects:
        return fitness_winner(result.best), None
    candidates = candidate_contenders(search.ledger, search.genome, recipe.selection.top_k)
    scores.update(score_final(search, [c.model for c in candidates], ["validation"]))
    contenders = untuned_contenders(untuned) + candidates
    rows = finalist_rows(recipe, search.ledger, contenders, scores)
    return choose(contenders, rows, recipe.selection)


def build_summary(
    search: Search,
    winner: Contender,
    result: SearchResult,
    scores: ScoreTable,
    baselines: BaselinePlan,
    selection: Selection | None,
) -> Summary:
    recipe = search.recipe
    meta = search.ledger.meta()
    record = winner.record
    fitness = (
        record.score
        if record is not None
        else next(row.fitness for row in selection.finalists if row.name == selection.chosen)  # type: ignore[union-attr]
    )
    return Summary(
        winner=Winner(
            **with_across_tasks(scores[WINNER_KEY], recipe),
            genotype=record.genotype if record is not None else [],
            score=fitness,
            generation=record.generation if record is not None else None,
            index=record.index if record is not None else None,
            genes=search.genome.table(np.asarray(record.genotype)) if record is not None else None,
        ),
        sources={
            name: Scores(**with_across_tasks(scores[source_key(name)], recipe)) for name in recipe.source_names
        },
        baselines={
            name: Baseline(
                **with_across_tasks(scores[baseline_key(name)], recipe),
                method=config["merge_method"],
                config=merge_yaml(MergeConfiguration.model_validate(config)),
            )
            for name, config in baselines.configs.items()
        },
        baselines_skipped=baselines.skipped,
        evaluations=result.evaluations,
        generations=result.generations,
        failures=sum(r.failed for r in search.ledger.evaluations()),
        seed=recipe.optimizer.seed,
        method=recipe.genome.method,
        genome=meta.get("genome"),
        budget={
            "max_evaluations": recipe.optimizer.max_evaluations,
            "max_seconds": recipe.optimizer.max_seconds,
            "seconds": round(sum(g.seconds for g in search.ledger.generations()), 1),
        },
        lineage=summary_lineage(meta[LINEAGE_META]),
        scoring_precision=meta.get("scoring_precision"),
        selection=selection,
    )


def with_across_tasks(scores: dict[str, dict[str, float]], recipe: Recipe) -> dict[str, Any]:
    """A model's scores per eval set, and per set its weighted mean and worst task."""
    sets = eval_sets(recipe)
    across = {}
    for split, by_task in scores.items():
        task, worst = worst_task(by_task)
        across[split] = AcrossTasks(mean=weighted_score(by_task, sets[split]), worst=worst, worst_task=task)
    return {**scores, "across_tasks": across}


def summary_lineage(recorded: dict[str, Any]) -> dict[str, LineageEntry]:
    """The lineage as the summary holds it (the ledger's record without the stamps)."""
    return {
        name: LineageEntry(**{k: v for k, v in entry.items() if k != "stamp"})
        for name, entry in recorded.items()
    }


def score_table(summary: Summary) -> str:
    """Sources, baselines and winner, one column per (eval set, task); `merger report` and the model
    card show the same rows (`Summary.score_rows`)."""
    columns = summary.score_columns()
    model = "model" if summary.scoring_precision is None else f"model (scored in {summary.scoring_precision})"
    header = [model] + [f"{s}:{task}" for s, task in columns]
    lines = [header]
    for name, block in summary.score_rows().items():
        cells = [block.cell(s, task) for s, task in columns]
        lines.append([name] + ["–" if value is None else f"{value:.3f}" for value in cells])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines
    )


def finalist_table(selection: Selection) -> str:
    """The finalists as selection saw them: fitness and validation score, each +- its standard error."""

    lines = [["finalist", "kind", "fitness", selection.eval_set, LEAD_HEADER, ""]]
    for row in selection.finalists:
        lines.append([*row.cells(), "<- winner" if row.name == selection.chosen else ""])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def model_card(search: Search, summary: Summary, config_yaml: str) -> str:
    recipe = search.recipe
    base = summary.lineage[recipe.base_model].reference if recipe.base_model else None
    sources = "\n".join(f"- `{name}`: {entry.reference}" for name, entry in summary.lineage.items())
    front = ["---", "library_name: transformers", "tags:", "- merge", "- mergekit", "- evolutionary-merge"]
    if base:
        front.insert(1, f"base_model: {base}")
    front.append("---")
    return "\n".join(
        front
        + [
            "",
            *card_title(summary, recipe.genome.method),
            "",
            "## Sources",
            sources,
            "",
            *path_card_lines(summary.winner.genes or []),
            "## Scores",
            "```",
            score_table(summary),
            "```",
            "",
            *selection_card_lines(summary.selection),
            "## mergekit configuration",
            "```yaml",
            config_yaml.rstrip(),
            "```",
            "",
        ]
    )


def card_title(summary: Summary, method: str) -> list[str]:
    searched = f"CMA-ES over {summary.genome} in {summary.evaluations} evaluations (seed {summary.seed})"
    selection = summary.selection
    if selection is None or selection.kind == "candidate":
        return [f"# Evolutionary merge ({method})", "", f"Found by `merger` with {searched}.", ""]
    what = "An untuned merge" if selection.kind == "baseline" else "A source model"
    return [
        f"# {what}: {selection.chosen}",
        "",
        f"`merger` searched with {searched}; on the {selection.eval_set} set no evolved candidate beat "
        f"{selection.chosen}, so it is the winner.",
        "",
    ]


def selection_card_lines(selection: Selection | None) -> list[str]:
    if selection is None:
        return []
    return [
        "## Selection",
        selection_rule_text(selection),
        "```",
        finalist_table(selection),
        "```",
        "",
    ]


def finished_summary(run_dir: Path, result: SearchResult, recipe: Recipe) -> Summary | None:
    """The summary of a run that already finished with this result (rerunning it re-scores nothing)."""
    layout = RunDir(run_dir)
    if not layout.final.is_dir():
        return None
    summary = layout.read_summary()
    if summary is None or summary.evaluations != result.evaluations:
        return None
    if recipe.selects:
        return summary if summary.selection is not None else None
    same_winner = summary.selection is None and summary.winner.genotype == list(result.best.genotype)
    return summary if same_winner else None


def finish_run(search: Search, result: SearchResult) -> Summary:
    layout = RunDir(search.run_dir)
    baselines = plan_baselines(search.recipe, search.source_paths)
    untuned = untuned_models(search, baselines)
    scores = score_final(search, untuned)
    chosen, selection = select_winner(search, result, untuned, scores)
    winner, config_yaml = export_winner(search, chosen)
    scores.update(score_final(search, [winner]))
    summary = build_summary(search, chosen, result, scores, baselines, selection)
    write_atomic(layout.final / "README.md", model_card(search, summary, config_yaml).encode())
    layout.write_summary(summary)
    for name in baselines.configs:  # scored and kept in the ledger: only their YAML stays
        shutil.rmtree(layout.baseline(name), ignore_errors=True)
    return summary
