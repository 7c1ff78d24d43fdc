"""`merger report`: the HTML page and its PNG plots, for a finished run and for one still unfinished."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml

from merger.cli import main
from merger.common.errors import MergerError
from merger.report.data import best_genes, gene_matrices, load_run
from merger.report.report import write_report
from tests.test_overnight import recipe_data, run_here

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIES_GENOME = {
    "method": "ties",
    "layer_granularity": 2,
    "parameters": {"weight": {"min": 0.0, "max": 1.0}, "density": {"min": 0.2, "max": 1.0}},
    "tensor_classes": ["attention", "mlp"],
}


def referenced_images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


@pytest.mark.slow  # a whole run
def test_report_of_a_finished_run(tiny_sources, tiny_evals, tmp_path, capsys):
    run_dir = tmp_path / "run"
    data = recipe_data(
        tiny_sources,
        tiny_evals,
        genome=TIES_GENOME,
        validation={"tasks": ["tiny_gen"], "limit": 6},
        output={"run_dir": str(run_dir)},
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert main(["run", str(recipe), "--no-progress"]) == 0
    capsys.readouterr()

    out = tmp_path / "report"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    page = (out / "report.html").read_text()
    images = referenced_images(page)
    assert images == ["fitness.png", "genes.png"]
    for name in images:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)

    summary = json.loads((run_dir / "summary.json").read_text())
    for name in ("base", "specialist1", "specialist2", "WINNER", "validation:tiny_gen", "fitness:tiny_mc"):
        assert name in page
    assert f"{summary['winner']['fitness']['tiny_mc']:.3f}" in page
    assert "finished" in page and "not finished" not in page

    assert "Selection of the winner" in page
    # The heatmap shows every gene of the best evolved genome once (the winner's, when a candidate won
    # selection): 2 specialists x 3 tensor classes x 2 layer groups.
    genes = best_genes(load_run(run_dir))
    assert genes is not None
    if summary["selection"]["kind"] == "candidate":
        assert genes == summary["winner"]["genes"]
    matrices = gene_matrices(genes)
    assert set(matrices) == {"weight", "density"}
    rows, columns, values = matrices["density"]
    assert columns == ["g0", "g1"] and len(rows) == 6 and "specialist1 / attention" in rows
    shown = sorted(v for _, _, m in matrices.values() for v in m.ravel() if np.isfinite(v))
    assert shown == sorted(gene["value"] for gene in genes)


@pytest.mark.slow  # a search
def test_report_of_an_unfinished_run_decodes_the_best_genotype(tiny_sources, tiny_evals, tmp_path):
    run_dir = tmp_path / "run"
    data = recipe_data(tiny_sources, tiny_evals, genome=TIES_GENOME)
    result, evaluated = run_here(data, run_dir, stop_after=3)
    assert result.stopped_early and not (run_dir / "summary.json").exists()

    files = write_report(run_dir)  # next to the run by default
    assert files.html == run_dir / "report.html" and files.genes_plot is not None
    page = files.html.read_text()
    assert referenced_images(page) == ["fitness.png", "genes.png"]
    assert files.fitness_plot.read_bytes().startswith(PNG_MAGIC)
    assert files.genes_plot.read_bytes().startswith(PNG_MAGIC)
    assert "not finished" in page and "WINNER" not in page
    assert f"{result.best.score:.4f}" in page


def test_report_refuses_what_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergerError, match="not a run directory"):
        write_report(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ledger.sqlite").write_text("this is not SQLite, " * 100)
    (broken / "recipe.yaml").write_text("sources: []\n")
    with pytest.raises(MergerError, match="recipe.yaml: sources"):
        write_report(broken)
    fake_sources = {name: tmp_path / name for name in ("base", "specialist1", "specialist2")}
    (broken / "recipe.yaml").write_text(yaml.safe_dump(recipe_data(fake_sources, tmp_path)))
    with pytest.raises(MergerError, match="not a readable ledger"):
        write_report(broken)


def test_report_refuses_a_run_with_nothing_recorded(tiny_sources, tiny_evals, tmp_path):
    from merger.recipe import parse_recipe
    from merger.search.open import open_run

    open_run(parse_recipe(recipe_data(tiny_sources, tiny_evals)), tmp_path / "run").close()
    with pytest.raises(MergerError, match="no evaluation recorded yet"):
        write_report(tmp_path / "run")


def test_gene_matrices_put_embeddings_in_their_own_column():
    genes = [
        {"parameter": "weight", "source": "a", "tensor_class": "embeddings", "group": None, "value": 0.1},
        {"parameter": "weight", "source": "a", "tensor_class": "default", "group": 0, "value": 0.2},
        {"parameter": "weight", "source": "a", "tensor_class": "default", "group": 1, "value": 0.3},
        {"parameter": "t", "source": None, "tensor_class": "default", "group": 0, "value": 0.4},
    ]
    matrices = gene_matrices(genes)
    rows, columns, values = matrices["weight"]
    assert rows == ["a / embeddings", "a / default"] and columns == ["g0", "g1", "embed"]
    np.testing.assert_array_equal(values, [[np.nan, np.nan, 0.1], [0.2, 0.3, np.nan]])
    assert matrices["t"][0] == ["shared / default"]
