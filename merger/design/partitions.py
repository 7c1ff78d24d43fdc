"""Choosing the groups from the pairwise measurement.

`loss[s][o]` is how much skill `s` loses (its specialist's accuracy less the merge's, on the skill's
items) when its specialist is merged with `o`'s alone. The prediction is additive: in a group, a skill
loses the sum of its pairwise losses against the others in the group, capped at its specialist's accuracy
(interference from several partners adds up; a skill cannot fall below zero), and a group of one loses
nothing (it is the specialist itself). A partition's predicted accuracy is the mean over skills of what
is left, and routing is assumed perfect between groups (the router's own error is measured afterwards).
Every partition into at most K groups is scored (15 for four specialists, 52 for five; beyond
MAX_EXHAUSTIVE specialists the search would be a heuristic, and is refused instead).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from merger.common.errors import MergerError

MAX_EXHAUSTIVE = 10  # Bell(10) = 115,975 partitions: scored in about a second
Partition = tuple[tuple[str, ...], ...]


def partitions(names: list[str], most: int) -> Iterator[Partition]:
    """Every partition of `names` into at most `most` groups, each group and the groups in `names`' order."""
    order = {name: i for i, name in enumerate(names)}
    for partition in _partitions(names, most):
        yield tuple(sorted(partition, key=lambda group: order[group[0]]))


def _partitions(names: list[str], most: int) -> Iterator[Partition]:
    if not names:
        yield ()
        return
    first, rest = names[0], names[1:]
    for smaller in _partitions(rest, most):
        for i in range(len(smaller)):  # `first` joins a group
            yield (*smaller[:i], (first, *smaller[i]), *smaller[i + 1:])
        if len(smaller) < most:  # or starts its own
            yield ((first,), *smaller)


@dataclass(frozen=True)
class Predicted:
    partition: Partition
    accuracy: float  # the mean over skills of the specialist's accuracy less its predicted loss
    skills: dict[str, float]  # each skill's predicted accuracy


def predict(partition: Partition, alone: Mapping[str, float], loss: Mapping[str, Mapping[str, float]]) -> Predicted:
    skills = {}
    for group in partition:
        for skill in group:
            lost = sum(loss[skill][other] for other in group if other != skill)
            skills[skill] = alone[skill] - min(max(lost, 0.0), alone[skill])
    return Predicted(partition, sum(skills.values()) / len(skills), skills)


def ranked(alone: Mapping[str, float], loss: Mapping[str, Mapping[str, float]], most: int) -> list[Predicted]:
    """Every partition into at most `most` groups, best predicted first (ties: fewer groups, then the order
    of enumeration)."""
    names = list(alone)
    if len(names) > MAX_EXHAUSTIVE:
        raise MergerError(
            f"pool design scores every partition, which is too many beyond {MAX_EXHAUSTIVE} specialists "
            f"(got {len(names)})"
        )
    scored = [predict(partition, alone, loss) for partition in partitions(names, most)]
    return sorted(scored, key=lambda p: (-p.accuracy, len(p.partition)))


def group_name(group: tuple[str, ...]) -> str:
    """A group's member name: its skills joined by `+` would not be a valid member name, so `-`."""
    return "-".join(group)
