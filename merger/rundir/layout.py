"""A run directory's layout: the one place that names the files of a run.

RUN_DIR/recipe.yaml          the validated recipe (a resume must match it)
RUN_DIR/ledger.sqlite        every evaluation, generation and final score (merger.rundir.ledger)
RUN_DIR/search_state.pkl     the optimizer, checkpointed every generation (merger.search.state)
RUN_DIR/best.yaml            the winner's mergekit configuration
RUN_DIR/final/               the winner, exported by mergekit (written as final.partial/, renamed)
RUN_DIR/baselines/NAME.yaml  each untuned baseline's mergekit configuration (merger.recipe.baselines)
RUN_DIR/baselines/NAME/      its export, while it is scored
RUN_DIR/summary.json         `Summary` (merger.rundir.summary): the winner's, the sources' and the baselines' scores
RUN_DIR/method_choice.json   `genome.method: auto`: the method chosen and the scores it rests on
RUN_DIR/method_probe/        while it is chosen: the baselines' fitness scoring, a run directory of its own
"""

from __future__ import annotations

import json
from pathlib import Path

from merger.common.errors import MergerError
from merger.common.files import write_atomic
from merger.rundir.summary import Summary, parse_summary

RECIPE_FILE = "recipe.yaml"
LEDGER_FILE = "ledger.sqlite"
CHECKPOINT_FILE = "search_state.pkl"
BEST_CONFIG_FILE = "best.yaml"
FINAL_DIR = "final"
BASELINES_DIR = "baselines"
SUMMARY_FILE = "summary.json"
CARD_FILE = "README.md"  # final/README.md: the model card (merger.rundir.render), published unchanged
TRACKING_FILE = "tracking.json"  # {tracking URI: the run directory's run there} (merger.tracking)
METHOD_CHOICE_FILE = "method_choice.json"  # merger.finish.method_choice
METHOD_PROBE_DIR = "method_probe"


class RunDir:
    """The paths of one run directory, and reading and writing its summary."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    @property
    def recipe(self) -> Path:
        return self.path / RECIPE_FILE

    @property
    def ledger(self) -> Path:
        return self.path / LEDGER_FILE

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def best_config(self) -> Path:
        return self.path / BEST_CONFIG_FILE

    @property
    def final(self) -> Path:
        return self.path / FINAL_DIR

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def baselines(self) -> Path:
        return self.path / BASELINES_DIR

    @property
    def tracking(self) -> Path:
        return self.path / TRACKING_FILE

    @property
    def method_choice(self) -> Path:
        return self.path / METHOD_CHOICE_FILE

    @property
    def method_probe(self) -> Path:
        return self.path / METHOD_PROBE_DIR

    def baseline(self, name: str) -> Path:
        return self.baselines / name

    def baseline_config(self, name: str) -> Path:
        return self.baselines / f"{name}.yaml"

    def read_summary(self) -> Summary | None:
        """The summary, or None when the run has not finished; a damaged one is a MergerError."""
        if not self.summary.is_file():
            return None
        try:
            data = json.loads(self.summary.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise MergerError(f"{self.summary} is not valid JSON: {error}") from None
        return parse_summary(data, str(self.summary))

    def write_summary(self, summary: Summary) -> None:
        write_atomic(self.summary, summary.to_json().encode())
