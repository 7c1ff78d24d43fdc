"""Reading lm-eval's results: the one rule for which metric a task reports and what each item scored.

A task's metric is the one its spec names (`acc`, or `acc,none` with the filter), or else the first metric
lm-eval reports for it; its key in the results is `metric,filter`. An item's value is that metric in the
item's logged sample under the same filter (a task with several filters logs each item once per filter).
A value that is not finite counts as 0. Fitness scoring and the router's outcome table both read results
this way, so a checkpoint's fitness score is the mean of its outcome rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from merger.common.errors import MergerError

NON_METRIC_KEYS = {"alias", "name", "sample_len", "sample_count", "samples"}
LoggedSample = dict[str, Any]


def metric_key(task_results: Mapping[str, Any], task: str, metric: str | None = None) -> str:
    """The `metric,filter` key of the task's results that `metric` names (the first reported if None)."""
    keys = [k for k in task_results if k not in NON_METRIC_KEYS and "_stderr" not in k and "," in k]
    if metric is None:
        if not keys:
            raise MergerError(f"task {task} reported no metric")
        return keys[0]
    for key in keys:
        if key == metric or key.split(",")[0] == metric:
            return key
    raise MergerError(
        f"task {task}: metric {metric!r} not reported; it has {', '.join(k.split(',')[0] for k in keys)}"
    )


def finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def task_score(output: Mapping[str, Any], task: str, metric: str | None = None) -> float:
    """The task's score as lm-eval aggregates it."""
    results = output["results"][task]
    return finite(float(results[metric_key(results, task, metric)]))


def scored_samples(
    output: Mapping[str, Any], task: str, metric: str | None = None
) -> list[tuple[LoggedSample, float]]:
    """Each logged sample of the task under the metric's filter, with the item's value (lm-eval run with
    `log_samples=True`)."""
    name, _, filter_name = metric_key(output["results"][task], task, metric).partition(",")
    scored = []
    for sample in output.get("samples", {}).get(task, []):
        if sample.get("filter", filter_name) != filter_name:
            continue
        if name not in sample:
            raise MergerError(f"task {task}: lm-eval's sample of doc {sample.get('doc_id')} has no {name!r}")
        scored.append((sample, finite(float(sample[name]))))
    return scored


def item_values(output: Mapping[str, Any], task: str, metric: str | None = None) -> dict[int, float]:
    """doc_id -> the item's value, for every logged item of the task."""
    return {int(sample["doc_id"]): value for sample, value in scored_samples(output, task, metric)}
