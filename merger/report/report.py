"""`merger report`: one HTML page with PNG plots for a run directory, finished or not.

Reads only what the run wrote (`data.py`), draws the plots (`plots.py`) and the page (`page.py`).
"""

from __future__ import annotations

from pathlib import Path

from merger.common.errors import MergerError
from merger.common.files import write_atomic
from merger.report.data import best_genes, load_run
from merger.report.page import ReportFiles, render_html
from merger.report.plots import plot_fitness, plot_front, plot_genes

REPORT_FILE = "report.html"
FITNESS_PLOT = "fitness.png"
GENES_PLOT = "genes.png"
FRONT_PLOT = "front.png"


def write_report(run_dir: Path, out_dir: Path | None = None) -> ReportFiles:
    """Write report.html, fitness.png, genes.png (when a candidate succeeded) and front.png (when the
    finalists have a front over several validation tasks); returns their paths."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MergerError("merger report needs matplotlib: pip install 'merger[report]'") from None
    run = load_run(run_dir)
    out_dir = out_dir or run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    genes = best_genes(run)
    selection = run.summary.selection if run.summary is not None else None
    front = selection is not None and selection.front is not None
    files = ReportFiles(
        out_dir / REPORT_FILE, out_dir / FITNESS_PLOT, out_dir / GENES_PLOT if genes else None,
        out_dir / FRONT_PLOT if front else None,
    )
    plot_fitness(run, files.fitness_plot)
    if genes and files.genes_plot is not None:
        plot_genes(genes, run.recipe, files.genes_plot)
    if selection is not None and files.front_plot is not None:
        plot_front(selection, files.front_plot)
    write_atomic(files.html, render_html(run, files).encode())
    return files
