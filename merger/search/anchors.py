"""Anchors: a few items that stand for the whole fitness set, and the full-set estimate from them.

Items are clustered (scikit-learn's k-means, weighted by each item's weight in the fitness score) by
their outcome vectors: one value per model already scored on every item (the sources, and the
warm-start candidates when there are some). The anchors are a stratified sample of the clusters: each
cluster gets anchors in proportion to its weight (at least one), its items nearest the centroid first
(ties in a seeded order), and they share the cluster's weight in proportion to their own. A candidate's
estimate is the weighted sum of its anchor values: exact when every item of a cluster goes as its
anchors do. Few models give few distinct outcome vectors (three sources give at most eight), so the
clusters are often fewer than the anchors asked for; the anchors left over then sample the large
clusters again instead of being dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from merger.common.errors import MergerError
from merger.scoring.items import Item, ItemSet, Values


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
    members_of = [np.flatnonzero(labels == label) for label in range(clusters)]
    members_of = [members for members in members_of if members.size]
    shares = allocate([float(weights[m].sum()) for m in members_of], [m.size for m in members_of], count)
    rng = np.random.default_rng(seed)
    chosen, chosen_weights = [], []
    for members, share in zip(members_of, shares, strict=True):
        centroid = np.average(matrix[members], axis=0, weights=weights[members])
        shuffled = rng.permutation(members)
        distances = np.linalg.norm(matrix[shuffled] - centroid, axis=1)
        picked = shuffled[np.argsort(distances, kind="stable")[:share]]
        cluster_weight = float(weights[members].sum())
        for index in picked:
            chosen.append(item_set.items[index])
            chosen_weights.append(cluster_weight * float(weights[index] / weights[picked].sum()))
    order = sorted(range(len(chosen)), key=lambda i: item_set.items.index(chosen[i]))
    return Anchors(tuple(chosen[i] for i in order), tuple(chosen_weights[i] for i in order))


def allocate(cluster_weights: list[float], sizes: list[int], count: int) -> list[int]:
    """Anchors per cluster: one each, then one at a time to the cluster with the most weight per anchor
    (proportional allocation; ties to the earlier cluster), never more than a cluster's items."""
    shares = [1] * len(cluster_weights)
    for _ in range(max(0, min(count, sum(sizes)) - len(shares))):
        open_clusters = [c for c in range(len(shares)) if shares[c] < sizes[c]]
        best = max(open_clusters, key=lambda c: (cluster_weights[c] / shares[c], -c))
        shares[best] += 1
    return shares
