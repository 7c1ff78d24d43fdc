"""Merge or route: every member alone, the router, logistic regression, k-NN and the oracle on the held-out
items of several train/held-out splits, with intervals, the members each must keep resident, and latency.

Accuracy is the mean over splits of each split's held-out accuracy. Its 95% interval is a bootstrap over
held-out items: each resample draws every split's held-out items with replacement (the same draws for
every row, so rows stay comparable) and averages the splits again.

When the pool holds merged models (a run's winner or baselines), the router and the oracle also get rows
restricted to member subsets (see `member_subsets`), trained and measured on the same splits.
"""

from __future__ import annotations

import os
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
from merger.router.rows import KNN_ROW, LOGISTIC_ROW, ORACLE_ROW, ROUTER_ROW

BOOTSTRAP_RESAMPLES = 1000
INTERVAL_LEVEL = 0.95
Progress = Callable[[str], None]


@dataclass
class SplitResult:
    """One split: the held-out rows, each row's chosen member per held-out item, the members each row may
    choose from, the seconds per item each routed row spends choosing (members alone and oracles have
    none: the oracle is not a real policy), and each router row's head size."""

    seed: int
    train_rows: np.ndarray
    held_out_rows: np.ndarray
    choices: dict[str, np.ndarray] = field(default_factory=dict)
    choosable: dict[str, np.ndarray] = field(default_factory=dict)
    choose_seconds: dict[str, float] = field(default_factory=dict)
    head_parameters: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class MemberSubset:
    """Members a row may choose from, named for the table: `specialists`, `specialists + winner`."""

    name: str
    columns: np.ndarray


SPECIALISTS = "specialists"


def member_subsets(members: list[str], merged: list[str]) -> list[MemberSubset]:
    """The subsets that get rows of their own. The specialists are every member that is not a merged model
    (the base included); the subsets are the specialists alone and the specialists plus each merged model,
    each kept when it has at least two members and is not the whole pool (which has its own rows)."""
    specialists = [index for index, name in enumerate(members) if name not in merged]
    merged_columns = [index for index, name in enumerate(members) if name in merged]
    if not merged_columns:
        return []
    candidates = [specialists] + [sorted([*specialists, column]) for column in merged_columns]
    subsets = []
    for columns in candidates:
        if 2 <= len(columns) < len(members):
            subsets.append(MemberSubset(scope_name(members, merged, columns), np.array(columns)))
    return subsets


def scope_name(members: list[str], merged: list[str], columns: list[int]) -> str:
    """`specialists`, `specialists + winner`, ... (just the merged names where no specialist is in it)."""
    chosen = [members[column] for column in columns]
    parts = [SPECIALISTS] if any(name not in merged for name in chosen) else []
    return " + ".join(parts + [name for name in chosen if name in merged])


def row_key(row: str, scope: str | None) -> str:
    """A row of the whole pool (`router`), or of a subset (`router [specialists]`)."""
    return row if not scope else f"{row} [{scope}]"


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
    subsets: list[MemberSubset] | None = None,
) -> SplitResult:
    """Train the head and both non-evolved choosers on the training rows, over each subset and the whole
    pool (the head on every subset, the others on the specialists only); record every row's choices."""
    result = SplitResult(settings.seed, train_rows, held_out_rows)
    for index, name in enumerate(table.members):
        result.choices[name] = np.full(len(held_out_rows), index)
        result.choosable[name] = np.array([index])
    whole_pool = MemberSubset("", np.arange(len(table.members)))
    scoped = list(subsets or [])
    for subset in [*scoped, whole_pool]:
        baselines = subset is whole_pool or subset.name == SPECIALISTS
        _route(table, embeddings, result, subset, encoder_id, settings, baselines)
    for subset in [*scoped, whole_pool]:
        train_correct = table.correct[np.ix_(train_rows, subset.columns)]
        preference = np.argsort(-train_correct.mean(axis=0), kind="stable")
        choices = oracle_choices(table.correct[np.ix_(held_out_rows, subset.columns)], preference)
        result.choices[row_key(ORACLE_ROW, subset.name)] = subset.columns[choices]
        result.choosable[row_key(ORACLE_ROW, subset.name)] = subset.columns
    return result


def _route(
    table: OutcomeTable,
    embeddings: np.ndarray,
    result: SplitResult,
    subset: MemberSubset,
    encoder_id: str,
    settings: RouterSettings,
    baselines: bool,
) -> None:
    """The head (and, with `baselines`, logistic regression and k-NN) trained on the subset's columns only,
    so they can choose no member outside it; choices are recorded as whole-pool member indices."""
    columns = subset.columns
    train_x, test_x = embeddings[result.train_rows], embeddings[result.held_out_rows]
    train_correct = table.correct[np.ix_(result.train_rows, columns)]
    head = train_head(
        train_x,
        train_correct,
        [table.members[column] for column in columns],
        encoder_id,
        settings,
        cost=None if table.cost is None else table.cost[np.ix_(result.train_rows, columns)],
        latency=table.latency[np.ix_(result.train_rows, columns)],
    )
    result.head_parameters[row_key(ROUTER_ROW, subset.name)] = head.num_parameters
    routed: dict[str, Callable[[], np.ndarray]] = {ROUTER_ROW: lambda: head.choose(test_x)}
    if baselines:
        logistic = fit_logistic_regression(train_x, train_correct)
        routed[LOGISTIC_ROW] = lambda: logistic(test_x)
        routed[KNN_ROW] = lambda: knn_choices(train_x, train_correct, test_x)
    for row, choose in routed.items():
        key = row_key(row, subset.name)
        choices, result.choose_seconds[key] = _timed(choose, len(result.held_out_rows))
        result.choices[key] = columns[choices]
        result.choosable[key] = columns


def per_item_correct(table: OutcomeTable, held_out_rows: np.ndarray, choices: np.ndarray) -> np.ndarray:
    """Each held-out item's correctness under `choices` (the member chosen per held-out item)."""
    return table.correct[held_out_rows, choices]


def bootstrap_draws(held_out_sizes: list[int], seed: int) -> list[np.ndarray]:
    """Per split, BOOTSTRAP_RESAMPLES resamples of its held-out items (indices, with replacement): the same
    draws for every row, so rows stay comparable and can be paired."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, size, (BOOTSTRAP_RESAMPLES, size)) for size in held_out_sizes]


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
    member_notes: dict[str, str] | None = None,
    merged: list[str] | None = None,
) -> dict[str, Any]:
    """The table as plain data: per row accuracy, interval, resident members, seconds per answer; and the
    gap each routed row closes per split. `encoder` names what routing adds: `member` (a pool member whose
    hidden states embed the prompt) or `gib`, and `seconds` per prompt. `member_notes` says what a member
    is (`merged winner`); `merged` names the merged members, which name the scope of each routed row."""
    draws = bootstrap_draws([len(split.held_out_rows) for split in splits], seed)
    rows: dict[str, dict[str, Any]] = {}
    for name in splits[0].choices:
        per_split = [per_item_correct(table, split.held_out_rows, split.choices[name]) for split in splits]
        accuracies = [float(correct.mean()) for correct in per_split]
        low, high = bootstrap_interval(per_split, draws)
        rows[name] = {
            "accuracy": float(np.mean(accuracies)),
            "interval": [low, high],
            "per_split": accuracies,
            "tasks": task_accuracies(table.tasks, per_split, [split.held_out_rows for split in splits]),
            **_describe(table, splits[0], name, member_notes or {}, merged or []),
            **_resident(table, splits, name, member_gib, encoder),
            "seconds_per_answer": _seconds_per_answer(table, splits, name, encoder),
        }
        if name in splits[0].head_parameters:
            rows[name]["head_parameters"] = max(split.head_parameters[name] for split in splits)
    gap = _gap_rows(table, rows, list(splits[0].choose_seconds))
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
        "head_parameters": rows[ROUTER_ROW]["head_parameters"],
        "knn_neighbours": KNN_NEIGHBOURS,
        "interval": f"{INTERVAL_LEVEL:.0%} interval: bootstrap over held-out items ({BOOTSTRAP_RESAMPLES} resamples)",
        "encoder": encoder,
        "rows": rows,
        "gap_closed": gap,
    }


def _describe(
    table: OutcomeTable, split: SplitResult, row: str, notes: dict[str, str], merged: list[str]
) -> dict[str, Any]:
    """What the row is: `kind` (member, router, logistic regression, k-NN, oracle), the members it may
    choose from, and for a choosing row its `scope` (`specialists + winner`; none without merged members)."""
    choosable = [table.members[column] for column in split.choosable[row]]
    if row in table.members:
        return {"kind": "member", "choosable": choosable, "note": notes.get(row)}
    kind = row.split(" [")[0]
    columns = [int(column) for column in split.choosable[row]]
    scope = scope_name(table.members, merged, columns) if merged else None
    return {"kind": kind, "choosable": choosable, "scope": scope}


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
    if row in splits[0].choose_seconds:
        if encoder.get("member") and encoder["member"] not in names:
            names.append(encoder["member"])
        extra_gib = float(encoder.get("gib") or 0.0)
    sizes = [member_gib.get(name) for name in names]
    local = [size for size in sizes if size is not None]
    return {"resident": names, "resident_gib": float(sum(local)) + extra_gib}


def _seconds_per_answer(
    table: OutcomeTable, splits: list[SplitResult], row: str, encoder: dict[str, Any]
) -> float:
    return float(np.mean([answer_seconds(table, split, row, float(encoder["seconds"])) for split in splits]))


def answer_seconds(table: OutcomeTable, split: SplitResult, row: str, embed_seconds: float) -> float:
    """One split's seconds per answer of a row: the chosen member's recorded seconds per item, plus (for a
    routed row) embedding the prompt and choosing."""
    answer = float(table.latency[split.held_out_rows, split.choices[row]].mean())
    routing = split.choose_seconds.get(row)
    return answer + (0.0 if routing is None else embed_seconds + routing)


def task_accuracies(tasks: list[str], per_split_correct: list[np.ndarray], held_out: list[np.ndarray]) -> dict[str, float]:
    """Each task's accuracy on the held-out items (the mean over splits); `tasks`: the table's task per row."""
    labels = np.array(tasks)
    return {
        task: float(np.mean([c[labels[rows] == task].mean() for c, rows in zip(per_split_correct, held_out, strict=True)]))
        for task in dict.fromkeys(tasks)
    }


def _gap_rows(
    table: OutcomeTable, rows: dict[str, dict[str, Any]], routed: list[str]
) -> dict[str, dict[str, Any]]:
    """Every routed row against the whole pool's best single member and oracle, so subset rows compare
    with the merged winner alone: below it, a row's gap closed is negative."""
    count = len(rows[ORACLE_ROW]["per_split"])
    best_single = [max(rows[name]["per_split"][k] for name in table.members) for k in range(count)]
    oracle = rows[ORACLE_ROW]["per_split"]
    gap: dict[str, dict[str, Any]] = {}
    for name in routed:
        per_split = [gap_closed(rows[name]["per_split"][k], best_single[k], oracle[k]) for k in range(count)]
        known = [value for value in per_split if value is not None]
        gap[name] = {"per_split": per_split, "mean": float(np.mean(known)) if known else None}
    return gap


def short_names(names: list[str]) -> list[str]:
    """Task names without the prefix and suffix they all share (`skills_add_test_tf` -> `add`)."""
    if len(names) < 2:
        return names
    head = len(os.path.commonprefix(names))
    tail = len(os.path.commonprefix([name[::-1] for name in names]))
    cut = [name[head:len(name) - tail] for name in names]
    return cut if all(cut) and len(set(cut)) == len(cut) else names


def row_label(name: str, row: dict[str, Any], knn_neighbours: int) -> str:
    """`winner (merged winner)`, `router over specialists (sep-CMA-ES head, 1,234 params)`, `k-NN (k=5)`."""
    if row["kind"] == "member":
        return f"{name} ({row['note']})" if row.get("note") else name
    scope = f" over {row['scope']}" if row.get("scope") else ""
    details = {
        ROUTER_ROW: f" (sep-CMA-ES head, {row.get('head_parameters', 0):,} params)",
        KNN_ROW: f" (k={knn_neighbours})",
    }
    return f"{row['kind']}{scope}{details.get(row['kind'], '')}"


def _task_lines(rows: dict[str, dict[str, Any]], labels: dict[str, str], width: int) -> list[str]:
    """Each row's accuracy per task (held out, mean over splits); none for a report without them."""
    tasks = list(next(iter(rows.values())).get("tasks") or {})
    if len(tasks) < 2:
        return []
    lines = [f"{'accuracy per task':{width}s} " + " ".join(f"{name[:8]:>8s}" for name in short_names(tasks))]
    for name, row in rows.items():
        lines.append(f"{labels[name]:{width}s} " + " ".join(f"{100 * row['tasks'][task]:7.1f}%" for task in tasks))
    return lines


def format_comparison(report: dict[str, Any]) -> str:
    def pct(value: float) -> str:
        return f"{100 * value:.1f}%"

    def ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    splits = report["splits"]
    labels = {name: row_label(name, row, report["knn_neighbours"]) for name, row in report["rows"].items()}
    width = max(44, *(len(label) for label in labels.values()))
    lines = [
        f"{len(splits)} train/held-out splits of {report['items']} items "
        f"(held out per split: {', '.join(str(s['held_out_items']) for s in splits)}); "
        f"accuracy: mean over splits; {report['interval']}",
        f"{'row':{width}s} {'accuracy':>8s}  {'95% interval':15s} {'resident GiB':>12s}  {'s/answer':>8s}  members resident",
    ]
    for name, row in report["rows"].items():
        low, high = row["interval"]
        lines.append(
            f"{labels[name]:{width}s} {pct(row['accuracy']):>8s}  "
            f"{f'[{100 * low:.1f}, {100 * high:.1f}]':15s} {row['resident_gib']:12.3f}  "
            f"{row['seconds_per_answer']:8.4f}  {', '.join(row['resident'])}"
        )
    lines.extend(_task_lines(report["rows"], labels, width))
    lines.append(
        "gap closed, (row - best single) / (oracle - best single), whole pool's best single and oracle, "
        "per split and mean:"
    )
    for name, gap in report["gap_closed"].items():
        per_split = " ".join(ratio(value) for value in gap["per_split"])
        lines.append(f"  {labels[name]:{width}s} {per_split}   mean {ratio(gap['mean'])}")
    encoder = report["encoder"]
    encoder_name = f"{encoder['member']}'s hidden states" if encoder.get("member") else encoder["id"]
    lines.append(
        f"s/answer: the member's recorded seconds per item in the outcome table; routed rows add "
        f"{encoder['seconds']:.4f} s to embed one prompt ({encoder_name}, measured here) and the time to choose"
    )
    if any(row.get("scope") for row in report["rows"].values()):
        lines.append(
            f"{SPECIALISTS}: every member that is not a merged model (a `run:` member, or `merged: true`)"
        )
    return "\n".join(lines)
