"""`merger run RECIPE`: open the run, search, finish, print the tables, publish."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merger.common.diskspace import full_disk_is_an_error
from merger.rundir.layout import RunDir

if TYPE_CHECKING:
    from merger.common.stopping import StopRequest
    from merger.recipe import Recipe
    from merger.rundir.ledger import Ledger
    from merger.rundir.summary import Summary
    from merger.tracking import RunTracker


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="run (or resume) the merge search a recipe describes")
    run.add_argument("recipe", type=Path, help="recipe YAML")
    run.add_argument("--run-dir", type=Path, help="run directory (default: the recipe's output.run_dir)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--member",
        metavar="NAME",
        help="export this finalist of the finished run's front (its finalists table) instead of the rule's winner",
    )
    run.set_defaults(handler=run_command)


class ProgressBar:
    """The whole run in item-evaluations, every phase (the ledger's `phase_costs`), against the most the
    run can score (`RunMeta.planned_items`); it ends at 100% (a race or a cache spends fewer)."""

    def __init__(self, ledger: Ledger, enabled: bool):
        from tqdm import tqdm

        self.ledger = ledger
        total = ledger.meta().planned_items
        self.bar = tqdm(total=total, initial=self._spent(), unit="item", disable=not enabled, dynamic_ncols=True)
        self.best = float("-inf")
        self.generation_scores: list[float] = []
        ledger.on_cost = self.refresh  # monitoring, selection and the final table report through the ledger

    def _spent(self) -> int:
        return sum(cost.items for cost in self.ledger.phase_costs().values())

    def refresh(self, phase: str | None = None) -> None:
        self.bar.n = self._spent()
        if phase is not None and phase != "monitoring":
            self.bar.set_postfix(phase=phase)
        self.bar.refresh()

    def __call__(self, info: dict[str, Any]) -> None:
        record = info.get("record")
        if record is not None:
            self.generation_scores.append(record.score)
            self.best = max(self.best, record.score)
            mean = sum(self.generation_scores) / len(self.generation_scores)
            self.bar.set_postfix(gen=info["generation"], best=f"{self.best:.3f}", mean=f"{mean:.3f}", refresh=False)
            self.refresh()
        if info.get("closed"):
            self.generation_scores = []

    def close(self, finished: bool) -> None:
        self.ledger.on_cost = None
        if finished:
            self.bar.total = self.bar.n = self._spent()
            self.bar.refresh()
        self.bar.close()


def run_command(args: argparse.Namespace) -> int:
    from merger.common.stopping import StopRequest

    with StopRequest() as stop:  # first: a signal while torch and lm-eval import asks for a stop too
        from merger.recipe import load_recipe

        recipe = load_recipe(args.recipe)
        if args.run_dir is not None:
            recipe = recipe.model_copy(
                update={"output": recipe.output.model_copy(update={"run_dir": str(args.run_dir)})}
            )
        run_dir = Path(recipe.output.run_dir)
        if args.member is not None:
            from merger.finish.front import check_member

            check_member(RunDir(run_dir), args.member)
        with full_disk_is_an_error(f"running {args.recipe} in {run_dir}"):
            return execute(
                recipe, run_dir, stop, progress=not args.no_progress, name=args.recipe.stem, member=args.member
            )


def execute(
    recipe: Recipe, run_dir: Path, stop: StopRequest, progress: bool = True, name: str = "merger",
    member: str | None = None,
) -> int:
    """Run or resume; a stop (`stop`: SIGINT/SIGTERM) anywhere, from the imports to the zoo build, loading,
    search and finish, checkpoints and exits 0; a second signal stops at once. `name`: the recipe's, the
    default tracking experiment; `member`: the front member to export instead of the rule's winner."""
    from merger.common.stopping import StopRequested
    from merger.finish.selection import selection_note
    from merger.rundir.render import cost_text, finalist_grid, score_grid, text_table

    tracker = None
    if recipe.tracking is not None:  # its store is checked before any weights load
        from merger.tracking import open_tracker

        tracker = open_tracker(recipe.tracking, recipe, run_dir, experiment=name)
    try:
        stop.check()
        summary = _search_and_finish(recipe, run_dir, stop, progress, tracker, member)
    except StopRequested:  # before the search began: importing, building the zoo or loading the sources
        print("stopped while opening the run (a zoo build resumes from its last step). Run the same "
              "command again to resume.")
        summary = None
    if summary is None:
        if tracker is not None:
            tracker.stopped()
        return 0
    print(text_table(score_grid(summary)))
    if summary.selection is not None:
        print(text_table(finalist_grid(summary.selection)))
        note = selection_note(summary.selection)
        if note:
            print(note)
    print(cost_text(summary.costs))
    layout = RunDir(run_dir)
    print(f"winner: {layout.final}  config: {layout.best_config}  summary: {layout.summary}")
    if tracker is not None:
        tracker.finish(summary)
        print(f"tracked: MLflow run {tracker.run_id} in {tracker.store.uri} ({tracker.seconds:.1f} s spent logging)")
    if recipe.output.publish:
        reference = publish_once(recipe, run_dir)
        if tracker is not None:
            tracker.published(reference)
    return 0


def _search_and_finish(
    recipe: Recipe, run_dir: Path, stop: StopRequest, progress: bool, tracker: RunTracker | None,
    member: str | None = None,
) -> Summary | None:
    """The finished run's summary, or None when a stop ended it (said on stdout)."""
    from merger.common.stopping import StopRequested
    from merger.finish.final import finish_run, finished_summary
    from merger.search.loop import Search
    from merger.search.open import open_run

    choice = None
    if recipe.chooses_method:
        from merger.finish.method_choice import adopt_choice, choose_method

        recipe, choice = choose_method(recipe, run_dir)
        print(choice.line(), file=sys.stderr)
    with open_run(recipe, run_dir) as run:
        if choice is not None:
            adopt_choice(run, choice)
        search = Search(run)
        print(
            f"{'resuming' if run.resuming else 'starting'} run in {run_dir}: {run.space.describe()}",
            file=sys.stderr,
        )
        bar = ProgressBar(run.ledger, progress)
        search.on_progress = bar
        if tracker is not None:
            tracker.start(run.ledger)
            tracker.search(run.ledger)  # a resumed run: what an earlier sitting scored and did not log

            def progressed(info: dict[str, Any]) -> None:
                bar(info)
                tracker.search(run.ledger)

            search.on_progress = progressed
        finished = False
        try:
            result = search.run(stop)
            if result.stopped_early:
                best = "none scored yet" if result.best is None else f"best so far {result.best.score:.4f}"
                print(
                    f"stopped after {result.evaluations} evaluations (generation {result.generations}); "
                    f"{best}. Run the same command again to resume.",
                )
                return None
            try:
                chosen = choice.summary() if choice is not None else None
                summary = finished_summary(run_dir, result, recipe, member) or finish_run(run, result, member, chosen)
            except StopRequested:
                print(
                    "stopped while finishing the run (the search is done; every final score so far is "
                    "kept). Run the same command again to resume."
                )
                return None
            finished = True
            return summary
        finally:
            bar.close(finished)


def publish_once(recipe: Recipe, run_dir: Path) -> str:
    """Publish the winner unless this name already holds exactly these weights (a rerun of a finished run);
    the registry reference either way."""
    from merger.registry import Registry, weights_digest

    registry = Registry(Path(recipe.output.registry) if recipe.output.registry else None)
    entries = registry.entries(recipe.output.publish)
    digest = weights_digest(RunDir(run_dir).final) if entries else None  # publishing hashes the files itself
    for entry in entries:
        if entry.weights_sha256 == digest:
            print(f"already published as {entry.ref}")
            return str(entry.ref)
    reference = registry.publish(run_dir, recipe.output.publish, recipe)
    print(f"published {reference}")
    return str(reference)
