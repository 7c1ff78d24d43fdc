"""How sure a score is: bootstrap over the items it was computed from.

Items are resampled within each task (a task keeps its size), so an aggregate over tasks (the weighted
mean, the worst task, the floor) is resampled as it is computed. Paired: two models scored on the same
items are resampled together, so their difference keeps what the items share. scipy's `bootstrap` does
not stratify by task, hence this small numpy version.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

ItemValues = Mapping[str, Mapping[int, float]]  # task -> doc id -> value
Aggregate = Callable[[Mapping[str, float]], float]  # task means -> one score
RESAMPLES = 2000
SEED = 0


def _aligned(models: list[ItemValues]) -> dict[str, np.ndarray]:
    """Per task, a (models x items) array over the items every model was scored on."""
    tasks = set.intersection(*(set(model) for model in models))
    arrays = {}
    for task in sorted(tasks):
        docs = sorted(set.intersection(*(set(model[task]) for model in models)))
        if docs:
            arrays[task] = np.array([[model[task][doc] for doc in docs] for model in models], dtype=float)
    return arrays


def _resampled(arrays: dict[str, np.ndarray], aggregate: Aggregate, resamples: int, seed: int) -> np.ndarray:
    """(resamples x models) aggregates of task means over items drawn with replacement within each task."""
    rng = np.random.default_rng(seed)
    draws = {task: rng.integers(0, array.shape[1], size=(resamples, array.shape[1])) for task, array in arrays.items()}
    models = next(iter(arrays.values())).shape[0]
    out = np.empty((resamples, models))
    for r in range(resamples):
        means = {task: array[:, draws[task][r]].mean(axis=1) for task, array in arrays.items()}
        for m in range(models):
            out[r, m] = aggregate({task: float(values[m]) for task, values in means.items()})
    return out


def standard_error(items: ItemValues, aggregate: Aggregate, resamples: int = 400, seed: int = SEED) -> float | None:
    """The bootstrap standard error of `aggregate` over these items; None without items."""
    arrays = _aligned([items])
    if not arrays:
        return None
    return float(_resampled(arrays, aggregate, resamples, seed)[:, 0].std(ddof=1))


def paired_difference(
    a: ItemValues, b: ItemValues, aggregate: Aggregate, resamples: int = RESAMPLES, seed: int = SEED,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """`aggregate(a) - aggregate(b)` on the items both were scored on, and its paired percentile bootstrap
    interval at `level`."""
    arrays = _aligned([a, b])
    if not arrays:
        raise ValueError("the two models share no scored item")
    point = aggregate({t: x[0].mean() for t, x in arrays.items()}) - aggregate({t: x[1].mean() for t, x in arrays.items()})
    samples = _resampled(arrays, aggregate, resamples, seed)
    differences = samples[:, 0] - samples[:, 1]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return float(point), float(low), float(high)
