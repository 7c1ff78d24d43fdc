"""Anchors: a few items that stand for the whole fitness set, and the full-set estimate from them.

Items are clustered (scikit-learn's k-means, weighted by each item's weight in the fitness score) by
their outcome vectors: one value per model already scored on every item (the sources, and the
warm-start grid when there is one). Each cluster's anchor is its item nearest the centroid and
carries the cluster's total weight, so a candidate's estimate is the weighted sum of its anchor values:
exact when every item of a cluster goes as its anchor does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from merger.errors import MergerError
from merger.items import Item, ItemSet, Values


@dataclass(frozen=True)
class Anchors:
    items: tuple[Item, ...]
    weights: tuple[float, ...]  # each anchor's cluster weight; they sum to 1

    def estimate(self, values: Values) -> float:
        return sum(w * values[task][doc] for (task, doc), w in zip(self.items, self.weights, strict=True))

    def to_json(self) -> list[list]:
        return [[task, doc, weight] for (task, doc), weight in zip(self.items, self.weights, strict=True)]

    @classmethod
    def from_json(cls, data: list[list]) -> Anchors:
        return cls(tuple((str(t), int(d)) for t, d, _ in data), tuple(float(w) for _, _, w in data))


def choose_anchors(item_set: ItemSet, outcomes: list[Values], count: int, seed: int) -> Anchors:
    """`count` anchors (fewer when the items have fewer distinct outcome vectors) from models' outcomes."""
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise MergerError("fitness.strategy anchors needs scikit-learn: pip install scikit-learn") from None

    matrix = np.array(
        [[values[task][doc] for values in outcomes] for task, doc in item_set.items], dtype=float
    )
    weights = np.array([item_set.weight(item) for item in item_set.items])
    clusters = min(count, len(np.unique(matrix, axis=0)))
    labels = (
        KMeans(n_clusters=clusters, random_state=seed, n_init=10).fit(matrix, sample_weight=weights).labels_
    )
    chosen, chosen_weights = [], []
    for label in range(clusters):
        members = np.flatnonzero(labels == label)
        if members.size == 0:
            continue
        centroid = np.average(matrix[members], axis=0, weights=weights[members])
        distances = np.linalg.norm(matrix[members] - centroid, axis=1)
        chosen.append(item_set.items[members[int(np.argmin(distances))]])
        chosen_weights.append(float(weights[members].sum()))
    order = sorted(range(len(chosen)), key=lambda i: item_set.items.index(chosen[i]))
    return Anchors(tuple(chosen[i] for i in order), tuple(chosen_weights[i] for i in order))
