"""`merger router train/eval` as functions: outcome table → embeddings → head (→ held-out report)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from merger.common.errors import MergerError
from merger.common.files import write_atomic
from merger.router.embeddings import build_embedder
from merger.router.evaluation import evaluate
from merger.router.head import RouterHead, train_head
from merger.router.outcomes import OutcomeTable, build_outcome_table
from merger.router.pool import Pool

Progress = Callable[[str], None]


def head_dir(pool: Pool) -> Path:
    return pool.work_dir / "head"


def _prepare(
    pool: Pool, progress: Progress | None
) -> tuple[OutcomeTable, np.ndarray, str, np.ndarray, np.ndarray]:
    table = build_outcome_table(pool, progress)
    embedder = build_embedder(pool)
    embeddings = embedder(table.prompts)
    train_rows, held_out_rows = table.split(pool.router.holdout_fraction, pool.router.seed)
    if len(train_rows) < 2 or len(held_out_rows) < 1:
        raise MergerError(
            f"{len(table.item_ids)} items are too few to split into train and held-out sets; raise tasks.limit"
        )
    return table, embeddings, embedder.encoder_id, train_rows, held_out_rows


def train_router(pool: Pool, progress: Progress | None = None) -> RouterHead:
    """Train the head on the training split of the outcome table and save it under the work dir."""
    table, embeddings, encoder_id, train_rows, held_out_rows = _prepare(pool, progress)
    head = train_head(
        embeddings[train_rows],
        table.correct[train_rows],
        table.members,
        encoder_id,
        pool.router,
        cost=None if table.cost is None else table.cost[train_rows],
        latency=table.latency[train_rows],
        progress=progress,
    )
    head.meta["held_out_items"] = [table.item_ids[i] for i in held_out_rows]
    head.meta["train_items"] = len(train_rows)
    head.save(head_dir(pool))
    return head


def load_head(pool: Pool) -> RouterHead:
    head = RouterHead.load(head_dir(pool))
    if head.members != pool.names:
        raise MergerError(
            f"the saved router head was trained for members {head.members}, the pool now has {pool.names}; "
            "run `merger router train` again"
        )
    return head


def evaluate_router(pool: Pool, progress: Progress | None = None) -> dict[str, Any]:
    head = load_head(pool)
    table, embeddings, encoder_id, train_rows, held_out_rows = _prepare(pool, progress)
    if encoder_id != head.encoder_id:
        raise MergerError(
            f"the head was trained on {head.encoder_id!r} embeddings, the pool uses {encoder_id!r}"
        )
    if head.meta.get("held_out_items") != [table.item_ids[i] for i in held_out_rows]:
        raise MergerError(
            "the held-out split changed since the head was trained; run `merger router train` again"
        )
    report = evaluate(head, table, embeddings, train_rows, held_out_rows, pool.router, progress)
    write_atomic(pool.work_dir / "eval.json", json.dumps(report, indent=2).encode())
    return report
