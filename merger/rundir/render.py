"""The one renderer of a `Summary`: its score table and finalist table as rows of cells, drawn as text
(the terminal), Markdown (the model card) or HTML (merger.report), and the model card itself.

The card is written once, into final/README.md, and published unchanged with the weights
(merger.registry): the card a user reads in the registry is the run's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from merger.rundir.summary import Finalist, PhaseCost, Selection, Summary

Grid = tuple[list[str], list[list[str]]]  # header, rows
LEAD_HEADER = "lead over best untuned (low)"  # Finalist.lower_bound's column
TAGS = ["merge", "mergekit", "evolutionary-merge"]
MISSING = "–"


def score_cells(summary: Summary) -> tuple[list[str], list[str], list[list[float | None]]]:
    """(column headers, row names, values): sources, baselines, then the winner (`Summary.score_rows`);
    a column per (eval set, task) of the winner's, with each split's mean and worst task after it."""
    columns = summary.score_columns()
    rows = summary.score_rows()
    values = [[block.cell(split, task) for split, task in columns] for block in rows.values()]
    return [f"{split}:{task}" for split, task in columns], list(rows), values


def score_grid(summary: Summary) -> Grid:
    headers, names, values = score_cells(summary)
    model = "model" if summary.scoring_precision is None else f"model (scored in {summary.scoring_precision})"
    rows = [[name, *(MISSING if v is None else f"{v:.3f}" for v in row)] for name, row in zip(names, values, strict=True)]
    return [model, *headers], rows


def finalist_cells(row: Finalist) -> list[str]:
    """A finalist's row: name, kind, fitness and selection score, each ± its error, and its lead's bound."""

    def shown(value: float | None, se: float | None) -> str:
        if value is None:
            return MISSING
        return f"{value:.3f}" + ("" if se is None else f" ± {se:.3f}")

    lead = "" if row.lower_bound is None else f"{row.lower_bound:+.3f}"
    items = "" if row.items is None else f"{row.items}" + (" (dropped)" if row.dropped_after is not None else "")
    return [
        row.name, row.kind, shown(row.fitness, row.fitness_se), shown(row.selection, row.selection_se), items, lead
    ]


def finalist_grid(selection: Selection) -> Grid:
    """The finalists; with several validation tasks, each task's score and a mark on the front's members
    (merger.finish.front)."""
    header = ["finalist", "kind", "fitness", selection.eval_set, "items", LEAD_HEADER]
    tasks = front_tasks(selection)
    header += [*tasks, "front"] if tasks else []
    rows = []
    for row in selection.finalists:
        cells = finalist_cells(row)
        if tasks:
            scores = row.tasks or {}
            cells += [f"{scores[task]:.3f}" if task in scores else MISSING for task in tasks]
            cells.append("*" if row.name in (selection.front or []) else "")
        rows.append([*cells, "<- winner" if row.name == selection.chosen else ""])
    return [*header, ""], rows


def front_tasks(selection: Selection) -> list[str]:
    """The validation tasks of the finalists' front, in the finalists' order; none without a front."""
    if selection.front is None:
        return []
    return list(dict.fromkeys(task for row in selection.finalists for task in row.tasks or {}))


def selection_rule_text(selection: Selection) -> str:
    """One paragraph for cards and reports: how these finalists were chosen and read."""
    rule = (
        "the best of them there is the winner"
        if selection.rule == "best"
        else "the candidate best there wins only if the lower bound of its lead over the best untuned "
        "finalist there (paired bootstrap over the items, one-sided 95%) is above zero, else the best "
        "untuned finalist wins"
    )
    text = (
        f"The finalists (the {selection.top_k} best candidates by fitness, every untuned baseline and every "
        f"source) were scored on the {selection.eval_set} set, which shares no item with the fitness set; "
        f"{rule}. Scores ± one standard error (bootstrap over items)."
    )
    race = selection.racing
    if race is not None:
        text += (
            f" They raced in blocks of {race.block} items: a finalist was dropped once a paired test showed "
            "another of its kind (or, for a candidate, an untuned finalist) ahead of it on the whole set, "
            f"with a chance of any wrong drop at most {race.delta}; {race.items} items scored where every "
            f"finalist on every item would take {race.items_without_racing}."
        )
    if selection.front is not None:
        text += (
            " The front (*): the finalists scored on every item that no other beats on every validation task; "
            "`merger run RECIPE --member NAME` exports one of them instead of the rule's winner."
        )
    if selection.member is not None:
        text += f" The winner is the front member {selection.member!r}, chosen with --member."
    if selection.tested is not None:
        beside = " and ".join(repr(name) for name in selection.tested if name != selection.chosen)
        scored = f"the winner and {beside}, the best untuned finalist, were" if beside else "the winner was"
        text += (
            f" On the test set only {scored} scored (`selection.final_table: contenders`); the other untuned "
            "models have their validation scores in this table."
        )
    return text


def text_table(grid: Grid) -> str:
    header, rows = grid
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def markdown_table(grid: Grid) -> list[str]:
    header, rows = grid
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def layer_path_lines(genes: list[dict[str, Any]]) -> list[str]:
    """The winner's layer path ('source.layer x scale' per position), or nothing."""
    if not genes or "layer" not in genes[0]:
        return []
    steps = [
        f"{gene['source']}.{gene['layer']}" + (f" x{gene['value']:.3g}" if gene["value"] != 1.0 else "")
        for gene in genes
    ]
    return ["## Layer path", "", f"{len(steps)} layers: " + " → ".join(steps), ""]


def base_model_ids(summary: Summary) -> list[str]:
    """Each source as the card's `base_model` names it: a registry source by its pinned reference
    (NAME@VERSION, read from where the run found it), any other by its name."""
    ids = []
    for name, entry in summary.lineage.items():
        reference = entry.registry
        if reference is None:
            ids.append(name)
            continue
        used = Path(entry.path) if entry.path else None
        if "@" not in reference and used is not None and used.name.isdigit() and used.parent.name == reference:
            reference = f"{reference}@{used.name}"
        ids.append(reference)
    return ids


def _origin_lines(summary: Summary) -> list[str]:
    searched = (
        f"CMA-ES over {summary.search_space} in {summary.evaluations} evaluations (seed {summary.seed}), "
        "each candidate merged with mergekit's methods and scored with lm-eval"
    )
    chosen = summary.method_chosen
    if chosen is not None:
        searched += (
            f"; the method, {chosen.method}, chosen by `method: auto` as that of {chosen.baseline}, the best "
            "untuned merge on the fitness set"
        )
    selection = summary.selection
    if selection is None or selection.kind == "candidate":
        return [f"# Evolutionary merge ({summary.method})", "", f"Found by `merger` with {searched}.", ""]
    what = "An untuned merge" if selection.kind == "baseline" else "A source model"
    return [
        f"# {what}: {selection.chosen}",
        "",
        f"`merger` searched with {searched}; on the {selection.eval_set} set no evolved candidate beat "
        f"{selection.chosen}, so it is the winner.",
        "",
    ]


def _selection_lines(selection: Selection | None) -> list[str]:
    if selection is None:
        return []
    return [
        f"## Selection (on {selection.eval_set}, items the fitness never saw)",
        "",
        selection_rule_text(selection),
        "",
        *markdown_table(finalist_grid(selection)),
        "",
    ]


def cost_text(costs: Mapping[str, PhaseCost]) -> str:
    """One line: each phase's item-evaluations and seconds (merging and scoring), and their total."""
    if not costs:
        return "items per phase: not recorded"
    items = sum(cost.items for cost in costs.values())
    seconds = sum(cost.seconds for cost in costs.values())
    phases = ", ".join(f"{phase} {cost.items} ({cost.seconds:.0f} s)" for phase, cost in costs.items())
    return f"item-evaluations per phase: {phases}; in all {items} ({seconds:.0f} s)"


def _budget_lines(summary: Summary) -> list[str]:
    lines = [f"- evaluations used: {summary.evaluations}", f"- generations: {summary.generations}"]
    lines += [f"- budget {key}: {value}" for key, value in sorted(summary.budget.items())]
    return [*lines, f"- seed: {summary.seed}", f"- {cost_text(summary.costs)}"]


def model_card(summary: Summary, config_yaml: str) -> str:
    """final/README.md: a Hugging Face model card whose front matter parses with `huggingface_hub.ModelCard`."""
    from huggingface_hub import ModelCard, ModelCardData

    method = summary.method or "unknown"
    data = ModelCardData(
        base_model=base_model_ids(summary),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[*TAGS, method],
        merge_method=method,
    )
    genotype = summary.winner.genotype
    body = [
        *_origin_lines(summary),
        "## Sources",
        "",
        "| source | reference | weights digest |",
        "|---|---|---|",
        *(f"| {name} | `{entry.reference}` | `{entry.sha256}` |" for name, entry in summary.lineage.items()),
        "",
        *layer_path_lines(summary.winner.genes or []),
        "## Scores",
        "",
        *markdown_table(score_grid(summary)),
        "",
        *(f"- baseline {name} not scored: {reason}" for name, reason in summary.baselines_skipped.items()),
        f"Fitness of the winner: {summary.fitness if summary.fitness is not None else MISSING}",
        "",
        *_selection_lines(summary.selection),
        *(["## Best genotype", "", f"`{[round(float(value), 6) for value in genotype]}`", ""] if genotype else []),
        "## Budget spent",
        "",
        *_budget_lines(summary),
        "",
        "## mergekit configuration",
        "",
        "Reproduced by `mergekit-yaml mergekit_config.yml OUT` (best.yaml in the run directory; the source "
        "paths are the original run's):",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)))
