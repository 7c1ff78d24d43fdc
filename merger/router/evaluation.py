"""Held-out evaluation of the router next to single members, the oracle, random choice and two
non-evolved heads on the same embeddings (per-member logistic regression, k nearest neighbours)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from merger.router.head import RouterHead, train_head
from merger.router.outcomes import OutcomeTable
from merger.router.pool import RouterSettings

KNN_NEIGHBOURS = 5
COST_PENALTY_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def accuracy_of_choices(correct: np.ndarray, choices: np.ndarray) -> float:
    return float(correct[np.arange(len(choices)), choices].mean())


def fit_logistic_regression(
    train_x: np.ndarray, train_correct: np.ndarray
) -> Callable[[np.ndarray], np.ndarray]:
    """One binary classifier per member (is it right on this prompt?); the fitted chooser picks the most
    probable member."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    train_features = scaler.transform(train_x)
    models: list[LogisticRegression | float] = []
    for member in range(train_correct.shape[1]):
        labels = (train_correct[:, member] >= 0.5).astype(int)
        if labels.min() == labels.max():
            models.append(float(labels[0]))
            continue
        models.append(LogisticRegression(C=1.0, max_iter=2000).fit(train_features, labels))
    # ties (e.g. constant members) go to the member best on the training items
    tie_break = 1e-6 * train_correct.mean(axis=0)

    def choose(test_x: np.ndarray) -> np.ndarray:
        features = scaler.transform(test_x)
        probabilities = np.zeros((len(test_x), len(models)))
        for member, model in enumerate(models):
            probabilities[:, member] = (
                model if isinstance(model, float) else model.predict_proba(features)[:, 1]
            )
        return (probabilities + tie_break).argmax(axis=1)

    return choose


def logistic_regression_choices(
    train_x: np.ndarray, train_correct: np.ndarray, test_x: np.ndarray
) -> np.ndarray:
    return fit_logistic_regression(train_x, train_correct)(test_x)


def knn_choices(train_x: np.ndarray, train_correct: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """The member most often right among the k most similar training prompts (cosine)."""
    k = min(KNN_NEIGHBOURS, len(train_x))
    similarity = test_x @ train_x.T
    neighbours = np.argsort(-similarity, axis=1)[:, :k]
    votes = train_correct[neighbours].mean(axis=1)
    return (votes + 1e-6 * train_correct.mean(axis=0)).argmax(axis=1)


def gap_closed(value: float, best_single: float, oracle: float) -> float | None:
    """(value - best single) / (oracle - best single); None when the oracle is no better."""
    return None if oracle - best_single <= 1e-12 else (value - best_single) / (oracle - best_single)


def evaluate(
    head: RouterHead,
    table: OutcomeTable,
    embeddings: np.ndarray,
    train_rows: np.ndarray,
    held_out_rows: np.ndarray,
    settings: RouterSettings,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Everything `merger router eval` reports, as plain data."""
    test_correct = table.correct[held_out_rows]
    train_correct = table.correct[train_rows]
    test_x, train_x = embeddings[held_out_rows], embeddings[train_rows]
    members = table.members

    per_member = {name: float(test_correct[:, i].mean()) for i, name in enumerate(members)}
    best_on_train = int(train_correct.mean(axis=0).argmax())
    best_on_held_out = max(per_member.values())
    oracle = float(test_correct.max(axis=1).mean())
    router_choices = head.choose(test_x)
    router = accuracy_of_choices(test_correct, router_choices)
    baselines = {
        "logistic_regression": accuracy_of_choices(
            test_correct, logistic_regression_choices(train_x, train_correct, test_x)
        ),
        "knn": accuracy_of_choices(test_correct, knn_choices(train_x, train_correct, test_x)),
    }
    report: dict[str, Any] = {
        "held_out_items": len(held_out_rows),
        "train_items": len(train_rows),
        "head_parameters": head.num_parameters,
        "router": router,
        "best_single": {
            "member": max(per_member, key=lambda name: per_member[name]),
            "accuracy": best_on_held_out,
        },
        "best_single_by_train": {
            "member": members[best_on_train],
            "accuracy": per_member[members[best_on_train]],
        },
        "oracle": oracle,
        "random": float(test_correct.mean()),
        "gap_closed": gap_closed(router, best_on_held_out, oracle),
        "per_member": per_member,
        "calls_per_member": {name: int((router_choices == i).sum()) for i, name in enumerate(members)},
        "baselines": {
            name: {"accuracy": value, "gap_closed": gap_closed(value, best_on_held_out, oracle)}
            for name, value in baselines.items()
        },
        "per_task": _per_task(table, held_out_rows, router_choices),
    }
    if table.cost is not None:
        report["cost_quality"] = cost_quality_curve(
            table, embeddings, train_rows, held_out_rows, head, settings, progress
        )
    return report


def _per_task(
    table: OutcomeTable, held_out_rows: np.ndarray, choices: np.ndarray
) -> dict[str, dict[str, float]]:
    tasks = np.array(table.tasks)[held_out_rows]
    correct = table.correct[held_out_rows]
    result = {}
    for task in sorted(set(tasks)):
        mask = tasks == task
        result[task] = {
            "router": accuracy_of_choices(correct[mask], choices[mask]),
            **{name: float(correct[mask, i].mean()) for i, name in enumerate(table.members)},
        }
    return result


def cost_quality_curve(
    table: OutcomeTable,
    embeddings: np.ndarray,
    train_rows: np.ndarray,
    held_out_rows: np.ndarray,
    head: RouterHead,
    settings: RouterSettings,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, float]]:
    """Retrain the head at increasing cost penalties (relative to the dearest member's cost per call)."""
    assert table.cost is not None
    scale = float(table.cost.max()) or 1.0
    points = []
    for relative in COST_PENALTY_GRID:
        tuned = settings.model_copy(update={"cost_penalty": relative / scale})
        candidate = train_head(
            embeddings[train_rows],
            table.correct[train_rows],
            table.members,
            head.encoder_id,
            tuned,
            cost=table.cost[train_rows],
            latency=table.latency[train_rows],
        )
        choices = candidate.choose(embeddings[held_out_rows])
        cost = table.cost[held_out_rows]
        points.append(
            {
                "cost_penalty": relative / scale,
                "accuracy": accuracy_of_choices(table.correct[held_out_rows], choices),
                "mean_cost": float(cost[np.arange(len(choices)), choices].mean()),
            }
        )
        if progress is not None:
            progress(f"cost penalty {relative / scale:.4g}: accuracy {points[-1]['accuracy']:.3f}")
    return points


def format_report(report: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    lines = [
        f"held-out items: {report['held_out_items']} (trained on {report['train_items']}); "
        f"head: {report['head_parameters']} parameters",
        f"{'router (sep-CMA-ES head)':32s} {pct(report['router']):>7s}   gap closed {pct(report['gap_closed'])}",
    ]
    for name, entry in report["baselines"].items():
        lines.append(f"{name:32s} {pct(entry['accuracy']):>7s}   gap closed {pct(entry['gap_closed'])}")
    best = report["best_single"]
    lines += [
        f"{'best single (' + best['member'] + ')':32s} {pct(best['accuracy']):>7s}",
        f"{'oracle':32s} {pct(report['oracle']):>7s}",
        f"{'random':32s} {pct(report['random']):>7s}",
        "members: " + ", ".join(f"{name} {pct(value)}" for name, value in report["per_member"].items()),
        "router calls per member: " + ", ".join(f"{n}={c}" for n, c in report["calls_per_member"].items()),
    ]
    for task, row in report["per_task"].items():
        lines.append(f"  {task}: " + ", ".join(f"{name} {pct(value)}" for name, value in row.items()))
    for point in report.get("cost_quality", []):
        lines.append(
            f"  cost penalty {point['cost_penalty']:.4g}: accuracy {pct(point['accuracy'])}, "
            f"mean cost {point['mean_cost']:.4g}"
        )
    return "\n".join(lines)
