"""Merge or route: every member alone, the router, logistic regression, k-NN and the oracle on the held-out
items of several train/held-out splits, with intervals, the members each must keep resident, and latency.

Accuracy is the mean over splits of each split's held-out accuracy. Its 95% interval is a bootstrap over
held-out items: each resample draws every split's held-out items with replacement (the same draws for
every row, so rows stay comparable) and averages the splits again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from merger.common.errors import MergerError
from merger.router.evaluation import KNN_NEIGHBOURS, fit_logistic_regression, gap_closed, knn_choices
from merger.router.head import train_head
from merger.router.outcomes import OutcomeTable
from merger.router.pool import RouterSettings

BOOTSTRAP_RESAMPLES = 1000
INTERVAL_LEVEL = 0.95
ROUTER_ROW = "router"
LOGISTIC_ROW = "logistic regression"
KNN_ROW = "k-NN"
ORACLE_ROW = "oracle"
ROUTED_ROWS = (ROUTER_ROW, LOGISTIC_ROW, KNN_ROW)
Progress = Callable[[str], None]


@dataclass
class SplitResult:
    """One split: the held-out rows, each row's chosen member per held-out item, and the seconds per item
    each row spends choosing (0 for a member alone and for the oracle, which is not a real policy)."""

    seed: int
    train_rows: np.ndarray
    held_out_rows: np.ndarray
    choices: dict[str, np.ndarray] = field(default_factory=dict)
    choose_seconds: dict[str, float] = field(default_factory=dict)
    head_parameters: int = 0


def check_splits(table: OutcomeTable, splits: list[tuple[np.ndarray, np.ndarray]], fraction: float) -> None:
    """Every split must train on some items and hold some out, or no row can be measured on it."""
    for number, (train_rows, held_out_rows) in enumerate(splits, start=1):
        if len(train_rows) == 0:
            raise MergerError(
                f"split {number} of {len(splits)} (held-out fraction {fraction:g} of {len(table.item_ids)} items)"
                f" leaves no training items for members {', '.join(table.members)}; lower --holdout or raise"
                " tasks.limit"
            )
        if len(held_out_rows) == 0:
            raise MergerError(
                f"split {number} of {len(splits)} holds out no items (held-out fraction {fraction:g} of"
                f" {len(table.item_ids)} items); raise --holdout or tasks.limit"
            )


def oracle_choices(correct: np.ndarray, preference: np.ndarray) -> np.ndarray:
    """Per item, the first member in `preference` order that is right (the first of all when none is)."""
    ordered = correct[:, preference] >= 0.5
    first_right = np.where(ordered.any(axis=1), ordered.argmax(axis=1), 0)
    return preference[first_right]


def _timed(choose: Callable[[], np.ndarray], items: int) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    choices = choose()
    return choices, (time.perf_counter() - started) / max(1, items)


def run_split(
    table: OutcomeTable,
    embeddings: np.ndarray,
    train_rows: np.ndarray,
    held_out_rows: np.ndarray,
    encoder_id: str,
    settings: RouterSettings,
) -> SplitResult:
    """Train the head and both non-evolved choosers on the training rows; record every row's choices."""
    train_x, test_x = embeddings[train_rows], embeddings[held_out_rows]
    train_correct = table.correct[train_rows]
    result = SplitResult(settings.seed, train_rows, held_out_rows)
    items = len(held_out_rows)
    for index, name in enumerate(table.members):
        result.choices[name] = np.full(items, index)
    head = train_head(
        train_x,
        train_correct,
        table.members,
        encoder_id,
        settings,
        cost=None if table.cost is None else table.cost[train_rows],
        latency=table.latency[train_rows],
    )
    result.head_parameters = head.num_parameters
    logistic = fit_logistic_regression(train_x, train_correct)
    routed = {
        ROUTER_ROW: lambda: head.choose(test_x),
        LOGISTIC_ROW: lambda: logistic(test_x),
        KNN_ROW: lambda: knn_choices(train_x, train_correct, test_x),
    }
    for name, choose in routed.items():
        result.choices[name], result.choose_seconds[name] = _timed(choose, items)
    preference = np.argsort(-train_correct.mean(axis=0), kind="stable")
    result.choices[ORACLE_ROW] = oracle_choices(table.correct[held_out_rows], preference)
    return result


def _per_item_correct(table: OutcomeTable, split: SplitResult, row: str) -> np.ndarray:
    choices = split.choices[row]
    return table.correct[split.held_out_rows, choices]


def bootstrap_interval(per_split_correct: list[np.ndarray], draws: list[np.ndarray]) -> tuple[float, float]:
    """Percentile interval of the mean over splits, resampling each split's held-out items by `draws`."""
    resampled = np.mean(
        [correct[draw].mean(axis=1) for correct, draw in zip(per_split_correct, draws, strict=True)], axis=0
    )
    tail = 100 * (1 - INTERVAL_LEVEL) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(low), float(high)


def summarize(
    table: OutcomeTable,
    splits: list[SplitResult],
    member_gib: dict[str, float | None],
    encoder: dict[str, Any],
    seed: int = 0,
) -> dict[str, Any]:
    """The table as plain data: per row accuracy, interval, resident members, seconds per answer; and the
    gap each routed row closes per split. `encoder` names what routing adds: `member` (a pool member whose
    hidden states embed the prompt) or `gib`, and `seconds` per prompt."""
    rng = np.random.default_rng(seed)
    draws = [
        rng.integers(0, len(split.held_out_rows), (BOOTSTRAP_RESAMPLES, len(split.held_out_rows)))
        for split in splits
    ]
    rows: dict[str, dict[str, Any]] = {}
    for name in [*table.members, *ROUTED_ROWS, ORACLE_ROW]:
        per_split = [_per_item_correct(table, split, name) for split in splits]
        accuracies = [float(correct.mean()) for correct in per_split]
        low, high = bootstrap_interval(per_split, draws)
        rows[name] = {
            "accuracy": float(np.mean(accuracies)),
            "interval": [low, high],
            "per_split": accuracies,
            **_resident(table, splits, name, member_gib, encoder),
            "seconds_per_answer": _seconds_per_answer(table, splits, name, encoder),
        }
    gap = _gap_rows(table, rows)
    return {
        "items": len(table.item_ids),
        "splits": [
            {
                "seed": split.seed,
                "train_items": len(split.train_rows),
                "held_out_items": len(split.held_out_rows),
            }
            for split in splits
        ],
        "head_parameters": max(split.head_parameters for split in splits),
        "knn_neighbours": KNN_NEIGHBOURS,
        "interval": f"{INTERVAL_LEVEL:.0%} interval: bootstrap over held-out items ({BOOTSTRAP_RESAMPLES} resamples)",
        "encoder": encoder,
        "rows": rows,
        "gap_closed": gap,
    }


def _resident(
    table: OutcomeTable,
    splits: list[SplitResult],
    row: str,
    member_gib: dict[str, float | None],
    encoder: dict[str, Any],
) -> dict[str, Any]:
    """The members the row answers with on some held-out item, plus what embeds its prompts."""
    used = sorted({int(index) for split in splits for index in np.unique(split.choices[row])})
    names = [table.members[index] for index in used]
    extra_gib = 0.0
    if row in ROUTED_ROWS:
        if encoder.get("member") and encoder["member"] not in names:
            names.append(encoder["member"])
        extra_gib = float(encoder.get("gib") or 0.0)
    sizes = [member_gib.get(name) for name in names]
    local = [size for size in sizes if size is not None]
    return {"resident": names, "resident_gib": float(sum(local)) + extra_gib}


def _seconds_per_answer(
    table: OutcomeTable, splits: list[SplitResult], row: str, encoder: dict[str, Any]
) -> float:
    """The chosen member's recorded seconds per item, plus (for routed rows) embedding and choosing."""
    per_split = []
    for split in splits:
        choices = split.choices[row]
        answer = table.latency[split.held_out_rows, choices].mean()
        routing = float(encoder["seconds"]) + split.choose_seconds[row] if row in ROUTED_ROWS else 0.0
        per_split.append(answer + routing)
    return float(np.mean(per_split))


def _gap_rows(table: OutcomeTable, rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    count = len(rows[ORACLE_ROW]["per_split"])
    best_single = [max(rows[name]["per_split"][k] for name in table.members) for k in range(count)]
    oracle = rows[ORACLE_ROW]["per_split"]
    gap: dict[str, dict[str, Any]] = {}
    for name in ROUTED_ROWS:
        per_split = [gap_closed(rows[name]["per_split"][k], best_single[k], oracle[k]) for k in range(count)]
        known = [value for value in per_split if value is not None]
        gap[name] = {"per_split": per_split, "mean": float(np.mean(known)) if known else None}
    return gap


def format_comparison(report: dict[str, Any]) -> str:
    def pct(value: float) -> str:
        return f"{100 * value:.1f}%"

    def ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    splits = report["splits"]
    labels = {
        ROUTER_ROW: f"router (sep-CMA-ES head, {report['head_parameters']:,} params)",
        LOGISTIC_ROW: "logistic regression",
        KNN_ROW: f"k-NN (k={report['knn_neighbours']})",
    }
    lines = [
        f"{len(splits)} train/held-out splits of {report['items']} items "
        f"(held out per split: {', '.join(str(s['held_out_items']) for s in splits)}); "
        f"accuracy: mean over splits; {report['interval']}",
        f"{'row':44s} {'accuracy':>8s}  {'95% interval':15s} {'resident GiB':>12s}  {'s/answer':>8s}  members resident",
    ]
    for name, row in report["rows"].items():
        low, high = row["interval"]
        lines.append(
            f"{labels.get(name, name):44s} {pct(row['accuracy']):>8s}  "
            f"{f'[{100 * low:.1f}, {100 * high:.1f}]':15s} {row['resident_gib']:12.3f}  "
            f"{row['seconds_per_answer']:8.4f}  {', '.join(row['resident'])}"
        )
    lines.append("gap closed, (row - best single) / (oracle - best single), per split and mean:")
    for name, gap in report["gap_closed"].items():
        per_split = " ".join(ratio(value) for value in gap["per_split"])
        lines.append(f"  {labels[name]:42s} {per_split}   mean {ratio(gap['mean'])}")
    encoder = report["encoder"]
    encoder_name = f"{encoder['member']}'s hidden states" if encoder.get("member") else encoder["id"]
    lines.append(
        f"s/answer: the member's recorded seconds per item in the outcome table; routed rows add "
        f"{encoder['seconds']:.4f} s to embed one prompt ({encoder_name}, measured here) and the time to choose"
    )
    return "\n".join(lines)
