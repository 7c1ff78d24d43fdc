"""Every partition's pool side by side on the same held-out items (`merger pool compare DESIGN.yaml`): does
the pairwise measurement rank the partitions the way routing over them does, and how far is the chosen
partition from a random or the worst one at the same K?

Every partition of the specialists (into 1 to all groups) is a pool: a group of one is its specialist, a
merged group the design's untuned merge (`measure_merge` over the base and the group, exported under
WORK_DIR/compare/members). No group is searched here: the comparison is of partitions, each merged the
same way, at the cost of one outcome table. That table scores every distinct group's model once on the
template pool's tasks (its held-out items). On each of `splits` train/held-out splits (the router
comparison's, merger.router.comparison) a router is trained over each partition's members only, so all
partitions are measured on the same held-out items: a partition's interval and two partitions' paired
difference are bootstraps over those items, the same resampled items for every row. A partition of one
group is that model alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from merger.common.files import write_atomic
from merger.design.partitions import Partition, Predicted, group_name
from merger.design.plan import export_untuned, resident_encoder, template_chat
from merger.design.spec import PoolDesign
from merger.recipe import Recipe
from merger.router.comparison import (
    MemberSubset,
    answer_seconds,
    bootstrap_draws,
    bootstrap_interval,
    check_splits,
    per_item_correct,
    row_key,
    run_split,
    short_names,
    task_accuracies,
)
from merger.router.embeddings import build_embedder
from merger.router.outcomes import OutcomeTable, build_outcome_table
from merger.router.pool import Member, Pool
from merger.router.rows import ROUTER_ROW
from merger.router.training import Progress, encoder_facts

COMPARE_DIR = "compare"


def partition_label(partition: Partition) -> str:
    return " / ".join(",".join(group) for group in partition)


def group_checkpoints(
    design: PoolDesign, recipe: Recipe, source_paths: dict[str, Path], predictions: list[Predicted]
) -> dict[tuple[str, ...], Path]:
    """Each distinct group's model: a specialist's own checkpoint, or the group's untuned merge."""
    groups = dict.fromkeys(group for predicted in predictions for group in predicted.partition)
    members = design.work_dir / COMPARE_DIR / "members"
    return {
        group: source_paths[group[0]]
        if len(group) == 1
        else export_untuned(design, recipe, source_paths, group, members / group_name(group))
        for group in groups
    }


def comparison_pool(design: PoolDesign, template: Pool, checkpoints: dict[tuple[str, ...], Path]) -> Pool:
    """Every group's model as a member of one pool over the template's tasks and router settings."""
    chat = template_chat(template)
    members = [Member(name=group_name(group), path=path, chat_template=chat) for group, path in checkpoints.items()]
    encoder = resident_encoder(template, [member.name for member in members])
    return Pool(
        members=members,
        tasks=template.tasks,
        router=template.router.model_copy(update={"encoder": encoder}),
        work_dir=design.work_dir / COMPARE_DIR,
        registry_root=template.registry_root,
    )


@dataclass
class PartitionRows:
    """Per partition, per split: each held-out item's correctness under the partition's router, and its
    seconds per answer (the chosen members' recorded seconds per item, plus embedding and choosing where
    the partition is routed)."""

    table: OutcomeTable
    held_out: list[np.ndarray]  # per split, the held-out rows
    correct: dict[str, list[np.ndarray]]  # partition label -> per split, 0/1 per held-out item
    seconds: dict[str, list[float]]  # partition label -> per split
    encoder: dict[str, Any]  # what routing adds (merger.router.training.encoder_facts)


def route_partitions(
    pool: Pool,
    predictions: list[Predicted],
    splits: int,
    progress: Progress | None = None,
    check: Callable[[], None] | None = None,
) -> PartitionRows:
    """The outcome table, then a router over each partition's members on each split; `check` after each
    split (a stop asked for raises there: a split trains a head for every partition)."""
    table = build_outcome_table(pool, progress)
    fraction = pool.router.holdout_fraction
    pairs = [table.split(fraction, pool.router.seed + number) for number in range(splits)]
    check_splits(table, pairs, fraction)
    embedder = build_embedder(pool)
    embeddings = embedder(table.prompts)
    columns = {name: index for index, name in enumerate(table.members)}
    routed = [p for p in predictions if len(p.partition) > 1]
    subsets = [
        MemberSubset(partition_label(p.partition), np.array([columns[group_name(g)] for g in p.partition]))
        for p in routed
    ]
    encoder = encoder_facts(pool, embedder.encoder_id, table.prompts)
    correct: dict[str, list[np.ndarray]] = {partition_label(p.partition): [] for p in predictions}
    seconds: dict[str, list[float]] = {label: [] for label in correct}
    for number, (train_rows, held_out_rows) in enumerate(pairs):
        settings = pool.router.model_copy(update={"seed": pool.router.seed + number})
        result = run_split(table, embeddings, train_rows, held_out_rows, embedder.encoder_id, settings, subsets)
        for predicted in predictions:
            label = partition_label(predicted.partition)
            row = group_name(predicted.partition[0]) if len(predicted.partition) == 1 else row_key(ROUTER_ROW, label)
            correct[label].append(per_item_correct(table, held_out_rows, result.choices[row]))
            seconds[label].append(answer_seconds(table, result, row, encoder["seconds"]))
        if progress is not None:
            progress(f"split {number + 1} of {splits}: {len(routed)} partitions routed, {len(held_out_rows)} held out")
        if check is not None:
            check()
    return PartitionRows(table, [held for _, held in pairs], correct, seconds, encoder)


def compare_partitions(
    rows: PartitionRows, predictions: list[Predicted], member_gib: dict[str, float | None], seed: int = 0
) -> dict[str, Any]:
    """Per partition: predicted and routed accuracy (its interval), each task's routed accuracy, resident
    GiB, and its paired difference from the best predicted partition with as many groups; and the rank
    correlation (Spearman) of predicted with routed accuracy over every partition and within each K."""
    draws = bootstrap_draws([len(held) for held in rows.held_out], seed)
    best_at: dict[int, str] = {}
    for predicted in predictions:  # best predicted first
        best_at.setdefault(len(predicted.partition), partition_label(predicted.partition))
    table = [
        _partition_row(rows, predicted, best_at[len(predicted.partition)], member_gib, draws)
        for predicted in predictions
    ]
    ks = sorted({row["groups"] for row in table})
    return {
        "items": len(rows.table.item_ids),
        "splits": len(rows.held_out),
        "held_out_items": [len(held) for held in rows.held_out],
        "partitions": table,
        "encoder": rows.encoder,
        "spearman": {
            "all": _spearman(table), **{str(k): _spearman([row for row in table if row["groups"] == k]) for k in ks}
        },
    }


def _partition_row(
    rows: PartitionRows, predicted: Predicted, best: str, member_gib: dict[str, float | None], draws: list[np.ndarray]
) -> dict[str, Any]:
    """One partition's row; `best`: the best predicted partition with as many groups, its paired reference."""
    label = partition_label(predicted.partition)
    per_split = rows.correct[label]
    differences = [mine - theirs for mine, theirs in zip(per_split, rows.correct[best], strict=True)]
    return {
        "partition": label,
        "groups": len(predicted.partition),
        "predicted": predicted.accuracy,
        "routed": float(np.mean([c.mean() for c in per_split])),
        "interval": list(bootstrap_interval(per_split, draws)),
        "tasks": task_accuracies(rows.table.tasks, per_split, rows.held_out),
        "resident_gib": sum(member_gib[group_name(group)] or 0.0 for group in predicted.partition),  # None: remote
        "seconds_per_answer": float(np.mean(rows.seconds[label])),
        "minus_best_predicted": [float(np.mean([d.mean() for d in differences])), *bootstrap_interval(differences, draws)],
        "best_predicted": best,
    }


def _spearman(table: list[dict[str, Any]]) -> float | None:
    """Spearman's rank correlation of predicted with routed accuracy; None below 3 rows or without spread."""
    from scipy.stats import spearmanr

    if len(table) < 3:
        return None
    value = spearmanr([row["predicted"] for row in table], [row["routed"] for row in table]).statistic
    return None if np.isnan(value) else float(value)


def write_report(design: PoolDesign, report: dict[str, Any]) -> Path:
    path = design.work_dir / COMPARE_DIR / "comparison.json"
    write_atomic(path, json.dumps(report, indent=1).encode())
    return path


def format_partition_comparison(report: dict[str, Any]) -> str:
    held = ", ".join(str(n) for n in report["held_out_items"])
    tasks = list(report["partitions"][0]["tasks"])
    labels = short_names(tasks)
    lines = [
        f"every partition routed on the same held-out items ({report['splits']} splits; held out {held} of "
        f"{report['items']}); per task routed; minus: the paired difference from the best predicted partition "
        "with as many groups",
        f"{'partition':28s} {'K':>2s} {'predicted':>9s} {'routed':>7s} {'95% interval':>15s} "
        + " ".join(f"{label[:6]:>6s}" for label in labels) + f" {'GiB':>5s} {'s/answer':>8s}  minus best predicted",
    ]
    for row in report["partitions"]:
        low, high = row["interval"]
        difference, d_low, d_high = row["minus_best_predicted"]
        minus = "(best predicted)" if row["partition"] == row["best_predicted"] else f"{difference:+.3f} [{d_low:+.3f}, {d_high:+.3f}]"
        per_task = " ".join(f"{row['tasks'][task]:6.3f}" for task in tasks)
        lines.append(
            f"{row['partition']:28s} {row['groups']:2d} {row['predicted']:9.3f} {row['routed']:7.3f} "
            f"[{low:.3f}, {high:.3f}] {per_task} {row['resident_gib']:5.2f} {row['seconds_per_answer']:8.4f}  {minus}"
        )
    spearman = report["spearman"]
    within = ", ".join(f"K={k} {v:+.2f}" for k, v in spearman.items() if k != "all" and v is not None)
    overall = "n/a" if spearman["all"] is None else f"{spearman['all']:+.2f}"
    lines.append(f"rank correlation (Spearman) of predicted with routed: {overall} over every partition" + (f"; {within}" if within else ""))
    encoder = report["encoder"]
    lines.append(
        f"GiB: the members' weights; s/answer: the chosen member's recorded seconds per item in the outcome "
        f"table; a routed partition adds {encoder['seconds']:.4f} s to embed one prompt ({encoder['id']}, "
        f"measured here) and the time to choose"
        + (f", and keeps its {encoder['gib']:.3f} GiB resident" if encoder.get("gib") else "")
    )
    return "\n".join(lines)
