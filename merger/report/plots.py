"""The report's PNG plots, drawn on matplotlib's Agg canvas (no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from merger.recipe import Recipe
from merger.report.data import RunData, gene_matrices, validation_scores
from merger.rundir.render import front_tasks
from merger.rundir.summary import Selection

MAX_ANNOTATED_CELLS = 240  # beyond this the numbers in the heatmap cells are unreadable


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


def plot_genes(genes: list[dict[str, Any]], recipe: Recipe, path: Path) -> Any:
    """The best candidate's genes as a figure saved to `path` (returned for inspection)."""
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
        "Best candidate's genes: value per layer group (columns) and source / tensor class (rows)", fontsize="medium"
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


def plot_front(selection: Selection, path: Path) -> None:
    """Parallel coordinates of the finalists over the validation tasks: the front's members in colour and
    named, the others grey, the winner's line thickest."""
    tasks = front_tasks(selection)
    front = selection.front or []
    figure = _figure(max(6.0, 1.6 * len(tasks) + 3), 4.5)
    axes = figure.add_subplot()
    from matplotlib import colormaps

    colours = iter(colormaps["tab10"].colors * 3)
    x = np.arange(len(tasks))
    for row in selection.finalists:
        if row.tasks is None or row.dropped_after is not None:
            continue
        y = [row.tasks.get(task, np.nan) for task in tasks]
        if row.name in front:
            width = 3.0 if row.name == selection.chosen else 1.6
            axes.plot(x, y, marker="o", linewidth=width, color=next(colours, None), label=row.name, zorder=3)
        else:
            axes.plot(x, y, color="0.75", linewidth=0.8, zorder=1)
    axes.set_xticks(x, tasks, rotation=15)
    axes.set_ylabel(f"{selection.eval_set} score")
    axes.set_title("finalists per task: the front in colour (thickest: the winner), the dominated in grey")
    axes.legend(fontsize="small", loc="best")
    figure.savefig(path)
