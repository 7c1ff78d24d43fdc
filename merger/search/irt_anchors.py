"""Anchors from an item-response model (`fitness.anchors.method: irt`), next to the k-means anchors.

A Rasch model (girth's marginal maximum likelihood) is fitted on the outcomes of the models already
scored on every item (the sources, and the warm start when there is one): each item gets a difficulty,
each model an ability (expected a posteriori). The anchors are the items that together say the most
about ability where those models are: chosen one at a time, each the item that adds the most
sum-over-abilities of log(1 + Fisher information) to what the anchors chosen before already give (the
information of a Rasch item is P(1 - P) at an ability, the 1 being the N(0, 1) prior's). A candidate's
ability is then fitted on its anchor outcomes alone, and its estimate is its anchor outcomes plus the
model's probability of a right answer on every other item, each item at its weight in the fitness score.

Rasch rather than 2PL: a run calibrates on 3 to 10 models, too few to fit a discrimination per item
(girth's 2PL then puts most of them at its bounds); on two real ledgers a 2PL estimated 2 to 10 times
worse than Rasch (NOTES.md). Outcomes in [0, 1] count as right from 0.5 up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from merger.scoring.items import Item, ItemSet, Values

RIGHT_FROM = 0.5  # an outcome at or above this is a right answer to the model


@dataclass(frozen=True)
class IrtAnchors:
    items: tuple[Item, ...]  # the anchors, in the item set's order
    all_items: tuple[Item, ...]  # every fitness item, with its weight and difficulty below
    weights: tuple[float, ...]
    difficulties: tuple[float, ...]

    def ability(self, values: Values) -> float:
        """The ability fitted on the anchor outcomes (expected a posteriori, N(0, 1) prior)."""
        from girth import ability_eap  # girth imports in about a second: only where it is used

        answers = np.array([[right(values[task][doc])] for task, doc in self.items], dtype=int)
        difficulty = np.array([self.difficulties[self.all_items.index(item)] for item in self.items])
        return float(ability_eap(answers, difficulty, np.ones(len(self.items)))[0])

    def estimate(self, values: Values) -> float:
        """The anchors' outcomes, and the expected outcome at the fitted ability on every other item."""
        theta = self.ability(values)
        anchors = set(self.items)
        return sum(
            weight * (values[item[0]][item[1]] if item in anchors else float(expit(theta - difficulty)))
            for item, weight, difficulty in zip(self.all_items, self.weights, self.difficulties, strict=True)
        )

    def to_json(self) -> dict:
        return {
            "method": "irt",
            "anchors": [list(item) for item in self.items],
            "items": [
                [task, doc, weight, difficulty]
                for (task, doc), weight, difficulty in zip(
                    self.all_items, self.weights, self.difficulties, strict=True
                )
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> IrtAnchors:
        rows = data["items"]
        return cls(
            tuple((str(task), int(doc)) for task, doc in data["anchors"]),
            tuple((str(task), int(doc)) for task, doc, _, _ in rows),
            tuple(float(weight) for _, _, weight, _ in rows),
            tuple(float(difficulty) for _, _, _, difficulty in rows),
        )


def right(value: float) -> int:
    return int(value >= RIGHT_FROM)


def fit_rasch(answers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Item difficulties and model abilities from an items × models matrix of 0/1 answers."""
    from girth import ability_eap, rasch_mml

    difficulty = np.asarray(rasch_mml(answers, discrimination=1.0)["Difficulty"], dtype=float)
    return difficulty, np.asarray(ability_eap(answers, difficulty, np.ones(len(difficulty))), dtype=float)


def informative_items(difficulty: np.ndarray, abilities: np.ndarray, count: int, seed: int) -> list[int]:
    """`count` item indices, greedily the most informative at the given abilities (ties in a seeded order)."""
    probability = expit(abilities[None, :] - difficulty[:, None])
    information = probability * (1.0 - probability)  # items × abilities
    order = np.random.default_rng(seed).permutation(len(difficulty))
    gathered = np.zeros(len(abilities))
    chosen: list[int] = []
    for _ in range(min(count, len(difficulty))):
        gain = np.log1p(information[order] / (1.0 + gathered)).sum(axis=1)
        gain[np.isin(order, chosen)] = -np.inf
        best = int(order[int(np.argmax(gain))])
        chosen.append(best)
        gathered += information[best]
    return sorted(chosen)


def choose_irt_anchors(item_set: ItemSet, outcomes: list[Values], count: int, seed: int) -> IrtAnchors:
    """`count` anchors and the fitted difficulty of every item, from models' outcomes on every item."""
    answers = np.array(
        [[right(values[task][doc]) for values in outcomes] for task, doc in item_set.items], dtype=int
    )
    difficulty, abilities = fit_rasch(answers)
    chosen = informative_items(difficulty, abilities, count, seed)
    return IrtAnchors(
        tuple(item_set.items[i] for i in chosen),
        item_set.items,
        tuple(item_set.weight(item) for item in item_set.items),
        tuple(float(d) for d in difficulty),
    )
