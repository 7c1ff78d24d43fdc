"""The run's ledger: every evaluation and generation, in SQLite inside the run directory.

Each record is committed as soon as it exists, so a run killed at any moment keeps every finished
evaluation, and `merger status` can read the ledger (WAL mode) while the run writes it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from merger.rundir.layout import LEDGER_FILE
from merger.rundir.meta import RunMeta
from merger.rundir.summary import PhaseCost

SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    generation INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    genotype TEXT NOT NULL,
    config TEXT NOT NULL,
    scores TEXT NOT NULL,
    score REAL NOT NULL,
    objective REAL NOT NULL,
    merge_seconds REAL NOT NULL,
    eval_seconds REAL NOT NULL,
    failure TEXT,
    created REAL NOT NULL,
    digest TEXT,
    PRIMARY KEY (generation, idx)
);
CREATE TABLE IF NOT EXISTS generations (
    generation INTEGER PRIMARY KEY,
    best_idx INTEGER NOT NULL,
    best_score REAL NOT NULL,
    mean_score REAL NOT NULL,
    validation TEXT,
    seconds REAL NOT NULL,
    ended REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS item_outcomes (
    candidate TEXT NOT NULL,
    task TEXT NOT NULL,
    doc_id INTEGER NOT NULL,
    value REAL NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (candidate, task, doc_id)
);
CREATE TABLE IF NOT EXISTS fitness_estimates (
    generation INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    strategy TEXT NOT NULL,
    items INTEGER NOT NULL,
    total INTEGER NOT NULL,
    estimate REAL NOT NULL,
    full_score REAL,
    PRIMARY KEY (generation, idx)
);
CREATE TABLE IF NOT EXISTS phase_costs (
    phase TEXT NOT NULL,
    job TEXT NOT NULL,
    items INTEGER NOT NULL,
    seconds REAL NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (phase, job)
);
CREATE TABLE IF NOT EXISTS final_scores (
    model TEXT NOT NULL,
    eval_set TEXT NOT NULL,
    identity TEXT NOT NULL,
    scores TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (model, eval_set)
);
"""


@dataclass
class EvaluationRecord:
    generation: int
    index: int
    genotype: list[float]
    config: str  # the decoded mergekit YAML
    scores: dict[str, float] = field(default_factory=dict)
    score: float = 0.0  # weighted fitness score in [0, 1], higher is better
    objective: float = 0.0  # what pycma was told (minimised)
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    failure: str | None = None
    digest: str | None = None  # of the merged weights that were scored (`engine.weights.model_digest`)
    # per task, each fitness item's value; carried from the worker to the ledger's item_outcomes table
    values: dict[str, dict[int, float]] | None = field(default=None, repr=False, compare=False)

    @property
    def failed(self) -> bool:
        return self.failure is not None

    @property
    def candidate(self) -> str:
        return candidate_key(self.generation, self.index)


# How the ledger names models: search candidates in item_outcomes, sources in item_outcomes (anchors)
# and final_scores, baselines and the winner in final_scores.
WINNER_KEY = "winner"
SOURCE_PREFIX = "source:"
BASELINE_PREFIX = "baseline:"
FORMER_SOURCE_PREFIX = "source/"  # item_outcomes' source rows before the one prefix
WARM_START_GENERATION = -1  # the candidates scored before the first generation (genome.warm_start)


FINAL_ITEMS_PREFIX = "final:"  # item_outcomes of a model scored at the end, keyed by its identity


def final_items_key(identity: str) -> str:
    """The item_outcomes key of what the end of a run scored on one model's weights (`FinalScore.identity`)."""
    return FINAL_ITEMS_PREFIX + identity


def candidate_key(generation: int, index: int) -> str:
    return f"{generation}/{index}"


def source_key(name: str) -> str:
    return SOURCE_PREFIX + name


def baseline_key(name: str) -> str:
    return BASELINE_PREFIX + name


@dataclass
class FitnessEstimate:
    """What a strategy other than `full` knew of a candidate: items scored of the total, its estimate,
    and its full-set score once known (a race finished, or an anchor check)."""

    generation: int
    index: int
    strategy: str
    item_count: int  # the ledger's `items` column
    total: int
    estimate: float
    full_score: float | None = None


@dataclass
class GenerationRecord:
    generation: int
    best_idx: int
    best_score: float
    mean_score: float
    validation: dict[str, float] | None
    seconds: float


# Where a run spends its item-evaluations: the search's candidates (and the sources an anchors strategy
# scores), each generation's best on the monitoring subset, the finalists on the validation set, and the
# final table (the other eval sets of sources, baselines and the winner).
PHASES = ("search", "monitoring", "selection", "finals")


@dataclass(frozen=True)
class FinalScore:
    """A finished model's scores on one eval set. `identity` says which weights were scored (a source's
    weights digest, a merge's mergekit YAML digest): a row of another identity is scored again."""

    model: str  # WINNER_KEY, source_key(NAME) or baseline_key(NAME)
    eval_set: str
    identity: str
    scores: dict[str, float]


class Ledger:
    def __init__(self, run_dir: Path):
        self.path = run_dir / LEDGER_FILE
        self.on_cost: Callable[[str], None] | None = None
        self._db = sqlite3.connect(self.path, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._add_digest_column()
        self._rename_former_source_keys()
        self._db.commit()

    def _add_digest_column(self) -> None:
        """Ledgers written before evaluations had a `digest` column get one (empty for old rows)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(evaluations)")}
        if "digest" not in columns:
            self._db.execute("ALTER TABLE evaluations ADD COLUMN digest TEXT")

    def _rename_former_source_keys(self) -> None:
        """Ledgers written when sources' item outcomes were keyed `source/NAME` get `source_key(NAME)`."""
        former = FORMER_SOURCE_PREFIX + "%"
        if self._db.execute("SELECT 1 FROM item_outcomes WHERE candidate LIKE ? LIMIT 1", (former,)).fetchone():
            self._db.execute(
                "UPDATE item_outcomes SET candidate = ? || substr(candidate, ?) WHERE candidate LIKE ?",
                (SOURCE_PREFIX, len(FORMER_SOURCE_PREFIX) + 1, former),
            )

    @classmethod
    def open_existing(cls, run_dir: Path) -> Ledger | None:
        return cls(run_dir) if (run_dir / LEDGER_FILE).is_file() else None

    def close(self) -> None:
        self._db.close()

    # -- writing --------------------------------------------------------------------------------
    def record_evaluation(self, record: EvaluationRecord) -> None:
        """Insert once; a record already there (the same generation and index) is kept as it is."""
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO evaluations VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    record.generation, record.index, json.dumps(record.genotype), record.config,
                    json.dumps(record.scores), record.score, record.objective, record.merge_seconds,
                    record.eval_seconds, record.failure, time.time(), record.digest,
                ),
            )

    def record_generation(self, record: GenerationRecord) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO generations VALUES (?,?,?,?,?,?,?)",
                (
                    record.generation, record.best_idx, record.best_score, record.mean_score,
                    json.dumps(record.validation) if record.validation is not None else None,
                    record.seconds, time.time(),
                ),
            )

    def record_items(self, candidate: str, values: dict[str, dict[int, float]]) -> None:
        """Each item's outcome for a candidate; an outcome already there is kept (items are scored once)."""
        now = time.time()
        with self._db:
            self._db.executemany(
                "INSERT OR IGNORE INTO item_outcomes VALUES (?,?,?,?,?)",
                [(candidate, task, doc, value, now) for task, docs in values.items() for doc, value in docs.items()],
            )

    def record_estimate(self, estimate: FitnessEstimate) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO fitness_estimates VALUES (?,?,?,?,?,?,?)",
                (
                    estimate.generation, estimate.index, estimate.strategy, estimate.item_count, estimate.total,
                    estimate.estimate, estimate.full_score,
                ),
            )

    def set_meta(self, **values: Any) -> None:
        """Record `RunMeta` fields, by field name."""
        stored = RunMeta.storage_keys(**values)
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in stored.items()]
            )

    def record_cost(self, phase: str, job: str, items: int, seconds: float) -> None:
        """One job of a phase other than the search (which its evaluations price): what it scored and took;
        a job run again after a kill replaces its row. `on_cost` (a progress bar) hears of it."""
        assert phase in PHASES[1:], phase
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO phase_costs VALUES (?,?,?,?,?)", (phase, job, items, seconds, time.time())
            )
        if self.on_cost is not None:
            self.on_cost(phase)

    def phase_costs(self) -> dict[str, PhaseCost]:
        """Items and seconds per phase (`PHASES`); the search's from its evaluations and item outcomes."""
        spent = self.items_spent()
        seconds = self._db.execute("SELECT COALESCE(SUM(merge_seconds + eval_seconds), 0) FROM evaluations").fetchone()[0]
        costs = {"search": PhaseCost(items=spent["candidates"] + spent["sources"], seconds=float(seconds))}
        rows = self._db.execute("SELECT phase, SUM(items), SUM(seconds) FROM phase_costs GROUP BY phase").fetchall()
        recorded = {phase: PhaseCost(items=int(items), seconds=float(secs)) for phase, items, secs in rows}
        return {**costs, **{phase: recorded.get(phase, PhaseCost(items=0, seconds=0.0)) for phase in PHASES[1:]}}

    def record_final_score(self, score: FinalScore) -> None:
        """The end of a run: one (model, eval set) scored; replaces a row of another identity."""
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO final_scores VALUES (?,?,?,?,?)",
                (score.model, score.eval_set, score.identity, json.dumps(score.scores), time.time()),
            )

    # -- reading --------------------------------------------------------------------------------
    def final_scores(self) -> list[FinalScore]:
        rows = self._db.execute(
            "SELECT model, eval_set, identity, scores FROM final_scores ORDER BY created"
        ).fetchall()
        return [FinalScore(row[0], row[1], row[2], json.loads(row[3])) for row in rows]

    def meta(self) -> RunMeta:
        return RunMeta.model_validate({k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")})

    def evaluations(self, generation: int | None = None) -> list[EvaluationRecord]:
        query = "SELECT * FROM evaluations"
        args: tuple[Any, ...] = ()
        if generation is not None:
            query += " WHERE generation = ?"
            args = (generation,)
        rows = self._db.execute(query + " ORDER BY generation, idx", args).fetchall()
        return [
            EvaluationRecord(
                generation=row[0], index=row[1], genotype=json.loads(row[2]), config=row[3],
                scores=json.loads(row[4]), score=row[5], objective=row[6], merge_seconds=row[7],
                eval_seconds=row[8], failure=row[9], digest=row[11],
            )
            for row in rows
        ]

    def generations(self) -> list[GenerationRecord]:
        rows = self._db.execute("SELECT * FROM generations ORDER BY generation").fetchall()
        return [
            GenerationRecord(
                generation=row[0], best_idx=row[1], best_score=row[2], mean_score=row[3],
                validation=json.loads(row[4]) if row[4] else None, seconds=row[5],
            )
            for row in rows
        ]

    def item_outcomes(self, candidate: str | None = None) -> dict[str, dict[str, dict[int, float]]]:
        """candidate -> task -> doc_id -> value, for one candidate or all."""
        query, args = "SELECT candidate, task, doc_id, value FROM item_outcomes", ()
        if candidate is not None:
            query, args = query + " WHERE candidate = ?", (candidate,)
        table: dict[str, dict[str, dict[int, float]]] = {}
        for key, task, doc, value in self._db.execute(query + " ORDER BY rowid", args):
            table.setdefault(key, {}).setdefault(task, {})[doc] = value
        return table

    def outcomes_of(self, model: str) -> dict[str, dict[int, float]]:
        """One model's item outcomes, task -> doc_id -> value (empty when it has none)."""
        return self.item_outcomes(model).get(model, {})

    def items_spent(self, evaluated_only: bool = False) -> dict[str, int]:
        """Item-evaluations recorded: on search candidates, and on sources (anchor selection). With
        `evaluated_only`, a candidate's count only once its evaluation is recorded: what a saving is
        priced against, while a generation is in progress."""
        evaluated = "generation || '/' || idx"  # candidate_key(generation, index), in SQL
        rows = self._db.execute(
            "SELECT candidate LIKE ?, COUNT(*) FROM item_outcomes WHERE candidate NOT LIKE ? AND "
            f"(NOT ? OR candidate LIKE ? OR candidate IN (SELECT {evaluated} FROM evaluations)) GROUP BY 1",
            (SOURCE_PREFIX + "%", FINAL_ITEMS_PREFIX + "%", evaluated_only, SOURCE_PREFIX + "%"),
        ).fetchall()
        counts = {bool(is_source): count for is_source, count in rows}
        return {"candidates": counts.get(False, 0), "sources": counts.get(True, 0)}

    def generation_items(self, generation: int) -> int:
        """Item-evaluations recorded on one generation's candidates."""
        pattern = candidate_key(generation, 0).rsplit("/", 1)[0] + "/%"
        return self._db.execute(
            "SELECT COUNT(*) FROM item_outcomes WHERE candidate LIKE ?", (pattern,)
        ).fetchone()[0]

    def estimates(self) -> dict[tuple[int, int], FitnessEstimate]:
        rows = self._db.execute("SELECT * FROM fitness_estimates ORDER BY generation, idx").fetchall()
        return {(row[0], row[1]): FitnessEstimate(*row) for row in rows}

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]

    def best(self, generation: int | None = None) -> EvaluationRecord | None:
        """The best successful evaluation scored on the whole fitness set (of one generation, or of
        all); ties go to the earliest.

        A candidate a strategy only estimated (cut from a race, scored on anchors) competes once its
        full-set score is known, with that score."""
        ranked = self.ranked(generation)
        return ranked[0] if ranked else None

    def ranked(self, generation: int | None = None) -> list[EvaluationRecord]:
        """The successful evaluations scored on the whole fitness set, best first (ties: earliest first),
        each with its full-set score (`best`'s rule)."""
        estimates = self.estimates()
        successful = []
        for record in self.evaluations(generation):
            known = estimates.get((record.generation, record.index))
            if record.failed or (known is not None and known.full_score is None):
                continue
            successful.append(record if known is None else replace(record, score=known.full_score))
        return sorted(successful, key=lambda r: -r.score)

