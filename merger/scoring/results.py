"""Reading lm-eval's results: the one rule for which metric a task reports and what each item scored.

A task's metric is the one its spec names (`acc`, or `acc,none` with the filter), or else the first metric
lm-eval reports for it; its key in the results is `metric,filter`. An item's value is that metric in the
item's logged sample under the same filter (a task with several filters logs each item once per filter).
A value that is not finite counts as 0. Fitness scoring and the router's outcome table both read results
this way, so a checkpoint's fitness score is the mean of its outcome rows.

Teacher-forced metrics are read here too. A `loglikelihood` task (the bundled `*_tf` twins) scores one
forward pass over the prompt and its gold answer + terminator; lm-eval logs per item `acc` (is_greedy: the
model's greedy tokens are exactly the gold continuation) and the continuation's log-likelihood (under
lm-eval's name `perplexity`). `acc` is lm-eval's own metric; `gold_prob` is merger's: exp(log-likelihood),
the probability the model gives the whole gold answer + terminator, a continuous value in [0, 1] (so racing
and anchors work on it) whose task score is the mean over items. The whole answer's probability, not the
per-token geometric mean: lm-eval does not report the token count, and a multi-token answer the model
gets nearly right still scores near 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from merger.common.errors import MergerError

NON_METRIC_KEYS = {"alias", "name", "sample_len", "sample_count", "samples"}
LoggedSample = dict[str, Any]
LOGLIKELIHOOD = "loglikelihood"


@dataclass(frozen=True)
class TeacherForced:
    """A per-item value derived from what a loglikelihood task logs."""

    logged: str  # lm-eval's per-item metric it is read from
    value: Callable[[float], float]


TEACHER_FORCED: dict[str, TeacherForced] = {"gold_prob": TeacherForced("perplexity", math.exp)}


def needs_loglikelihood(metric: str | None) -> bool:
    """Whether the metric reads a teacher-forced (loglikelihood) task: merger's `gold_prob`."""
    return metric in TEACHER_FORCED


def metric_refusal(task: str, metric: str | None, output_type: str, listed: list[str]) -> str | None:
    """Why `metric` cannot score `task` (of lm-eval `output_type`, whose metric_list names `listed`), or
    None when it can.

    `gold_prob` needs a loglikelihood task (one known answer); `acc` on a generating task that does not
    list it is the greedy match of its loglikelihood twin, which it does not report.
    """
    if needs_loglikelihood(metric) and output_type != LOGLIKELIHOOD:
        return (
            f"metric {metric} is teacher-forced and needs a task whose answer is one known text "
            f"(output_type: loglikelihood, e.g. a bundled *_tf task); task {task} is {output_type}"
        )
    if metric == "acc" and output_type == "generate_until" and "acc" not in listed:
        return (
            f"metric acc (greedy match) needs a loglikelihood task; task {task} generates its answer "
            "(use its teacher-forced twin, e.g. NAME_tf, or exact_match)"
        )
    return None


def metric_key(task_results: Mapping[str, Any], task: str, metric: str | None = None) -> str:
    """The `metric,filter` key of the task's results that `metric` names (the first reported if None)."""
    keys = [k for k in task_results if k not in NON_METRIC_KEYS and "_stderr" not in k and "," in k]
    metric = TEACHER_FORCED[metric].logged if needs_loglikelihood(metric) else metric
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
    """The task's score as lm-eval aggregates it; a teacher-forced metric's is the mean of its items."""
    if needs_loglikelihood(metric):
        values = [value for _, value in scored_samples(output, task, metric)]
        if not values:
            raise MergerError(f"task {task}: metric {metric} needs lm-eval's logged samples; none came back")
        return sum(values) / len(values)
    results = output["results"][task]
    return finite(float(results[metric_key(results, task, metric)]))


def scored_samples(
    output: Mapping[str, Any], task: str, metric: str | None = None
) -> list[tuple[LoggedSample, float]]:
    """Each logged sample of the task under the metric's filter, with the item's value (lm-eval run with
    `log_samples=True`)."""
    name, _, filter_name = metric_key(output["results"][task], task, metric).partition(",")
    value = TEACHER_FORCED[metric].value if needs_loglikelihood(metric) else float
    scored = []
    for sample in output.get("samples", {}).get(task, []):
        if sample.get("filter", filter_name) != filter_name:
            continue
        if name not in sample:
            raise MergerError(f"task {task}: lm-eval's sample of doc {sample.get('doc_id')} has no {name!r}")
        scored.append((sample, finite(value(float(sample[name])))))
    return scored


def item_values(output: Mapping[str, Any], task: str, metric: str | None = None) -> dict[int, float]:
    """doc_id -> the item's value, for every logged item of the task."""
    return {int(sample["doc_id"]): value for sample, value in scored_samples(output, task, metric)}
