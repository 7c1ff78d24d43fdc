"""The report's HTML page: the run's overview, its plots and the score table."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from merger.report.data import RunData, best_config_text
from merger.rundir.render import finalist_grid, score_cells, score_grid, selection_rule_text
from merger.rundir.summary import Selection, Summary
from merger.scoring.items import item_accounting


@dataclass
class ReportFiles:
    html: Path
    fitness_plot: Path
    genes_plot: Path | None
    front_plot: Path | None = None  # with several validation tasks: the finalists' front per task


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
    """The terminal table's and the model card's rows (`merger.rundir.render`), the best of each column bold."""
    headers, names, values = score_cells(summary)
    bold = set()
    for c in range(len(headers)):
        top = max((v[c] for v in values if v[c] is not None), default=None)
        bold |= {(r, c + 1) for r, v in enumerate(values) if top is not None and v[c] == top}
    header, body = score_grid(summary)
    return _table(header, body, bold)


def _candidate_won(run: RunData) -> bool:
    selection = run.summary.selection if run.summary is not None else None
    return selection is None or selection.kind == "candidate"


def finalist_table_html(selection: Selection) -> str:
    """The finalists with fitness and selection score (± standard error); the winner's row bold."""
    header, body = finalist_grid(selection)
    chosen = next(i for i, row in enumerate(selection.finalists) if row.name == selection.chosen)
    bold = {(chosen, column) for column in range(len(header))}
    return f"<p>{html.escape(selection_rule_text(selection))}</p>" + _table(header, body, bold)


def overview_rows(run: RunData) -> list[list[str]]:
    failures = sum(r.failed for r in run.evaluations)
    rows = [
        ["merge method", run.recipe.genome.method],
        ["search space", run.meta.search_space or ""],
        ["seed", str(run.recipe.optimizer.seed)],
        ["evaluations", f"{len(run.evaluations)} ({failures} failed)"],
        ["generations closed", str(len(run.generations))],
        ["item-evaluations", item_accounting(
            run.items_spent,
            len(run.evaluations),
            run.meta.fitness_items,
            sum(record.eval_seconds for record in run.evaluations),
        ).removeprefix("item-evaluations: ")],
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
        "<h2>Best candidate's genes</h2>" if _candidate_won(run) else "<h2>Best evolved candidate's genes (not the winner)</h2>",
    ]
    if files.genes_plot is not None:
        parts.append(f'<img src="{files.genes_plot.name}" alt="the best candidate\'s genes">')
    else:
        parts.append("<p>No candidate succeeded yet.</p>")
    parts.append("<h2>Sources, untuned baselines and winner</h2>")
    if run.summary is not None:
        parts.append(score_table_html(run.summary))
        parts += [
            f"<p>baseline {html.escape(name)} not scored: {html.escape(reason)}</p>"
            for name, reason in run.summary.baselines_skipped.items()
        ]
        if run.summary.selection is not None:
            parts += ["<h2>Selection of the winner</h2>", finalist_table_html(run.summary.selection)]
            if files.front_plot is not None:
                parts.append(f'<img src="{files.front_plot.name}" alt="the finalists per validation task and their front">')
    else:
        parts.append(
            "<p>The run has not finished: the table of sources and winner comes with its summary.json.</p>"
        )
    config = best_config_text(run)
    if config:
        parts += ["<h2>Best merge (mergekit configuration)</h2>", f"<pre>{html.escape(config)}</pre>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
