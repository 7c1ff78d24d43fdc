"""The Hugging Face model card (README.md with YAML front matter) written into every entry."""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from merger.registry.finished_run import FinishedRun
from merger.registry.index import Parent
from merger.rundir.layout import LEAD_HEADER, WINNER_ROW, Summary, selection_rule_text
from merger.space.layer_path import path_card_lines

TAGS = ["merge", "mergekit", "evolutionary-merge"]


def _format_score(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "–"


def _scores_table(summary: Summary) -> list[str]:
    """The rows and columns of the run's own table (`Summary.score_rows`): sources, baselines, winner."""
    columns = summary.score_columns()
    if not columns:
        return ["No scores were recorded."]
    header = ["model", *(f"{task} ({split})" for split, task in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, block in summary.score_rows().items():
        cells = [_format_score(block.cell(split, task)) for split, task in columns]
        label = f"**{model} (this merge)**" if model == WINNER_ROW else model
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return lines


def _base_models(run: FinishedRun, parents: list[Parent]) -> list[str]:
    """Registry references for registry sources, else source names."""
    by_source = {parent.source: parent for parent in parents}
    identifiers = []
    for name in run.recipe.source_names:
        parent = by_source.get(name)
        identifiers.append(parent.reference if parent is not None and parent.kind == "registry" else name)
    return identifiers


def _budget_lines(summary: Summary) -> list[str]:
    evaluations = "unknown" if summary.evaluations is None else summary.evaluations
    lines = [f"- evaluations used: {evaluations}"]
    lines += [f"- budget {key}: {value}" for key, value in sorted(summary.budget.items())]
    if summary.seed is not None:
        lines.append(f"- seed: {summary.seed}")
    return lines


def _origin_lines(summary: Summary, method: str) -> list[str]:
    searched = (
        f"CMA-ES searched `{method}` merge parameters with mergekit, scoring candidates with lm-eval"
    )
    selection = summary.selection
    if selection is None or selection.kind == "candidate":
        return [f"An evolutionary merge made with `merger`: {searched}.", ""]
    what = "an untuned merge" if selection.kind == "baseline" else "a source model"
    return [
        f"Made with `merger`: {searched}, but on the held-out selection set no evolved candidate beat "
        f"{what}, `{selection.chosen}`, so it is what this entry holds.",
        "",
    ]


def _selection_lines(summary: Summary) -> list[str]:
    selection = summary.selection
    if selection is None:
        return []
    rows = [f"| {' | '.join(row.cells())} |" for row in selection.finalists]
    return [
        f"## Selection (on {selection.eval_set}, items the fitness never saw)",
        "",
        f"| finalist | kind | fitness | selection | {LEAD_HEADER} |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Winner: `{selection.chosen}`. {selection_rule_text(selection)}",
        "",
    ]


def render_card(name: str, version: int, run: FinishedRun, parents: list[Parent]) -> str:
    """The full README.md text; its front matter parses with `huggingface_hub.ModelCard`."""
    winner = run.winner
    method = run.method or "unknown"
    data = ModelCardData(
        base_model=_base_models(run, parents),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[*TAGS, method],
        merge_method=method,
        merger_entry=f"{name}@{version}",
    )
    genotype = winner.genotype
    body = [
        f"# {name} (version {version})",
        "",
        *_origin_lines(run.summary, method),
        "## Sources",
        "",
        "| source | kind | reference | weights sha256 |",
        "|---|---|---|---|",
        *(
            f"| {parent.source} | {parent.kind} | `{parent.reference}` | `{parent.sha256 or 'unknown'}` |"
            for parent in parents
        ),
        "",
        "## Scores",
        "",
        *_scores_table(run.summary),
        "",
        *(f"- baseline {name} not scored: {reason}" for name, reason in run.summary.baselines_skipped.items()),
        "",
        f"Fitness of the winner: {_format_score(run.fitness)}",
        "",
        *_selection_lines(run.summary),
        *path_card_lines(winner.genes or []),
        *(["## Best genotype", "", f"`{[round(float(value), 6) for value in genotype]}`", ""] if genotype else []),
        "## Budget spent",
        "",
        *_budget_lines(run.summary),
        "",
        "## Reproduce",
        "",
        "The weights are reproduced by `mergekit-yaml mergekit_config.yml OUT` (the source paths are "
        "the ones of the original run); `recipe.yaml` is the recipe that ran the search and "
        "`summary.json` its full summary.",
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    return str(card)
