"""`merger status RUN_DIR`: a run's ledger, also while it runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from merger.common.errors import MergerError
from merger.rundir.layout import RunDir

if TYPE_CHECKING:
    from merger.rundir.ledger import EvaluationRecord, Ledger
    from merger.search.state import SearchState


def register(subparsers: argparse._SubParsersAction) -> None:
    status = subparsers.add_parser("status", help="the ledger of a run, also while it runs")
    status.add_argument("run_dir", type=Path)
    status.add_argument("--all", action="store_true", help="every evaluation, not only the last 20")
    status.set_defaults(handler=status_command)


def status_command(args: argparse.Namespace) -> int:
    from merger.rundir.ledger import Ledger

    ledger = Ledger.open_existing(args.run_dir)
    if ledger is None:
        raise MergerError(f"{args.run_dir} is not a run directory (no ledger.sqlite)")
    print(status_text(ledger, show_all=args.all))
    return 0


def item_lines(ledger: Ledger, records: list[EvaluationRecord]) -> list[str]:
    """Item-evaluations spent, seconds per item and saved; each anchor check (estimate against the
    full-set score)."""
    from merger.scoring.items import item_accounting

    eval_seconds = sum(record.eval_seconds for record in records)
    spent = ledger.items_spent(evaluated_only=True)
    lines = [item_accounting(spent, len(records), ledger.meta().fitness_items, eval_seconds)]
    for (generation, index), estimate in ledger.estimates().items():
        if estimate.strategy == "anchors" and estimate.full_score is not None:
            lines.append(
                f"anchor check, generation {generation} best (index {index}): estimate {estimate.estimate:.4f}, "
                f"full set {estimate.full_score:.4f} ({estimate.estimate - estimate.full_score:+.4f})"
            )
    return lines


def status_text(ledger: Ledger, show_all: bool = False) -> str:
    from merger.search.state import load_state

    records = ledger.evaluations()
    generations = ledger.generations()
    lines = [f"{'gen':>4} {'idx':>4} {'score':>7} {'merge_s':>8} {'eval_s':>7}  failure"]
    for record in records if show_all else records[-20:]:
        lines.append(
            f"{record.generation:>4} {record.index:>4} {record.score:>7.4f} {record.merge_seconds:>8.2f} "
            f"{record.eval_seconds:>7.2f}  {record.failure or ''}"
        )
    best = ledger.best()
    state = load_state(ledger.path.parent)
    lines.append(f"evaluations: {len(records)}  generations closed: {len(generations)}")
    lines.extend(item_lines(ledger, records))
    lines.append(phase_line(ledger))
    if generations:
        per_generation = sum(g.seconds for g in generations) / len(generations)
        lines.append(f"seconds per generation: {per_generation:.1f}")
        lines.extend(time_left_lines(ledger, len(generations), state, per_generation))
        last = generations[-1]
        if last.validation:
            lines.append(f"validation of generation {last.generation}'s best: {last.validation}")
    if best is not None:
        lines.append(f"best: {best.score:.4f} (generation {best.generation}, index {best.index})")
    if state is not None and state.pending is not None:
        lines.append(f"generation {state.generation} in progress")
    return "\n".join(lines)


def time_left_lines(
    ledger: Ledger, generations_done: int, state: SearchState | None, per_generation: float
) -> list[str]:
    """The generations the run's budgets still pay for (the loop's own rule), and their time."""
    from merger.search.budget import Budget, end_items, generations_left

    meta = ledger.meta()
    if meta.popsize is None:
        return []
    seconds = state.seconds if state is not None else None
    left = generations_left(Budget.from_meta(meta), ledger, generations_done, seconds, per_generation)
    if left is None:
        return []
    lines = [f"estimated time left: {left * per_generation:.0f} s ({left} generations)"]
    end = end_items(meta)
    costs = ledger.phase_costs()
    search = costs["search"]
    if end is not None and search.items and not RunDir(ledger.path.parent).summary.is_file():
        spent = costs["selection"].items + costs["finals"].items
        left_items = max(0, end - spent)
        # the end scores validation and test items, priced like them where some were scored (a teacher-forced
        # fitness costs a fraction of a generated item)
        priced_by = next((phase for phase in ("selection", "finals", "monitoring") if costs[phase].items), "search")
        rate = costs[priced_by].seconds / costs[priced_by].items
        lines.append(
            f"then the end of the run: at most {left_items} items, about {left_items * rate:.0f} s at the "
            f"{priced_by} phase's seconds per item (selection races its finalists, so usually fewer)"
        )
    return lines



def phase_line(ledger: Ledger) -> str:
    """Each phase's items and seconds so far (the search's, the monitoring curve's, selection's, the final
    table's)."""
    from merger.rundir.render import cost_text

    return cost_text(ledger.phase_costs())
