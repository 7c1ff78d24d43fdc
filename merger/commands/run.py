"""`merger run RECIPE` and `merger status RUN_DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from merger.common.diskspace import full_disk_is_an_error
from merger.common.errors import MergerError


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="run (or resume) the merge search a recipe describes")
    run.add_argument("recipe", type=Path, help="recipe YAML")
    run.add_argument("--run-dir", type=Path, help="run directory (default: the recipe's output.run_dir)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(handler=run_command)

    status = subparsers.add_parser("status", help="the ledger of a run, also while it runs")
    status.add_argument("run_dir", type=Path)
    status.add_argument("--all", action="store_true", help="every evaluation, not only the last 20")
    status.set_defaults(handler=status_command)


class ProgressBar:
    def __init__(self, total: int | None, enabled: bool, done: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, unit="eval", disable=not enabled, dynamic_ncols=True)
        self.best = float("-inf")
        self.generation_scores: list[float] = []

    def __call__(self, info: dict[str, Any]) -> None:
        record = info.get("record")
        if record is not None:
            self.bar.update(1)
            self.generation_scores.append(record.score)
            self.best = max(self.best, record.score)
            mean = sum(self.generation_scores) / len(self.generation_scores)
            self.bar.set_postfix(gen=info["generation"], best=f"{self.best:.3f}", mean=f"{mean:.3f}")
        if info.get("closed"):
            self.generation_scores = []

    def close(self) -> None:
        self.bar.close()


def run_command(args: argparse.Namespace) -> int:
    from merger.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.run_dir is not None:
        recipe = recipe.model_copy(
            update={"output": recipe.output.model_copy(update={"run_dir": str(args.run_dir)})}
        )
    run_dir = Path(recipe.output.run_dir)
    with full_disk_is_an_error(f"running {args.recipe} in {run_dir}"):
        return execute(recipe, run_dir, progress=not args.no_progress)


def execute(recipe: Any, run_dir: Path, progress: bool = True) -> int:
    from merger.finish.final import finalist_table, finish_run, finished_summary, score_table
    from merger.finish.selection import selection_note
    from merger.rundir.layout import RunDir
    from merger.search.loop import StopRequest
    from merger.search.open import open_search

    search, resuming = open_search(recipe, run_dir)
    print(
        f"{'resuming' if resuming else 'starting'} run in {run_dir}: {search.genome.describe()}",
        file=sys.stderr,
    )
    bar = ProgressBar(recipe.optimizer.max_evaluations, progress, search.ledger.count())
    search.on_progress = bar
    try:
        with StopRequest() as stop:
            try:
                result = search.run(stop)
            finally:
                bar.close()
            if result.stopped_early:
                print(
                    f"stopped after {result.evaluations} evaluations (generation {result.generations}); "
                    f"best so far {result.best.score:.4f}. Run the same command again to resume.",
                )
                return 0
            summary = finished_summary(run_dir, result, recipe) or finish_run(search, result)
    finally:
        search.executor.close()
    print(score_table(summary))
    if summary.selection is not None:
        print(finalist_table(summary.selection))
        note = selection_note(summary.selection)
        if note:
            print(note)
    layout = RunDir(run_dir)
    print(f"winner: {layout.final}  config: {layout.best_config}  summary: {layout.summary}")
    if recipe.output.publish:
        publish_once(recipe, run_dir)
    return 0


def publish_once(recipe: Any, run_dir: Path) -> None:
    """Publish the winner unless this name already holds exactly these weights (a rerun of a finished run)."""
    from merger.registry import Registry, weights_digest
    from merger.rundir.layout import RunDir

    registry = Registry(Path(recipe.output.registry) if recipe.output.registry else None)
    entries = registry.entries(recipe.output.publish)
    digest = weights_digest(RunDir(run_dir).final) if entries else None  # publishing hashes the files itself
    for entry in entries:
        if entry.weights_sha256 == digest:
            print(f"already published as {entry.ref}")
            return
    print(f"published {registry.publish(run_dir, recipe.output.publish, recipe)}")


def status_command(args: argparse.Namespace) -> int:
    from merger.rundir.ledger import Ledger

    ledger = Ledger.open_existing(args.run_dir)
    if ledger is None:
        raise MergerError(f"{args.run_dir} is not a run directory (no ledger.sqlite)")
    print(status_text(ledger, show_all=args.all))
    return 0


def item_lines(ledger: Any, records: list[Any]) -> list[str]:
    """Item-evaluations spent, seconds per item and saved; each anchor check (estimate against the
    full-set score)."""
    from merger.scoring.items import item_accounting

    eval_seconds = sum(record.eval_seconds for record in records)
    lines = [item_accounting(ledger.items_spent(evaluated_only=True), len(records), ledger.meta().get("fitness_items"), eval_seconds)]
    for (generation, index), estimate in ledger.estimates().items():
        if estimate.strategy == "anchors" and estimate.full_score is not None:
            lines.append(
                f"anchor check, generation {generation} best (index {index}): estimate {estimate.estimate:.4f}, "
                f"full set {estimate.full_score:.4f} ({estimate.estimate - estimate.full_score:+.4f})"
            )
    return lines


def status_text(ledger: Any, show_all: bool = False) -> str:
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


def time_left_lines(ledger: Any, generations_done: int, state: Any, per_generation: float) -> list[str]:
    """The generations the run's budgets still pay for (the loop's own rule), and their time."""
    from merger.search.budget import Budget, generations_left

    meta = ledger.meta()
    if "popsize" not in meta:
        return []
    seconds = state.seconds if state is not None else None
    left = generations_left(Budget.from_meta(meta), ledger, generations_done, seconds, per_generation)
    if left is None:
        return []
    return [f"estimated time left: {left * per_generation:.0f} s ({left} generations)"]
