"""mergekit's exports at the end of a run: each baseline before it is scored, and the winner into final/
(best.yaml beside it), checked against the weights that were scored."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from mergekit.config import MergeConfiguration

from merger.common.files import publish_directory, staging_dir, write_atomic
from merger.engine.reference import export_merge
from merger.finish.models import Contender, FinalModel, config_identity, merge_yaml
from merger.finish.scored_export import match_scored_weights
from merger.recipe import PASSTHROUGH
from merger.rundir.ledger import WINNER_KEY
from merger.search.open import OpenRun


def export_once(model: FinalModel, run: OpenRun, check: Callable[[Path], None] | None = None) -> None:
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
    started = time.perf_counter()
    recipe = run.recipe
    config = model.config.model_copy(deep=True)  # mergekit's export rewrites the config it is given
    export_merge(config, staging, seed=recipe.optimizer.seed, trust_remote_code=recipe.trust_remote_code)
    if check is not None:
        check(staging)
    publish_directory(staging, model.path)
    run.ledger.record_cost("finals", f"export {model.key}", 0, time.perf_counter() - started)


def export_winner(run: OpenRun, winner: Contender) -> tuple[FinalModel, str]:
    """best.yaml and final/: the chosen model as mergekit exports it (reused when already exported).

    A candidate's export is checked against the weights it was scored with; a baseline's is its own
    merge again; a source's is mergekit's passthrough of it. Returns the winner as scored at the end
    (identified by its best.yaml) and best.yaml's text.
    """
    layout = run.layout
    check = None
    if winner.record is not None:
        record = winner.record
        config = run.space.to_config(np.asarray(record.genotype))
        check = lambda staging: match_scored_weights(  # noqa: E731
            run.executor, record, staging, run.recipe.trust_remote_code
        )
    elif winner.model.config is not None:
        config = winner.model.config
    else:
        config = passthrough_config(run, winner.model)
    config_yaml = merge_yaml(config)
    exported = FinalModel(WINNER_KEY, layout.final, config_identity(config_yaml), config, layout.best_config)
    export_once(exported, run, check=check)
    return FinalModel(WINNER_KEY, exported.path, exported.identity), config_yaml


def passthrough_config(run: OpenRun, source: FinalModel) -> MergeConfiguration:
    """A source as mergekit exports it alone: its weights in the recipe's dtype, with the run's tokenizer."""
    recipe = run.recipe
    data: dict[str, Any] = {
        "merge_method": PASSTHROUGH,
        "models": [{"model": str(source.path)}],
        "dtype": recipe.engine.dtype,
    }
    if recipe.tokenizer_source:
        data["tokenizer_source"] = str(run.source_paths[recipe.tokenizer_source])
    return MergeConfiguration.model_validate(data)
