"""A run's numbers in a tracker, read from the ledger: live as the run goes, or afterwards (`merger track
sync`), the same metrics either way.

What one MLflow run holds (step = a candidate's place in the search, or a generation):
- params: the recipe, flattened where a value is short (the whole of it as the artifact recipe.yaml),
  each source's path and weights digest, the search space's size, the seed, the scoring precision;
- per candidate: `search/fitness`, `search/fitness_se` (bootstrap over its items), `search/items`,
  `search/merge_seconds`, `search/eval_seconds`, `search/failed` (1: it could not merge or score);
- per generation: `generation/best`, `generation/mean`, and `monitoring/TASK` (the validation curve);
- at the end: `table/selection/NAME` and `table/selection_se/NAME` per finalist, `table/lead_low/NAME`
  for a candidate, the decision as tags (`merger.chosen`, `merger.decision`), `table/SPLIT/MODEL/TASK`
  for the final table, and the artifacts summary.json, best.yaml, recipe.yaml, the model card and
  report.html when there is one.

The tracker never fails a run: the first error warns once on stderr and tracking stops for the rest of
the sitting; the ledger stays the source of truth.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from merger.common.files import write_atomic
from merger.recipe import Recipe
from merger.recipe.schema import TrackingSpec
from merger.rundir.layout import RunDir
from merger.rundir.ledger import WARM_START_GENERATION, EvaluationRecord, GenerationRecord, Ledger
from merger.rundir.render import score_cells
from merger.rundir.summary import Summary
from merger.scoring.fitness import weighted_score
from merger.scoring.items import item_count
from merger.scoring.uncertainty import standard_error
from merger.tracking.mlflow_store import MlflowStore, default_uri, first_line

START = "the run's start"  # the one step that runs before the MLflow run is known
PARAM_LIMIT = 250  # longer recipe values stay in the recipe.yaml artifact only
FINISHED_TAG = "merger.finished"  # set with the last batch of the end's numbers
# metric groups (MLflow's UI charts each prefix as a section)
SEARCH, GENERATION, MONITORING, FINAL = "search", "generation", "monitoring", "table"


def metric_name(text: str) -> str:
    """A name MLflow accepts: letters, digits and `_-. /` only ("gen 2 #7" -> "gen 2 7")."""
    return re.sub(r"\s+", " ", re.sub(r"[^\w\-. /]", "", text)).strip()


def flat_params(data: Any, prefix: str = "") -> dict[str, str]:
    """{"genome.method": "task_arithmetic", ...}: the short leaves of a recipe."""
    if isinstance(data, dict):
        params: dict[str, str] = {}
        for key, value in data.items():
            params |= flat_params(value, f"{prefix}{key}.")
        return params
    text = str(data)
    return {prefix.rstrip("."): text} if len(text) <= PARAM_LIMIT else {}


def candidate_step(record: EvaluationRecord, popsize: int, warm_starts: int) -> int:
    """Where a candidate falls in the search, the same in every sitting: warm starts first, then each
    generation's candidates in order."""
    if record.generation == WARM_START_GENERATION:
        return record.index
    return warm_starts + record.generation * popsize + record.index


class RunTracker:
    """One run directory's MLflow run: opened at the start (a broken store is one error line then),
    fed from the ledger, ended with the run."""

    def __init__(self, store: MlflowStore, run_dir: Path, recipe: Recipe, experiment: str):
        self.store, self.run_dir, self.recipe, self.experiment = store, run_dir, recipe, experiment
        self.run_id: str | None = None  # the MLflow run, once `start` found or made it
        self.broken = False
        self.seconds = 0.0  # spent logging, this sitting
        self._steps: dict[str, set[int]] | None = None  # what the store already holds, read once

    # -- failure policy ----------------------------------------------------------------------------
    def _safely(self, what: str, log: Callable[[], None]) -> None:
        if self.broken or (self.run_id is None and what != START):
            return
        started = time.perf_counter()
        try:
            log()
        except Exception as error:  # a tracker never fails the run
            self.broken = True
            print(
                f"merger: warning: tracking stopped while logging {what} ({first_line(error)}); the run goes on, "
                f"and `merger track sync {self.run_dir}` back-fills the tracker from the ledger",
                file=sys.stderr,
            )
        finally:
            self.seconds += time.perf_counter() - started

    def _logged(self, key: str) -> set[int]:
        if self._steps is None:
            self._steps = {
                "candidates": self.store.logged_steps(self.run_id, f"{SEARCH}/fitness"),
                "generations": self.store.logged_steps(self.run_id, f"{GENERATION}/best"),
            }
        return self._steps[key]

    # -- what is logged ------------------------------------------------------------------------------
    def start(self, ledger: Ledger) -> None:
        """Once the run directory holds a ledger: its MLflow run in this store (`RunDir.tracking`) continued,
        or one made and its id kept at once; then the params."""
        self._safely(START, lambda: self._log_start(ledger))

    def _log_start(self, ledger: Ledger) -> None:
        self.run_id = known_runs(self.run_dir).get(self.store.uri)
        if self.run_id is None or not self.store.reopen(self.run_id):
            self.run_id = self.store.create_run(self.experiment, self.run_dir)
            keep_run(self.run_dir, self.store.uri, self.run_id)
        meta = ledger.meta()
        params = flat_params(self.recipe.model_dump(mode="json", exclude_none=True))
        for name, lineage in meta.lineage.items():
            params[f"source.{name}.digest"] = lineage.sha256 or ""
        extra = {"seed": meta.seed, "genes": meta.dimension, "scoring_precision": meta.scoring_precision}
        params |= {f"run.{key}": str(value) for key, value in extra.items() if value is not None}
        known, _ = self.store.logged(self.run_id)
        new = {key: value for key, value in params.items() if key not in known}
        for start in range(0, len(new), 100):  # MLflow takes at most 100 params a batch
            chunk = dict(list(new.items())[start : start + 100])
            self.store.log(self.run_id, params=chunk)
        recipe_file = RunDir(self.run_dir).recipe
        if recipe_file.is_file():  # an artifact logged again replaces itself
            self.store.log_artifact(self.run_id, recipe_file)

    def search(self, ledger: Ledger) -> None:
        """Every candidate and generation the ledger holds that the store does not (one batch each)."""
        self._safely("the search", lambda: self._log_search(ledger))

    def _log_search(self, ledger: Ledger) -> None:
        meta = ledger.meta()
        popsize, warm = meta.popsize or 1, len(meta.warm_starts or [])
        logged = self._logged("candidates")
        for record in ledger.evaluations():
            step = candidate_step(record, popsize, warm)
            if step not in logged:
                self.store.log(self.run_id, metrics=self.candidate_metrics(ledger, record, step))
                logged.add(step)
        logged_generations = self._logged("generations")
        for generation in ledger.generations():
            if generation.generation not in logged_generations:
                self.store.log(self.run_id, metrics=generation_metrics(generation))
                logged_generations.add(generation.generation)

    def candidate_metrics(self, ledger: Ledger, record: EvaluationRecord, step: int) -> list[tuple[str, float, int]]:
        values = ledger.outcomes_of(record.candidate)
        fitness = self.recipe.fitness
        se = standard_error(values, lambda means: weighted_score(means, fitness)) if values else None
        metrics = {
            "fitness": record.score,
            "items": float(item_count(values)),
            "merge_seconds": record.merge_seconds,
            "eval_seconds": record.eval_seconds,
            "failed": float(record.failed),
        }
        if se is not None:
            metrics["fitness_se"] = se
        return [(f"{SEARCH}/{key}", value, step) for key, value in metrics.items()]

    def finish(self, summary: Summary) -> None:
        self._safely("the end of the run", lambda: self._log_finish(summary))

    def _log_finish(self, summary: Summary) -> None:
        """Artifacts first, then the final numbers in batches, the last one marked: a rerun of a finished run
        (or a sync after a live run) logs no number twice."""
        layout = RunDir(self.run_dir)
        for path in (layout.summary, layout.best_config, layout.final / "README.md", self.run_dir / "report.html"):
            if path.is_file():  # an artifact logged again replaces itself (a sync after `merger report` adds it)
                self.store.log_artifact(self.run_id, path)
        _, tags_so_far = self.store.logged(self.run_id)
        if FINISHED_TAG not in tags_so_far:
            metrics, tags = final_metrics(summary)
            batches = [metrics[start : start + 1000] for start in range(0, len(metrics), 1000)] or [[]]
            for number, batch in enumerate(batches, start=1):  # MLflow takes at most 1000 metrics a batch
                last = number == len(batches)
                self.store.log(self.run_id, metrics=batch, tags={**tags, FINISHED_TAG: "true"} if last else None)
        self.store.end(self.run_id, finished=True)

    def stopped(self) -> None:
        self._safely("the stop", lambda: self.store.end(self.run_id, finished=False))

    def published(self, reference: str) -> None:
        self._safely("the registry entry", lambda: self.store.log(self.run_id, tags={"merger.registry": reference}))


def generation_metrics(record: GenerationRecord) -> list[tuple[str, float, int]]:
    step = record.generation
    metrics = [(f"{GENERATION}/best", record.best_score, step), (f"{GENERATION}/mean", record.mean_score, step)]
    for task, score in (record.validation or {}).items():
        metrics.append((f"{MONITORING}/{metric_name(task)}", score, step))
    return metrics


def final_metrics(summary: Summary) -> tuple[list[tuple[str, float, int]], dict[str, str]]:
    """Each finalist's selection score (± error, a candidate's lead bound), the decision, the final table."""
    metrics: list[tuple[str, float, int]] = []
    tags: dict[str, str] = {}
    if summary.selection is not None:
        for row in summary.selection.finalists:
            name = metric_name(row.name)
            metrics.append((f"{FINAL}/selection/{name}", row.selection, 0))
            if row.selection_se is not None:
                metrics.append((f"{FINAL}/selection_se/{name}", row.selection_se, 0))
            if row.lower_bound is not None:
                metrics.append((f"{FINAL}/lead_low/{name}", row.lower_bound, 0))
        tags["merger.chosen"] = summary.selection.chosen
        tags["merger.decision"] = decision_text(summary)
    headers, names, values = score_cells(summary)
    for name, row in zip(names, values, strict=True):
        for header, value in zip(headers, row, strict=True):
            if value is not None:
                split, _, task = header.partition(":")
                metrics.append((f"{FINAL}/{split}/{metric_name(name)}/{metric_name(task)}", value, 0))
    return metrics, tags


def decision_text(summary: Summary) -> str:
    selection = summary.selection
    assert selection is not None
    chosen = next(row for row in selection.finalists if row.name == selection.chosen)
    if selection.kind == "candidate" and chosen.lower_bound is not None:
        return (
            f"{selection.chosen}: its lead over {chosen.reference} on {selection.eval_set} has a lower bound "
            f"of {chosen.lower_bound:+.3f} (rule {selection.rule})"
        )
    return f"{selection.chosen} ({selection.kind}) by rule {selection.rule}"


def open_tracker(spec: TrackingSpec, recipe: Recipe, run_dir: Path, experiment: str) -> RunTracker:
    """The run directory's tracker, its store opened and checked now, before any weights load (an
    unreachable store or a missing mlflow is one error line); its MLflow run is found or made by `start`,
    in `spec.experiment` or else `experiment`."""
    store = MlflowStore(spec.uri or default_uri(run_dir))
    return RunTracker(store, run_dir, recipe, spec.experiment or experiment)


def known_runs(run_dir: Path) -> dict[str, str]:
    """{tracking URI: MLflow run id} of the run directory."""
    path = RunDir(run_dir).tracking
    return json.loads(path.read_text()) if path.is_file() else {}


def keep_run(run_dir: Path, uri: str, run_id: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(RunDir(run_dir).tracking, json.dumps({**known_runs(run_dir), uri: run_id}, indent=2).encode())


def note_published(run_dir: Path, recipe: Recipe, reference: str) -> None:
    """`merger publish`: the registry reference as a tag of the run directory's MLflow run, where the recipe
    tracks one; a store that cannot take it is a warning, never a failed publish."""
    if recipe.tracking is None:
        return
    try:
        store = MlflowStore(recipe.tracking.uri or default_uri(run_dir))
        run_id = known_runs(run_dir).get(store.uri)
        if run_id is not None:
            store.log(run_id, tags={"merger.registry": reference})
    except Exception as error:
        print(f"merger: warning: the MLflow run was not told of {reference} ({first_line(error)})", file=sys.stderr)
