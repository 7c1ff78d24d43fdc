"""`merger report`: one HTML page with PNG plots for a run directory, finished or not.

Reads only what the run wrote (recipe.yaml, the ledger, summary.json and best.yaml when the run
finished); the plots are drawn with matplotlib's Agg canvas, so no display is needed.
"""

from __future__ import annotations

import html
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from merger.common.errors import MergerError
from merger.common.yamlsafe import read_yaml_file
from merger.recipe import Recipe, parse_recipe
from merger.rundir.layout import LEDGER_FILE, RECIPE_FILE, RunDir, Summary
from merger.rundir.ledger import EvaluationRecord, GenerationRecord, Ledger
from merger.scoring.items import item_accounting

REPORT_FILE = "report.html"
FITNESS_PLOT = "fitness.png"
GENOME_PLOT = "genome.png"
EMBEDDINGS_COLUMN = "embed"
MAX_ANNOTATED_CELLS = 240  # beyond this the numbers in the heatmap cells are unreadable


@dataclass
class RunData:
    run_dir: Path
    recipe: Recipe
    meta: dict[str, Any]
    evaluations: list[EvaluationRecord]
    generations: list[GenerationRecord]
    best: EvaluationRecord | None
    summary: Summary | None
    items_spent: dict[str, int] = field(default_factory=dict)


@dataclass
class ReportFiles:
    html: Path
    fitness_plot: Path
    genome_plot: Path | None


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
                ledger.items_spent(),
            )
        finally:
            ledger.close()
    except sqlite3.DatabaseError as error:
        raise MergerError(f"{run_dir / LEDGER_FILE}: not a readable ledger: {error}") from None
    if not data.evaluations:
        raise MergerError(f"{run_dir}: no evaluation recorded yet, nothing to report")
    data.summary = layout.read_summary()
    return data


# -- what to draw ---------------------------------------------------------------------------------
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
    from merger.sources.lineage import LINEAGE_META, recorded_source_paths
    from merger.sources.resolve import check_compatible, resolve_sources
    from merger.space import make_genome

    recorded = run.meta.get(LINEAGE_META) or {}  # where the run found its sources (nothing re-verified)
    try:
        if set(recorded) == set(run.recipe.source_names):
            source_paths = recorded_source_paths(recorded)
        else:
            source_paths = resolve_sources(run.recipe)
        num_layers = check_compatible(source_paths, run.recipe.trust_remote_code)
    except MergerError as error:
        raise MergerError(f"cannot decode the best genotype without the run's sources: {error}") from None
    genome = make_genome(run.recipe, source_paths, num_layers)
    return genome.table(np.asarray(run.best.genotype))


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


# -- plots ----------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_fitness(run: RunData, path: Path) -> None:
    figure = _figure(8, 4.5)
    axes = figure.add_subplot()
    scores = [(r.generation, r.score) for r in run.evaluations if not r.failed]
    failures = [r.generation for r in run.evaluations if r.failed]
    if scores:
        x, y = zip(*scores, strict=True)
        axes.scatter(x, y, s=10, color="0.7", label="candidates", zorder=1)
    if failures:
        axes.scatter(
            failures, [0.0] * len(failures), s=18, marker="x", color="tab:red", label="failed", zorder=2
        )
    if run.generations:
        gens = [g.generation for g in run.generations]
        best = [g.best_score for g in run.generations]
        axes.plot(gens, best, marker="o", color="tab:blue", label="best of generation", zorder=3)
        axes.plot(
            gens,
            [g.mean_score for g in run.generations],
            marker=".",
            color="tab:orange",
            label="mean of generation",
            zorder=3,
        )
        axes.step(
            gens,
            np.maximum.accumulate(best),
            where="post",
            color="tab:blue",
            alpha=0.35,
            linestyle="--",
            label="best so far",
        )
    validation = validation_scores(run)
    if validation:
        vx, vy = zip(*validation, strict=True)
        axes.plot(vx, vy, marker="s", color="tab:green", label="validation (generation's best)", zorder=3)
    axes.set_xlabel("generation")
    axes.set_ylabel("score (higher is better)")
    axes.set_title("Fitness per generation")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.savefig(path)


def plot_genome(genes: list[dict[str, Any]], recipe: Recipe, path: Path) -> Any:
    """The winner's genome as a figure saved to `path` (returned for inspection)."""
    if recipe.genome.space == "layer_path":
        return plot_layer_path(genes, recipe, path)
    matrices = gene_matrices(genes)
    searched = recipe.genome.searched
    heights = [max(1.2, 0.45 * len(rows) + 1.0) for rows, _, _ in matrices.values()]
    widest = max(len(columns) for _, columns, _ in matrices.values())
    figure = _figure(max(6.0, 0.7 * widest + 4.0), sum(heights) + 0.6)
    grid = figure.add_gridspec(len(matrices), 1, height_ratios=heights)
    for position, (parameter, (rows, columns, values)) in enumerate(matrices.items()):
        axes = figure.add_subplot(grid[position])
        bounds = searched.get(parameter)
        low, high = (bounds.min, bounds.max) if bounds else (np.nanmin(values), np.nanmax(values))
        image = axes.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=low, vmax=high, aspect="auto")
        axes.set_xticks(range(len(columns)), columns)
        axes.set_yticks(range(len(rows)), rows)
        axes.set_title(f"{parameter} (searched in [{low:g}, {high:g}])", fontsize="medium")
        if values.size <= MAX_ANNOTATED_CELLS:
            for (row, column), value in np.ndenumerate(values):
                if math.isfinite(value):
                    shade = (value - low) / (high - low) if high > low else 0.5
                    axes.text(
                        column,
                        row,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize="x-small",
                        color="black" if shade > 0.6 else "white",
                    )
        figure.colorbar(image, ax=axes, shrink=0.9)
    granularity = recipe.genome.layer_granularity
    axes.set_xlabel(
        f"layer group gN = layers {granularity}N to {granularity}N+{granularity - 1} (the last may be shorter)"
    )
    figure.suptitle(
        "Best genome: value per layer group (columns) and source / tensor class (rows)", fontsize="medium"
    )
    figure.savefig(path)
    return figure


def plot_layer_path(genes: list[dict[str, Any]], recipe: Recipe, path: Path) -> Any:
    """A layer path: one point per position in token order, on its source's row, labelled with the
    source's layer index and coloured by its scale when scales are searched."""
    sources = recipe.source_names
    settings = recipe.genome.layer_path
    scaled = settings is not None and settings.scales == "per_slot"
    positions = list(range(len(genes)))
    rows = [sources.index(gene["source"]) for gene in genes]
    figure = _figure(max(6.0, 0.3 * len(genes) + 3.0), 0.5 * len(sources) + 2.4)
    axes = figure.add_subplot()
    axes.plot(positions, rows, color="0.75", linewidth=1, zorder=1)
    if scaled:
        bounds = settings.scale_range
        points = axes.scatter(
            positions, rows, c=[gene["value"] for gene in genes], cmap="viridis",
            vmin=bounds.min, vmax=bounds.max, s=70, zorder=2,
        )
        figure.colorbar(points, ax=axes, shrink=0.9, label="scale on o_proj and down_proj")
    else:
        axes.scatter(positions, rows, color="tab:blue", s=70, zorder=2)
    for position, (row, gene) in enumerate(zip(rows, genes, strict=True)):
        axes.annotate(
            str(gene["layer"]), (position, row), textcoords="offset points", xytext=(0, 7),
            ha="center", fontsize="x-small",
        )
    axes.set_yticks(range(len(sources)), sources)
    axes.set_ylim(-0.6, len(sources) - 0.4)
    axes.set_xlabel("position in the path (a token goes embeddings → 0 → 1 → … → final norm and lm_head)")
    axes.set_ylabel("source of the layer")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_title(
        f"Best layer path: {len(genes)} layers (the number over a point is its layer in that source)",
        fontsize="medium",
    )
    figure.savefig(path)
    return figure


# -- the page -------------------------------------------------------------------------------------
def _table(header: list[str] | None, rows: list[list[str]], bold: set[tuple[int, int]] | None = None) -> str:
    bold = bold or set()
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header or [])
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{'<b>' if (r, c) in bold else ''}{html.escape(cell)}{'</b>' if (r, c) in bold else ''}</td>"
            for c, cell in enumerate(row)
        )
        + "</tr>"
        for r, row in enumerate(rows)
    )
    thead = f"<thead><tr>{head}</tr></thead>" if header else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def score_table_html(summary: Summary) -> str:
    """The rows of the terminal table and the model card (`Summary.score_rows`), the best of each column bold."""
    columns = summary.score_columns()
    rows = {name: block.by_split() for name, block in summary.score_rows().items()}
    names = list(rows)
    values = [[rows[name].get(s, {}).get(task) for s, task in columns] for name in names]
    bold = set()
    for c in range(len(columns)):
        present = [v[c] for v in values if v[c] is not None]
        top = max(present, default=None)
        bold |= {(r, c + 1) for r, v in enumerate(values) if top is not None and v[c] == top}
    body = [
        [name] + ["" if v is None else f"{v:.3f}" for v in row]
        for name, row in zip(names, values, strict=True)
    ]
    return _table(["model"] + [f"{s}: {task}" for s, task in columns], body, bold)


def overview_rows(run: RunData) -> list[list[str]]:
    failures = sum(r.failed for r in run.evaluations)
    rows = [
        ["merge method", run.recipe.genome.method],
        ["genome", str(run.meta.get("genome", ""))],
        ["seed", str(run.recipe.optimizer.seed)],
        ["evaluations", f"{len(run.evaluations)} ({failures} failed)"],
        ["generations closed", str(len(run.generations))],
        ["item-evaluations", item_accounting(run.items_spent, len(run.evaluations), run.meta.get("fitness_items"))
         .removeprefix("item-evaluations: ")],
        ["state", "finished" if run.summary is not None else "not finished (running, stopped or killed)"],
    ]
    if run.generations:
        seconds = sum(g.seconds for g in run.generations)
        rows.append(
            ["seconds per generation", f"{seconds / len(run.generations):.1f} ({seconds:.0f} s in all)"]
        )
    if run.best is not None:
        rows.append(
            ["best score", f"{run.best.score:.4f} (generation {run.best.generation}, index {run.best.index})"]
        )
    return rows


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
"""


def render_html(run: RunData, files: ReportFiles) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>merger report: {html.escape(run.run_dir.name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Merge search: {html.escape(str(run.run_dir))}</h1>",
        _table(None, overview_rows(run)),
        "<h2>Fitness</h2>",
        f'<img src="{files.fitness_plot.name}" alt="best and mean fitness and validation per generation">',
        "<h2>Best genome</h2>",
    ]
    if files.genome_plot is not None:
        parts.append(f'<img src="{files.genome_plot.name}" alt="coefficients of the best genome">')
    else:
        parts.append("<p>No candidate succeeded yet.</p>")
    parts.append("<h2>Sources, untuned baselines and winner</h2>")
    if run.summary is not None:
        parts.append(score_table_html(run.summary))
        parts += [
            f"<p>baseline {html.escape(name)} not scored: {html.escape(reason)}</p>"
            for name, reason in run.summary.baselines_skipped.items()
        ]
    else:
        parts.append(
            "<p>The run has not finished: the table of sources and winner comes with its summary.json.</p>"
        )
    config = _best_config(run)
    if config:
        parts += ["<h2>Best merge (mergekit configuration)</h2>", f"<pre>{html.escape(config)}</pre>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _best_config(run: RunData) -> str:
    best_yaml = RunDir(run.run_dir).best_config
    if best_yaml.is_file():
        return best_yaml.read_text()
    return run.best.config if run.best is not None else ""


def write_report(run_dir: Path, out_dir: Path | None = None) -> ReportFiles:
    """Write report.html, fitness.png and (when a candidate succeeded) genome.png; returns their paths."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MergerError("merger report needs matplotlib: pip install 'merger[report]'") from None
    run = load_run(run_dir)
    out_dir = out_dir or run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    genes = best_genes(run)
    files = ReportFiles(
        out_dir / REPORT_FILE, out_dir / FITNESS_PLOT, out_dir / GENOME_PLOT if genes else None
    )
    plot_fitness(run, files.fitness_plot)
    if genes and files.genome_plot is not None:
        plot_genome(genes, run.recipe, files.genome_plot)
    files.html.write_text(render_html(run, files))
    return files
