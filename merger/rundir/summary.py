"""The run's typed summary (summary.json): the winner's, the sources' and the baselines' scores, and how
the winner was chosen. `merger.rundir.render` renders it (terminal tables, the model card, the report's
tables); `merger.finish.summary` builds it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from merger.common.errors import MergerError

SCORE_SPLITS = ("validation", "test", "fitness")
WINNER_ROW = "WINNER"
BASELINE_ROW_PREFIX = "baseline: "
# the columns a table adds after a split's tasks when it has more than one: {column: AcrossTasks field}
ACROSS_COLUMNS = {"(mean)": "mean", "(worst)": "worst"}


class _Block(BaseModel):
    # extra="allow": summaries written by other versions keep what this one does not know
    model_config = ConfigDict(extra="allow")


class AcrossTasks(_Block):
    """One eval set's tasks taken together: their weighted mean, and the worst task beside it."""

    mean: float
    worst: float
    worst_task: str


class Scores(_Block):
    """One model's scores per eval set: {task: score}. Old summaries hold the winner's fitness as a number
    (and no `across_tasks`)."""

    fitness: dict[str, float] | float | None = None
    validation: dict[str, float] | None = None
    test: dict[str, float] | None = None
    across_tasks: dict[str, AcrossTasks] | None = None  # {split: mean and worst task}

    def by_split(self) -> dict[str, dict[str, float]]:
        """`{split: {task: score}}` for the splits that hold per-task numbers."""
        blocks = {split: getattr(self, split) for split in SCORE_SPLITS}
        return {split: dict(block) for split, block in blocks.items() if isinstance(block, dict)}

    def cell(self, split: str, column: str) -> float | None:
        """A table's value: a task's score, or the split's mean or worst task (`ACROSS_COLUMNS`)."""
        if column in ACROSS_COLUMNS:
            across = (self.across_tasks or {}).get(split)
            return None if across is None else getattr(across, ACROSS_COLUMNS[column])
        return self.by_split().get(split, {}).get(column)


class Winner(Scores):
    genotype: list[float] = Field(default_factory=list)
    score: float | None = None
    generation: int | None = None
    index: int | None = None
    genes: list[dict[str, Any]] | None = None


class Baseline(Scores):
    method: str
    config: str = ""  # its mergekit YAML (also RUN_DIR/baselines/NAME.yaml)


class Finalist(_Block):
    """One model the selection re-scored: its fitness and its selection score, each with its standard
    error (bootstrap over the items)."""

    name: str  # its row: "gen 3 #4", "baseline: linear", a source's name
    kind: str  # candidate, baseline or source
    fitness: float | None = None  # None: an untuned model not scored on the fitness set
    fitness_se: float | None = None
    selection: float
    selection_se: float | None = None
    identity: str = ""  # the weights it names (FinalScore.identity)
    lower_bound: float | None = None  # a candidate's: its lead over `reference` on selection, lower bound
    reference: str | None = None  # the best untuned finalist that lead is measured against
    items: int | None = None  # validation items it was scored on
    dropped_after: int | None = None  # racing: dropped once this many items showed another surely ahead
    tasks: dict[str, float] | None = None  # its score on each validation task (on its `items`)


class SelectionRace(_Block):
    """How selection raced its finalists (merger.finish.selection_race): in blocks of `block` validation
    items, a finalist dropped once a paired test (wrong with chance at most `delta` over all drops) showed
    another ahead of it; `items` scored in all, against `items_without_racing` for every finalist on every
    item."""

    block: int
    delta: float
    items: int
    items_without_racing: int


class Selection(_Block):
    """How the winner was chosen: the best finalist on the validation set (merger.finish.selection)."""

    eval_set: str = "validation"
    top_k: int
    rule: str = "best"  # SelectionSpec.rule
    chosen: str  # the winning finalist's name
    kind: str  # its kind: candidate, baseline or source
    finalists: list[Finalist] = Field(default_factory=list)
    racing: SelectionRace | None = None  # None: every finalist on every validation item
    # the finalists no other beats on every validation task (merger.finish.front); None: one task
    front: list[str] | None = None
    member: str | None = None  # the front member a user chose (`merger run --member`) over the rule's winner
    # `selection.final_table: contenders`: the untuned finalists scored on the test set beside the winner
    # (its reference, the best untuned one on validation); None: every untuned model
    tested: list[str] | None = None


class PhaseCost(_Block):
    """One phase of the run (merger.rundir.ledger.PHASES): items scored, seconds merging and scoring them
    (in `finals`, mergekit's exports too)."""

    items: int
    seconds: float


class LineageEntry(_Block):
    path: str | None = None
    registry: str | None = None
    reference: str | None = None
    sha256: str | None = None


class MethodChosen(_Block):
    """`genome.method: auto` (merger.finish.method_choice): the baseline whose method was searched, every
    baseline considered with its fitness, and why the others were not."""

    baseline: str
    method: str
    fitness: dict[str, float]
    skipped: dict[str, str] = Field(default_factory=dict)


class Summary(_Block):
    winner: Winner
    sources: dict[str, Scores] = Field(default_factory=dict)
    baselines: dict[str, Baseline] = Field(default_factory=dict)
    baselines_skipped: dict[str, str] = Field(default_factory=dict)  # name: why it does not apply
    evaluations: int | None = None
    generations: int | None = None
    failures: int | None = None
    seed: int | None = None
    method: str | None = None
    method_chosen: MethodChosen | None = None  # None: the recipe named its method
    # the search space in one line; summaries written before this name called it `genome`
    search_space: str | None = Field(default=None, validation_alias=AliasChoices("search_space", "genome"))
    budget: dict[str, Any] = Field(default_factory=dict)
    lineage: dict[str, LineageEntry] = Field(default_factory=dict)
    scoring_precision: str | None = None  # fp32 or bf16: what lm-eval scored every model in
    selection: Selection | None = None  # None: the winner is the best candidate by fitness
    costs: dict[str, PhaseCost] = Field(default_factory=dict)  # phase -> its cost (empty in old summaries)

    @property
    def fitness(self) -> float | None:
        """The winner's scalar fitness (`score`, or `fitness` where an old summary holds one number)."""
        for value in (self.winner.score, self.winner.fitness):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        return None

    def score_rows(self) -> dict[str, Scores]:
        """What every table shows (terminal, report, model card): sources, baselines, then the winner; an
        untuned model with no score at all (dropped by the selection race, and not on the test set under
        `final_table: contenders`) is only in the finalists table."""
        untuned = {**self.sources, **{BASELINE_ROW_PREFIX + name: block for name, block in self.baselines.items()}}
        return {**{name: block for name, block in untuned.items() if block.by_split()}, WINNER_ROW: self.winner}

    def score_columns(self) -> list[tuple[str, str]]:
        """(eval set, task) for each of the winner's scores, validation first; after a split of several
        tasks, its mean and worst task (`ACROSS_COLUMNS`)."""
        winner = self.winner.by_split()
        across = self.winner.across_tasks or {}
        columns = []
        for split in (s for s in SCORE_SPLITS if s in winner):
            columns += [(split, task) for task in winner[split]]
            if len(winner[split]) > 1 and split in across:
                columns += [(split, column) for column in ACROSS_COLUMNS]
        return columns

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_unset=True), indent=2)


def parse_summary(data: Any, origin: str) -> Summary:
    if not isinstance(data, dict) or not isinstance(data.get("winner"), dict):
        raise MergerError(f"{origin} must be a JSON object with a 'winner' object")
    try:
        return Summary.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise MergerError(f"{origin}: {where}: {first['msg']}") from None
