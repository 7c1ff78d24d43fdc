"""`merger pool design DESIGN.yaml`: merge where merging works, route where it does not.

Measure how much each pair of specialists loses merged (merger.design.plan), choose the partition into at
most K groups the measurement predicts best (merger.design.partitions), search a merge of each group of
two or more (a normal run directory each, resumed like any run), keep a group of one as its specialist,
write the pool file and train its router. Killed anywhere, the same command resumes: the pair exports,
the measurement's outcomes and every group's run are kept.

`merger pool compare DESIGN.yaml`: every partition's pool (untuned group merges) routed on the same
held-out items, measured against what the pairwise measurement predicted (merger.design.compare).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from merger.commands import positive_int
from merger.common.errors import MergerError
from merger.common.extras import require_extra

if TYPE_CHECKING:
    from merger.common.stopping import StopRequest
    from merger.design.partitions import Partition, Predicted
    from merger.design.plan import Measurement
    from merger.design.spec import PoolDesign
    from merger.recipe import Recipe
    from merger.router.pool import Pool


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _partition(text: str) -> Partition:
    """`add,rev/sort/date`: groups separated by `/`, the skills of a group by `,`."""
    return tuple(tuple(name for name in group.split(",") if name) for group in text.split("/") if group)


def _load(design_file: Path) -> tuple[PoolDesign, Recipe, Pool, dict[str, Path]]:
    """The design, its recipe, its template pool (which must name tasks) and the recipe's sources, checked."""
    from merger.design.spec import load_design
    from merger.recipe import load_recipe
    from merger.router.pool import load_pool
    from merger.sources.resolve import resolve_checked

    design = load_design(design_file)
    recipe = load_recipe(design.recipe)
    template = load_pool(design.pool)
    if template.tasks is None:
        raise MergerError(f"{design.pool}: the designed pool's router needs `tasks:` to learn from")
    source_paths, _ = resolve_checked(recipe)
    return design, recipe, template, source_paths


def _design(args: argparse.Namespace) -> int:
    require_extra("router", "merger pool design")
    from merger.common.stopping import StopRequest, StopRequested
    from merger.design import plan

    design, recipe, template, source_paths = _load(args.design)
    if args.members is not None:
        design = design.with_members(args.members)
    members = plan.check_design(design, recipe, source_paths)
    forced = _partition(args.partition) if args.partition else None
    if forced is not None:
        _check_partition(forced, list(design.skills), members)

    with StopRequest() as stop:  # SIGINT/SIGTERM: stop at the next lm-eval batch, keep what was done
        try:
            return _build(args, design, recipe, template, source_paths, members, forced, stop)
        except StopRequested:  # in the measurement, between the groups, or in the router's outcomes
            print("stopped (the pair exports, every outcome scored so far and every finished group's run are "
                  "kept). Run the same command again to resume.")
            return 0


def _compare(args: argparse.Namespace) -> int:
    require_extra("router", "merger pool compare")
    from merger.common.stopping import StopRequest, StopRequested
    from merger.design import compare, plan
    from merger.router.outcomes import build_outcome_table
    from merger.router.training import member_gib

    design, recipe, template, source_paths = _load(args.design)
    plan.check_design(design, recipe, source_paths)
    with StopRequest() as stop:
        try:
            pairs = plan.export_pairs(design, recipe, source_paths)
            stop.check()
            measured = build_outcome_table(plan.measurement_pool(design, recipe, template, source_paths, pairs), _progress)
            measurement = plan.measure(design, measured)
            predictions = plan.choose(measurement, len(design.skills))  # every partition, best predicted first
            print(_measurement_text(measurement))
            pool = compare.comparison_pool(design, template, compare.group_checkpoints(design, recipe, source_paths, predictions))
            stop.check()
            rows = compare.route_partitions(pool, predictions, args.splits, _progress, stop.check)
        except StopRequested:
            print("stopped (the exports and every outcome scored so far are kept). Run the same command again to resume.")
            return 0
    report = compare.compare_partitions(rows, predictions, member_gib(pool), pool.router.seed)
    path = compare.write_report(design, report)
    print(compare.format_partition_comparison(report))
    print(f"written to {path}")
    return 0


def _build(
    args: argparse.Namespace,
    design: PoolDesign,
    recipe: Recipe,
    template: Pool,
    source_paths: dict[str, Path],
    members: int,
    forced: Partition | None,
    stop: StopRequest,
) -> int:
    """Measure, choose, search each group, write and train the pool; each step resumable."""
    from merger.commands.run import execute, publish_once
    from merger.design import plan
    from merger.router.outcomes import build_outcome_table
    from merger.router.pool import load_pool
    from merger.rundir.layout import RunDir

    pairs = plan.export_pairs(design, recipe, source_paths)
    stop.check()
    table = build_outcome_table(plan.measurement_pool(design, recipe, template, source_paths, pairs), _progress)
    measurement = plan.measure(design, table)
    predictions = plan.choose(measurement, members)
    plan.write_design(design, measurement, predictions)
    print(_measurement_text(measurement))
    print(_partitions_text(predictions, forced))
    chosen = forced or predictions[0].partition

    published = {}
    for group in chosen:
        if len(group) < 2:
            continue
        group_recipe, run_dir = plan.group_recipe(design, recipe, group), plan.group_dir(design, group)
        _progress(f"group {'-'.join(group)}: searching its merge in {run_dir}")
        execute(group_recipe, run_dir, stop, progress=not args.no_progress, name="pool-design")
        if not RunDir(run_dir).summary.is_file():
            return 0  # stopped: `execute` said so; the same command resumes the group's run
        if design.publish is not None:  # once: a resumed design finds it published already
            published[group] = publish_once(plan.published_recipe(design, group_recipe, group), run_dir)
    stop.check()

    from merger.conductor.depth import depth_generation, workflow_key
    from merger.router.training import train_router

    pool_path = plan.designed_pool(design, design.pool, chosen, source_paths, published)
    pool = load_pool(pool_path)
    head = train_router(pool, _progress, workflow_key(depth_generation(pool)))
    print(f"designed pool: {pool_path} ({len(pool.members)} members: {', '.join(pool.names)}); router head "
          f"{head.num_parameters} parameters")
    print(f"next: merger router eval {pool_path}   # held-out accuracy, resident GiB, seconds per answer")
    print(f"      merger serve {pool_path}")
    return 0


def _check_partition(partition: Partition, skills: list[str], members: int) -> None:
    named = [skill for group in partition for skill in group]
    if sorted(named) != sorted(skills) or len(set(named)) != len(named):
        raise MergerError(f"--partition must name every skill once ({', '.join(skills)}), got {named}")
    if len(partition) > members:
        raise MergerError(f"--partition has {len(partition)} groups, more than the budget's {members}")


def _measurement_text(measurement: Measurement) -> str:
    skills = list(measurement.alone)
    lines = [f"pairwise measurement ({measurement.items} items a skill): each skill's loss merged with each partner"]
    lines.append("skill  alone  " + "  ".join(f"{name:>6s}" for name in skills))
    for skill in skills:
        cells = "  ".join(
            f"{measurement.loss[skill][other]:+6.3f}" if other != skill else f"{'':>6s}" for other in skills
        )
        lines.append(f"{skill:5s}  {measurement.alone[skill]:.3f}  {cells}")
    return "\n".join(lines)


def _partitions_text(predictions: list[Predicted], forced: Partition | None) -> str:
    lines = ["partitions, best predicted first (predicted: each skill's accuracy alone less its summed pairwise losses):"]
    built = set(map(frozenset, forced if forced is not None else predictions[0].partition))
    for rank, predicted in enumerate(predictions, 1):
        groups = " / ".join(",".join(group) for group in predicted.partition)
        chosen = built == set(map(frozenset, predicted.partition))
        lines.append(f"{rank:3d}. {groups:30s} predicted {predicted.accuracy:.3f}{'  <- built' if chosen else ''}")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    pool = subparsers.add_parser("pool", help="design a pool for a memory budget: merge where merging works")
    actions = pool.add_subparsers(dest="pool_command", required=True, metavar="ACTION")
    design = actions.add_parser("design", help="measure, partition, merge each group, write and train the pool")
    design.add_argument("design", type=Path, help="pool design YAML")
    design.add_argument("--members", type=positive_int, help="K resident models (instead of the design's budget)")
    design.add_argument("--partition", help="build this partition instead of the best predicted: add,rev/sort/date")
    design.add_argument("--no-progress", action="store_true", help="no progress bars")
    design.set_defaults(handler=_design)
    compared = actions.add_parser(
        "compare", help="every partition's pool routed on the same held-out items: measured against predicted"
    )
    compared.add_argument("design", type=Path, help="pool design YAML")
    compared.add_argument("--splits", type=positive_int, default=3, help="train/held-out splits (default 3)")
    compared.set_defaults(handler=_compare)
