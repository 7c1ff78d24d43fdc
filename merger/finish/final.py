"""The end of a run: best.yaml, the winner exported by mergekit, its scores next to every source's and
every untuned baseline's, summary.json.

Finishing resumes as the search does: each final score is committed to the ledger as it finishes
(keyed by model and eval set, with the identity of the weights scored), a finished export whose
configuration matches is reused, and a run killed here re-scores only what the ledger lacks.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mergekit.config import MergeConfiguration

from merger.common.files import publish_directory, staging_dir, write_atomic
from merger.engine.reference import export_merge
from merger.finish.baselines import BaselinePlan, plan_baselines
from merger.finish.scored_export import match_scored_weights
from merger.recipe import Recipe
from merger.rundir.layout import AcrossTasks, Baseline, LineageEntry, RunDir, Scores, Summary, Winner
from merger.rundir.ledger import WINNER_KEY, FinalScore, baseline_key, source_key
from merger.scoring.fitness import eval_sets, weighted_score, worst_task
from merger.search.loop import Search, SearchResult
from merger.sources.lineage import LINEAGE_META
from merger.space.layer_path import path_card_lines


@dataclass(frozen=True)
class FinalModel:
    """A checkpoint scored at the end: the winner, a source alone, or a baseline."""

    key: str  # the ledger's model key
    path: Path
    identity: str  # which weights: a source's weights digest, a merge's config digest
    config: MergeConfiguration | None = None  # a merge exported before it is scored
    config_file: Path | None = None


def config_identity(config_yaml: str) -> str:
    return "config:" + hashlib.sha256(config_yaml.encode()).hexdigest()


def merge_yaml(config: MergeConfiguration) -> str:
    """The text of best.yaml and baselines/NAME.yaml: what `mergekit-yaml` reproduces."""
    return config.to_yaml() + "\n"


def export_once(
    model: FinalModel, search: Search, check: Callable[[Path], None] | None = None
) -> None:
    """mergekit's export of `model.config` into `model.path`, its YAML into `model.config_file`.

    An export already there from the same YAML is kept; otherwise it is written to a staging
    directory, given to `check` (which may refuse it or rewrite its weights), and renamed into
    place, so a finished directory is always a whole, checked export.
    """
    assert model.config is not None and model.config_file is not None
    text = merge_yaml(model.config)
    if model.path.is_dir() and model.config_file.is_file() and model.config_file.read_text() == text:
        return
    shutil.rmtree(model.path, ignore_errors=True)  # never left next to a YAML it does not match
    model.config_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(model.config_file, text.encode())
    staging = staging_dir(model.path)
    shutil.rmtree(staging, ignore_errors=True)
    recipe = search.recipe
    config = model.config.model_copy(deep=True)  # mergekit's export rewrites the config it is given
    export_merge(config, staging, seed=recipe.optimizer.seed, trust_remote_code=recipe.trust_remote_code)
    if check is not None:
        check(staging)
    publish_directory(staging, model.path)


def export_winner(search: Search, result: SearchResult) -> tuple[FinalModel, str]:
    """best.yaml and final/: the winner as mergekit exports it (reused when already exported).

    Returns the winner as scored at the end (identified by its best.yaml) and best.yaml's text.
    """
    layout = RunDir(search.run_dir)
    config = search.genome.to_config(np.asarray(result.best.genotype))
    config_yaml = merge_yaml(config)
    exported = FinalModel(WINNER_KEY, layout.final, config_identity(config_yaml), config, layout.best_config)
    export_once(
        exported,
        search,
        check=lambda staging: match_scored_weights(
            search.executor, result.best, staging, search.recipe.trust_remote_code
        ),
    )
    return FinalModel(WINNER_KEY, exported.path, exported.identity), config_yaml


def final_models(
    search: Search, winner: FinalModel, source_paths: dict[str, Path], baselines: BaselinePlan
) -> list[FinalModel]:
    """The winner, each source (its recorded digest: no source is hashed again), each baseline."""
    layout = RunDir(search.run_dir)
    lineage = search.ledger.meta()[LINEAGE_META]
    sources = [
        FinalModel(source_key(name), source_paths[name], "weights:" + lineage[name]["sha256"])
        for name in search.recipe.source_names
    ]
    merges = []
    for name, data in baselines.configs.items():
        config = MergeConfiguration.model_validate(data)
        identity = config_identity(merge_yaml(config))
        merges.append(
            FinalModel(
                baseline_key(name), layout.baseline(name), identity, config, layout.baseline_config(name)
            )
        )
    return [winner, *sources, *merges]


def score_final(search: Search, models: list[FinalModel]) -> dict[str, dict[str, dict[str, float]]]:
    """`{model key: {eval set: scores}}`: what the ledger holds for these weights, and the rest scored now.

    Merges are exported only when one of their scores is missing. All missing jobs go to the executor
    at once (a Ray executor spreads them over its workers) and each is committed as it finishes.
    """
    sets = list(eval_sets(search.recipe))
    identities = {model.key: model.identity for model in models}
    kept = {
        (row.model, row.eval_set): row.scores
        for row in search.ledger.final_scores()
        if identities.get(row.model) == row.identity
    }
    missing = [
        (model, set_name) for model in models for set_name in sets if (model.key, set_name) not in kept
    ]
    for model in {model.key: model for model, _ in missing}.values():
        if model.config is not None:
            export_once(model, search)

    def keep(job: int, scores: dict[str, float]) -> None:
        model, set_name = missing[job]
        search.ledger.record_final_score(FinalScore(model.key, set_name, model.identity, scores))
        kept[(model.key, set_name)] = scores

    search.executor.score_checkpoints([(model.path, set_name) for model, set_name in missing], keep)
    return {model.key: {set_name: kept[(model.key, set_name)] for set_name in sets} for model in models}


def build_summary(
    search: Search,
    result: SearchResult,
    scores: dict[str, dict[str, dict[str, float]]],
    baselines: BaselinePlan,
) -> Summary:
    recipe = search.recipe
    meta = search.ledger.meta()
    best = result.best
    return Summary(
        winner=Winner(
            **with_across_tasks(scores[WINNER_KEY], recipe),
            genotype=best.genotype,
            score=best.score,
            generation=best.generation,
            index=best.index,
            genes=search.genome.table(np.asarray(best.genotype)),
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
            f"# Evolutionary merge ({recipe.genome.method})",
            "",
            f"Found by `merger` with CMA-ES over {summary.genome} in {summary.evaluations} "
            f"evaluations (seed {summary.seed}).",
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
            "## mergekit configuration",
            "```yaml",
            config_yaml.rstrip(),
            "```",
            "",
        ]
    )


def finished_summary(run_dir: Path, result: SearchResult) -> Summary | None:
    """The summary of a run that already finished with this result (rerunning it re-scores nothing)."""
    layout = RunDir(run_dir)
    if not layout.final.is_dir():
        return None
    summary = layout.read_summary()
    if summary is None:
        return None
    same_winner = summary.winner.genotype == list(result.best.genotype)
    return summary if summary.evaluations == result.evaluations and same_winner else None


def finish_run(search: Search, result: SearchResult) -> Summary:
    layout = RunDir(search.run_dir)
    winner, config_yaml = export_winner(search, result)
    source_paths = search.source_paths
    baselines = plan_baselines(search.recipe, source_paths)
    scores = score_final(search, final_models(search, winner, source_paths, baselines))
    summary = build_summary(search, result, scores, baselines)
    write_atomic(layout.final / "README.md", model_card(search, summary, config_yaml).encode())
    layout.write_summary(summary)
    for name in baselines.configs:  # scored and kept in the ledger: only their YAML stays
        shutil.rmtree(layout.baseline(name), ignore_errors=True)
    return summary
