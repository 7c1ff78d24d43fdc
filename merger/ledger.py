"""The run's ledger: every evaluation and generation, in SQLite inside the run directory.

Each record is committed as soon as it exists, so a run killed at any moment keeps every finished
evaluation, and `merger status` can read the ledger (WAL mode) while the run writes it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LEDGER_FILE = "ledger.sqlite"

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

    @property
    def failed(self) -> bool:
        return self.failure is not None


@dataclass
class GenerationRecord:
    generation: int
    best_idx: int
    best_score: float
    mean_score: float
    validation: dict[str, float] | None
    seconds: float


class Ledger:
    def __init__(self, run_dir: Path):
        self.path = run_dir / LEDGER_FILE
        self._db = sqlite3.connect(self.path, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._add_digest_column()
        self._db.commit()

    def _add_digest_column(self) -> None:
        """Ledgers written before evaluations had a `digest` column get one (empty for old rows)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(evaluations)")}
        if "digest" not in columns:
            self._db.execute("ALTER TABLE evaluations ADD COLUMN digest TEXT")

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

    def set_meta(self, **values: Any) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in values.items()]
            )

    # -- reading --------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}

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

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]

    def best(self) -> EvaluationRecord | None:
        """The best successful evaluation; ties go to the earliest."""
        successful = [r for r in self.evaluations() if not r.failed]
        return max(successful, key=lambda r: r.score, default=None)


def record_as_dict(record: EvaluationRecord) -> dict[str, Any]:
    return asdict(record)
