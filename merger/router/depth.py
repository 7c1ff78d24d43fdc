"""Workflow depth: per item, did plan–execute–verify answer better than one call? Measured by the conductor
(`merger.conductor.depth`), stored here under the pool's work dir, and read back by training, which
learns the route's `confident` gate from it: the head's Worker role is the target wherever the longer
pipeline did not raise the item's correctness, the Thinker role (plan–execute–verify) where it did.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from merger.common.files import write_atomic
from merger.router.pool import ROLES, Pool, Role

DEPTH_FILE = "depth.json"
UNKNOWN_ROLE = -1  # an item without a depth outcome: no role target (the role loss skips it)


@dataclass(frozen=True)
class DepthOutcome:
    item_id: str
    task: str
    split: str  # "train" or "held_out" (the head's split)
    member: str  # who answered the single call
    single: float  # 1.0 when the single call's answer matched the gold answer
    pev: float  # the same for plan–execute–verify
    single_s: float  # seconds per answer
    pev_s: float
    pev_calls: int  # member calls the pipeline made (3, or 4 with a revision)


def depth_path(pool: Pool) -> Path:
    return pool.work_dir / DEPTH_FILE


def load_depth(pool: Pool, workflow_key: str | None = None) -> dict[str, DepthOutcome]:
    """The stored outcomes by item id; empty when there are none, or (given `workflow_key`) when they
    were measured with another workflow or pool."""
    path = depth_path(pool)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("members") != pool.names or (workflow_key is not None and data.get("workflow") != workflow_key):
        return {}
    return {row["item_id"]: DepthOutcome(**row) for row in data["outcomes"]}


def save_depth(pool: Pool, workflow_key: str, outcomes: dict[str, DepthOutcome]) -> None:
    data = {"members": pool.names, "workflow": workflow_key, "outcomes": [asdict(o) for o in outcomes.values()]}
    write_atomic(depth_path(pool), json.dumps(data, indent=1).encode())


def depth_role_targets(item_ids: list[str], outcomes: dict[str, DepthOutcome]) -> np.ndarray:
    """Per item: Thinker where plan–execute–verify was right and the single call wrong, Worker where it
    was not better, UNKNOWN_ROLE where the item has no depth outcome."""
    targets = np.full(len(item_ids), UNKNOWN_ROLE)
    for row, item_id in enumerate(item_ids):
        outcome = outcomes.get(item_id)
        if outcome is not None:
            better = outcome.pev > outcome.single
            targets[row] = ROLES.index(Role.THINKER if better else Role.WORKER)
    return targets
