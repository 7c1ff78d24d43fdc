"""The end of a run: best.yaml, the winner exported by mergekit, its scores next to every source's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from merger.engine.reference import export_merge
from merger.fitness import eval_sets
from merger.layer_path import path_card_lines
from merger.registry import weights_digest
from merger.search import Search, SearchResult, write_atomic
from merger.sources import resolve_sources

SUMMARY_FILE = "summary.json"
BEST_CONFIG_FILE = "best.yaml"
FINAL_DIR = "final"


def export_winner(search: Search, result: SearchResult) -> Path:
    run_dir = search.run_dir
    config = search.genome.to_config(np.asarray(result.best.genotype))
    write_atomic(run_dir / BEST_CONFIG_FILE, (config.to_yaml() + "\n").encode())
    final = run_dir / FINAL_DIR
    staging = run_dir / (FINAL_DIR + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    export_merge(
        config, staging, seed=search.recipe.optimizer.seed, trust_remote_code=search.recipe.trust_remote_code
    )
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final


def score_everything(search: Search, final: Path) -> dict[str, Any]:
    """Every eval set (fitness, validation, test) for the exported winner and each source alone."""
    sets = list(eval_sets(search.recipe))
    sources = resolve_sources(search.recipe)
    scores: dict[str, Any] = {"winner": {}, "sources": {name: {} for name in sources}}
    models = [(scores["winner"], final), *((scores["sources"][name], path) for name, path in sources.items())]
    places = [(table, path, set_name) for table, path in models for set_name in sets]
    # all at once: a Ray executor spreads them over its workers
    results = search.executor.score_checkpoints([(path, set_name) for _, path, set_name in places])
    for (table, _, set_name), result in zip(places, results, strict=True):
        table[set_name] = result
    return scores


def build_summary(search: Search, result: SearchResult, scores: dict[str, Any]) -> dict[str, Any]:
    recipe = search.recipe
    sources = resolve_sources(recipe)
    meta = search.ledger.meta()
    return {
        "winner": {
            **scores["winner"],
            "genotype": result.best.genotype,
            "score": result.best.score,
            "generation": result.best.generation,
            "index": result.best.index,
            "genes": search.genome.table(np.asarray(result.best.genotype)),
        },
        "sources": scores["sources"],
        "evaluations": result.evaluations,
        "generations": result.generations,
        "failures": sum(r.failed for r in search.ledger.evaluations()),
        "seed": recipe.optimizer.seed,
        "method": recipe.genome.method,
        "genome": meta.get("genome"),
        "budget": {
            "max_evaluations": recipe.optimizer.max_evaluations,
            "max_seconds": recipe.optimizer.max_seconds,
            "seconds": round(sum(g.seconds for g in search.ledger.generations()), 1),
        },
        "lineage": {
            source.name: {
                "path": str(sources[source.name]),
                "registry": source.path.removeprefix("registry:")
                if source.path.startswith("registry:")
                else None,
                "reference": source.path,
                "sha256": weights_digest(sources[source.name]),
            }
            for source in recipe.sources
        },
    }


def score_table(summary: dict[str, Any]) -> str:
    """Sources and winner, one column per (eval set, task)."""
    rows = {**{name: s for name, s in summary["sources"].items()}, "WINNER": summary["winner"]}
    set_names = [s for s in ("validation", "test", "fitness") if s in summary["winner"]]
    columns = [(s, task) for s in set_names for task in summary["winner"][s]]
    header = ["model"] + [f"{s}:{task}" for s, task in columns]
    lines = [header] + [[name] + [f"{row[s][task]:.3f}" for s, task in columns] for name, row in rows.items()]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines
    )


def model_card(search: Search, summary: dict[str, Any], config_yaml: str) -> str:
    recipe = search.recipe
    base = summary["lineage"][recipe.base_model]["reference"] if recipe.base_model else None
    sources = "\n".join(f"- `{name}`: {entry['reference']}" for name, entry in summary["lineage"].items())
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
            f"Found by `merger` with CMA-ES over {summary['genome']} in {summary['evaluations']} "
            f"evaluations (seed {summary['seed']}).",
            "",
            "## Sources",
            sources,
            "",
            *path_card_lines(summary["winner"]["genes"]),
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


def finished_summary(run_dir: Path, result: SearchResult) -> dict[str, Any] | None:
    """The summary of a run that already finished with this result (rerunning it re-scores nothing)."""
    path = run_dir / SUMMARY_FILE
    if not path.is_file() or not (run_dir / FINAL_DIR).is_dir():
        return None
    summary = json.loads(path.read_text())
    same_evaluations = summary.get("evaluations") == result.evaluations
    same_winner = summary.get("winner", {}).get("genotype") == list(result.best.genotype)
    return summary if same_evaluations and same_winner else None


def finish_run(search: Search, result: SearchResult) -> dict[str, Any]:
    final = export_winner(search, result)
    scores = score_everything(search, final)
    summary = build_summary(search, result, scores)
    config_yaml = (search.run_dir / BEST_CONFIG_FILE).read_text()
    (final / "README.md").write_text(model_card(search, summary, config_yaml))
    write_atomic(search.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2).encode())
    return summary
