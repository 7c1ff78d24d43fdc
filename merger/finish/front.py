"""The trade-off between skills: the finalists no other finalist beats on every validation task.

With several validation tasks, one finalist can be best on the mean while giving up a task another keeps.
The front names every finalist not dominated (another at least as good on every task and better on
one), so a user can see which skills conflict and export a member other than the mean's best
(`merger run RECIPE --member NAME`). Only finalists scored on every validation item take part: one a
selection race dropped has its per-task scores on fewer items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from merger.common.errors import MergerError
from merger.rundir.layout import RunDir
from merger.rundir.summary import Finalist


def dominates(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """`a` at least as good as `b` on every task and better on one."""
    return all(a[task] >= b[task] for task in b) and any(a[task] > b[task] for task in b)


def pareto_front(rows: Sequence[Finalist]) -> list[str] | None:
    """The names of the finalists on the front, in the rows' order; None with fewer than two tasks."""
    scored = [row for row in rows if row.tasks is not None and row.dropped_after is None]
    if not scored or len(scored[0].tasks or {}) < 2:
        return None
    return [
        row.name
        for row in scored
        if not any(dominates(other.tasks, row.tasks) for other in scored if other is not row)  # type: ignore[arg-type]
    ]


def check_member(run_dir: RunDir, member: str) -> None:
    """Refuse, in one line and before any weights load, a `--member` that is not on the front of this
    finished run's finalists."""
    summary = run_dir.read_summary()
    if summary is None or summary.selection is None:
        raise MergerError(
            f"--member {member!r}: {run_dir.path} holds no finished run with a selection; run it to the end "
            "first, then choose a member of its front"
        )
    require_on_front(summary.selection.front, member)


def require_on_front(front: list[str] | None, member: str) -> None:
    if front is None:
        raise MergerError(
            f"--member {member!r}: the run's validation set has one task, so there is no trade-off between "
            "tasks to choose from; name several validation tasks in the recipe"
        )
    if member not in front:
        raise MergerError(f"--member {member!r} is not on the run's front; its front: {'; '.join(front)}")
