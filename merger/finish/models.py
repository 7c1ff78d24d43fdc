"""The models the end of a run scores: their identity, their export, their scores kept in the ledger.

Finishing resumes as the search does: each final score is committed to the ledger as it finishes (keyed
by model and eval set, with the identity of the weights scored, its items kept under that identity), a
finished export whose configuration matches is reused, and a run killed here re-scores only what the
ledger lacks. Scores are reused by identity: the winner chosen from the baselines is not scored again.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mergekit.config import MergeConfiguration

from merger.common.files import publish_directory, staging_dir, write_atomic
from merger.engine.reference import export_merge
from merger.executors import Scored
from merger.executors.jobs import score_models
from merger.finish.score_cache import ScoreCache
from merger.rundir.ledger import FinalScore, final_items_key
from merger.scoring.fitness import eval_sets
from merger.search.loop import Search

ScoreTable = dict[str, dict[str, dict[str, float]]]  # model key -> eval set -> task -> score


@dataclass(frozen=True)
class FinalModel:
    """A model scored at the end: the winner, a source, a baseline, or a finalist candidate."""

    key: str  # the ledger's model key
    path: Path | None  # where its checkpoint is (None: a candidate scored merged in memory)
    identity: str  # which weights: a source's weights digest, a merge's config digest
    config: MergeConfiguration | None = None  # a merge exported before it is scored
    config_file: Path | None = None
    genotype: np.ndarray | None = None  # a candidate's: merged in memory, never exported to be scored


def config_identity(config_yaml: str) -> str:
    return "config:" + hashlib.sha256(config_yaml.encode()).hexdigest()


def merge_yaml(config: MergeConfiguration) -> str:
    """The text of best.yaml and baselines/NAME.yaml: what `mergekit-yaml` reproduces."""
    return config.to_yaml() + "\n"


def export_once(model: FinalModel, search: Search, check: Callable[[Path], None] | None = None) -> None:
    """mergekit's export of `model.config` into `model.path`, its YAML into `model.config_file`.

    An export already there from the same YAML is kept; otherwise it is written to a staging
    directory, given to `check` (which may refuse it or rewrite its weights), and renamed into
    place, so a finished directory is always a whole, checked export.
    """
    assert model.config is not None and model.config_file is not None and model.path is not None
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


def score_final(search: Search, models: list[FinalModel], sets: list[str] | None = None) -> ScoreTable:
    """`{model key: {eval set: scores}}` over `sets` (all of the recipe's by default): what the ledger holds
    for these weights, and the rest scored now.

    Merges are exported only when one of their scores is missing (a candidate is merged in memory). All
    missing jobs go to the executor at once (a Ray executor spreads them over its workers), and each is
    committed with its items as it finishes.
    """
    sets = sets or list(eval_sets(search.recipe))
    rows = search.ledger.final_scores()
    held = {(row.identity, row.eval_set): row.scores for row in rows}
    recorded = {(row.model, row.eval_set): row.identity for row in rows}
    kept = {}
    for model in models:
        for name in sets:
            if (model.identity, name) not in held:
                continue
            kept[(model.key, name)] = held[(model.identity, name)]
            if recorded.get((model.key, name)) != model.identity:  # held under another key (a baseline as winner)
                search.ledger.record_final_score(FinalScore(model.key, name, model.identity, kept[(model.key, name)]))
    missing = [(model, name) for model in models for name in sets if (model.key, name) not in kept]
    shared = ScoreCache.from_env(search)

    def record(job: int, scored: Scored) -> None:
        model, name = missing[job]
        search.ledger.record_items(final_items_key(model.identity), scored.items)
        search.ledger.record_final_score(FinalScore(model.key, name, model.identity, scored.scores))
        kept[(model.key, name)] = scored.scores

    def keep(job: int, scored: Scored) -> None:  # scored now: shared with other runs too
        record(job, scored)
        if shared is not None:
            model, name = missing[job]
            shared.put(model.identity, name, scored)

    if shared is not None:
        for job, (model, name) in enumerate(missing):
            found = shared.get(model.identity, name)
            if found is not None:
                record(job, found)
        missing = [(model, name) for model, name in missing if (model.key, name) not in kept]
    for model in {model.key: model for model, _ in missing}.values():
        if model.config is not None and model.genotype is None:
            export_once(model, search)

    jobs = [(model.genotype if model.genotype is not None else model.path, name) for model, name in missing]
    score_models(search.executor, jobs, keep)  # type: ignore[arg-type]
    return {model.key: {name: kept[(model.key, name)] for name in sets} for model in models}

