"""What `merger report` shows, read only from what the run wrote: recipe.yaml, the ledger (its meta
records where the sources were found), summary.json and best.yaml when the run finished."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from merger.common.errors import MergerError
from merger.common.yamlsafe import read_yaml_file
from merger.recipe import Recipe, parse_recipe
from merger.rundir.layout import LEDGER_FILE, RECIPE_FILE, RunDir
from merger.rundir.ledger import EvaluationRecord, GenerationRecord, Ledger
from merger.rundir.meta import RunMeta
from merger.rundir.summary import Summary

EMBEDDINGS_COLUMN = "embed"


@dataclass
class RunData:
    run_dir: Path
    recipe: Recipe
    meta: RunMeta
    evaluations: list[EvaluationRecord]
    generations: list[GenerationRecord]
    best: EvaluationRecord | None
    summary: Summary | None
    items_spent: dict[str, int] = field(default_factory=dict)


def load_run(run_dir: Path) -> RunData:
    if not run_dir.is_dir():
        raise MergerError(f"run directory not found: {run_dir}")
    layout = RunDir(run_dir)
    if not layout.ledger.is_file():
        raise MergerError(f"{run_dir} is not a run directory (no {LEDGER_FILE})")
    recipe_path = layout.recipe
    if not recipe_path.is_file():
        raise MergerError(f"{run_dir} is not a run directory (no {RECIPE_FILE})")
    recipe = parse_recipe(read_yaml_file(recipe_path, "recipe") or {}, str(recipe_path))
    try:
        ledger = Ledger(run_dir)
        try:
            data = RunData(
                run_dir,
                recipe,
                ledger.meta(),
                ledger.evaluations(),
                ledger.generations(),
                ledger.best(),
                None,
                ledger.items_spent(evaluated_only=True),
            )
        finally:
            ledger.close()
    except sqlite3.DatabaseError as error:
        raise MergerError(f"{run_dir / LEDGER_FILE}: not a readable ledger: {error}") from None
    if not data.evaluations:
        raise MergerError(f"{run_dir}: no evaluation recorded yet, nothing to report")
    data.summary = layout.read_summary()
    return data


def validation_scores(run: RunData) -> list[tuple[int, float]]:
    """(generation, weighted validation score of that generation's best) where one was measured."""
    points = []
    for generation in run.generations:
        if not generation.validation:
            continue
        if run.recipe.validation is not None and all(
            task.name in generation.validation for task in run.recipe.validation.tasks
        ):
            tasks = run.recipe.validation.tasks
            total = sum(task.weight for task in tasks)
            value = sum(task.weight * generation.validation[task.name] for task in tasks) / total
        else:
            value = float(np.mean(list(generation.validation.values())))
        points.append((generation.generation, value))
    return points


def best_genes(run: RunData) -> list[dict[str, Any]] | None:
    """The winner's decoded genes: from summary.json, else decoded from the ledger's best genotype."""
    if run.summary is not None and run.summary.winner.genes:
        return run.summary.winner.genes
    if run.best is None:
        return None
    return run_space(run).table(np.asarray(run.best.genotype))


def run_space(run: RunData) -> Any:
    """The run's search space over the sources where the run found them (the lineage in the ledger's meta)."""
    from merger.sources.lineage import recorded_source_paths
    from merger.sources.resolve import check_compatible
    from merger.space import make_genome

    recorded = run.meta.lineage
    if set(recorded) != set(run.recipe.source_names):
        raise MergerError(
            f"cannot decode the best genotype: the ledger records no lineage of the sources "
            f"{', '.join(run.recipe.source_names)}"
        )
    source_paths = recorded_source_paths(recorded)
    try:
        num_layers = check_compatible(source_paths, run.recipe.trust_remote_code)
    except MergerError as error:
        raise MergerError(f"cannot decode the best genotype without the run's sources: {error}") from None
    return make_genome(run.recipe, source_paths, num_layers)


def gene_matrices(genes: list[dict[str, Any]]) -> dict[str, tuple[list[str], list[str], np.ndarray]]:
    """Per parameter: (row labels 'source / tensor class', column labels, values; NaN where none)."""
    matrices = {}
    for parameter in dict.fromkeys(gene["parameter"] for gene in genes):
        own = [gene for gene in genes if gene["parameter"] == parameter]
        rows = list(dict.fromkeys(f"{gene['source'] or 'shared'} / {gene['tensor_class']}" for gene in own))
        groups = sorted({gene["group"] for gene in own if gene["group"] is not None})
        columns = [f"g{group}" for group in groups]
        if any(gene["group"] is None for gene in own):
            columns.append(EMBEDDINGS_COLUMN)
        values = np.full((len(rows), len(columns)), np.nan)
        for gene in own:
            row = rows.index(f"{gene['source'] or 'shared'} / {gene['tensor_class']}")
            column = columns.index(EMBEDDINGS_COLUMN if gene["group"] is None else f"g{gene['group']}")
            values[row, column] = gene["value"]
        matrices[parameter] = (rows, columns, values)
    return matrices


def best_config_text(run: RunData) -> str:
    best_yaml = RunDir(run.run_dir).best_config
    if best_yaml.is_file():
        return best_yaml.read_text()
    return run.best.config if run.best is not None else ""
