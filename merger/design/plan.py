"""A pool design's steps that are not a search: the checks, the pairwise measurement, each group's recipe
and the designed pool file (`merger pool design` runs the searches and trains the router between them).

The measurement: every pair of specialists merged untuned (`measure_merge`, one of the recipe's named
baselines, over the base and the pair) and scored, with each specialist alone, on both skills'
`measure` items through the router's outcome table (per item, cached per model and task under
WORK_DIR/measure, so a design resumed re-scores nothing). `limits.measure` items a skill: at 50 items a
0/1 accuracy's standard error is at most 7 points, enough to tell a pair that keeps both skills from one
that loses one (the losses that matter here are tens of points). The outcome table scores every member
on every skill's items, (pairs + specialists) × skills × limit: 2,000 for four specialists at 50.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from mergekit.config import MergeConfiguration

from merger.common.errors import MergerError
from merger.common.files import write_atomic
from merger.design.partitions import Partition, Predicted, group_name, ranked
from merger.design.spec import PoolDesign
from merger.recipe import Recipe
from merger.recipe.methods import NotApplicable
from merger.recipe.untuned import UNTUNED_MERGES
from merger.registry.names import validate_name
from merger.router.members import export_baseline
from merger.router.pool import EncoderSettings, Member, Pool, load_pool
from merger.router.training import checkpoint_gib

DESIGN_FILE = "design.json"  # the measurement and the partitions, as chosen
POOL_FILE = "pool.yaml"  # the designed pool: `merger serve WORK_DIR/pool.yaml`


def check_design(design: PoolDesign, recipe: Recipe, source_paths: dict[str, Path]) -> int:
    """One line for a design that cannot be built (before any weights load); returns K."""
    if recipe.base_model is None:
        raise MergerError(f"{design.recipe}: a pool design merges specialists over a base; the recipe names no base_model")
    for skill in design.skills:
        if skill not in recipe.source_names:
            raise MergerError(
                f"skills.{skill}: no source of {design.recipe} is named {skill!r}; each skill names its specialist "
                f"(sources: {', '.join(recipe.source_names)})"
            )
        if skill == recipe.base_model:
            raise MergerError(f"skills.{skill}: the base model is not a specialist")
    if design.measure_merge not in UNTUNED_MERGES or UNTUNED_MERGES[design.measure_merge].method is None:
        raise MergerError(f"measure_merge: {design.measure_merge!r} is not a named untuned merge of a fixed method")
    if design.publish is not None:
        try:  # the longest entry name it can publish: every skill in one group
            validate_name(entry_name(design, tuple(design.skills)))
        except MergerError as error:
            raise MergerError(f"publish: {error}") from None
    if design.members is not None:
        return design.members
    size = checkpoint_gib(source_paths[next(iter(design.skills))])
    members = int(design.memory_gib // size)  # type: ignore[operator]
    if members < 1:
        raise MergerError(f"memory_gib: {design.memory_gib} GiB is smaller than one member ({size:.2f} GiB)")
    return min(members, len(design.skills))


def with_sources(recipe: Recipe, names: list[str]) -> Recipe:
    """The recipe over the base and `names` only (the base first)."""
    chosen = [recipe.base_model, *names]
    return recipe.model_copy(update={"sources": [s for s in recipe.sources if s.name in chosen]})


def pair_name(first: str, second: str) -> str:
    return group_name((first, second))


def export_pairs(design: PoolDesign, recipe: Recipe, source_paths: dict[str, Path]) -> dict[tuple[str, str], Path]:
    """Every pair's untuned merge, exported once under WORK_DIR/measure/pairs (kept while its YAML is the
    same)."""
    skills = list(design.skills)
    exported = {}
    for i, first in enumerate(skills):
        for second in skills[i + 1:]:
            target = design.work_dir / "measure" / "pairs" / pair_name(first, second)
            exported[(first, second)] = export_untuned(design, recipe, source_paths, (first, second), target)
    return exported


def export_untuned(
    design: PoolDesign, recipe: Recipe, source_paths: dict[str, Path], group: tuple[str, ...], target: Path
) -> Path:
    """The group's untuned merge (`measure_merge` over the base and the group) exported into `target`, its
    YAML beside it (the router's export, kept while the YAML is the same)."""
    try:
        data = with_sources(recipe, list(group)).baseline_config(design.measure_merge, source_paths)
    except NotApplicable as reason:
        raise MergerError(f"measure_merge: {design.measure_merge} does not apply to {group_name(group)}: {reason}") from None
    config = MergeConfiguration.model_validate(data)
    config_file = target.with_suffix(".yaml")
    config_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(config_file, config.to_yaml().encode())
    return export_baseline(config_file, target, recipe.optimizer.seed, recipe.trust_remote_code)


def measurement_pool(
    design: PoolDesign,
    recipe: Recipe,
    template: Pool,
    source_paths: dict[str, Path],
    pairs: dict[tuple[str, str], Path],
) -> Pool:
    """The specialists and the pairs as members of a pool over the skills' `measure` tasks (found where the
    recipe's tasks are, else where the pool's are)."""
    assert template.tasks is not None
    chat = template_chat(template)
    members = [Member(name=skill, path=source_paths[skill], chat_template=chat) for skill in design.skills]
    members += [Member(name=pair_name(*pair), path=path, chat_template=chat) for pair, path in pairs.items()]
    include = Path(recipe.task_paths[0]) if recipe.task_paths else template.tasks.include_path
    tasks = template.tasks.model_copy(
        update={
            "names": [tasks.measure for tasks in design.skills.values()],
            "limit": design.limits.measure,
            "include_path": include,
        }
    )
    return Pool(members=members, tasks=tasks, work_dir=design.work_dir / "measure", registry_root=template.registry_root)


def template_chat(template: Pool) -> bool:
    """Whether the template's local members are prompted with their chat template (the first one's)."""
    return next((member.chat_template for member in template.members if member.is_local), True)


@dataclass
class Measurement:
    alone: dict[str, float]  # each specialist on its own skill's measure items
    loss: dict[str, dict[str, float]]  # skill -> partner -> the skill's loss merged with the partner
    items: int  # items scored per skill


def measure(design: PoolDesign, table: Any) -> Measurement:
    """From the outcome table (items × members): each specialist's accuracy on its skill, and each skill's
    loss in each pair."""
    tasks = list(table.tasks)
    skills = list(design.skills)

    def accuracy(member: str, skill: str) -> float:
        column = table.members.index(member)
        rows = [i for i, task in enumerate(tasks) if task == design.skills[skill].measure]
        return float(table.correct[rows, column].mean())

    alone = {skill: accuracy(skill, skill) for skill in skills}
    loss: dict[str, dict[str, float]] = {skill: {} for skill in skills}
    for i, first in enumerate(skills):
        for second in skills[i + 1:]:
            pair = pair_name(first, second)
            loss[first][second] = alone[first] - accuracy(pair, first)
            loss[second][first] = alone[second] - accuracy(pair, second)
    items = sum(task == design.skills[skills[0]].measure for task in tasks)
    return Measurement(alone, loss, items)


def choose(measurement: Measurement, members: int) -> list[Predicted]:
    """Every partition into at most `members` groups, best predicted first."""
    return ranked(measurement.alone, measurement.loss, members)


def group_recipe(design: PoolDesign, recipe: Recipe, group: tuple[str, ...]) -> Recipe:
    """The search of one group: the recipe over the base and the group's specialists, scored on the group's
    skills only (`limits` items a skill task), in its own run directory under WORK_DIR/groups."""
    data = json.loads(with_sources(recipe, list(group)).model_dump_json())

    def tasks(kind: str, metric: str | None) -> list[dict[str, Any]]:
        return [{"name": getattr(design.skills[skill], kind), "metric": metric} for skill in group]

    for kind in ("fitness", "validation", "test"):
        template = data.get(kind)
        if template is None:
            continue
        metric = template["tasks"][0].get("metric")
        data[kind] = {**template, "tasks": tasks(kind, metric), "limit": getattr(design.limits, kind)}
    data["output"] = {**data["output"], "run_dir": str(group_dir(design, group)), "publish": None}
    try:
        return Recipe.model_validate(data)
    except Exception as error:  # pydantic's ValidationError: the template does not fit a group
        raise MergerError(f"the recipe for group {group_name(group)} does not check: {error}") from None


def group_dir(design: PoolDesign, group: tuple[str, ...]) -> Path:
    return design.work_dir / "groups" / group_name(group)


def entry_name(design: PoolDesign, group: tuple[str, ...]) -> str:
    """The registry entry a merged group's winner is published as: PUBLISH-GROUP."""
    return f"{design.publish}-{group_name(group)}"


def published_recipe(design: PoolDesign, recipe: Recipe, group: tuple[str, ...]) -> Recipe:
    """A group's recipe as it publishes its winner (`merger.commands.run.publish_once` reads its output)."""
    registry = str(design.registry) if design.registry is not None else recipe.output.registry
    output = recipe.output.model_copy(update={"publish": entry_name(design, group), "registry": registry})
    return recipe.model_copy(update={"output": output})


def designed_pool(
    design: PoolDesign,
    template_path: Path,
    partition: Partition,
    source_paths: dict[str, Path],
    published: dict[tuple[str, ...], str] | None = None,
) -> Path:
    """WORK_DIR/pool.yaml: the template pool with one member per group (a group of one is its specialist's
    own checkpoint, a merged group its winner: the registry reference in `published`, else its run
    directory) and its router's files under WORK_DIR/router."""
    published = published or {}
    template = load_pool(template_path)
    data = yaml.safe_load(template_path.read_text())
    chat = template_chat(template)
    members = []
    for group in partition:
        if len(group) == 1:
            members.append({"name": group[0], "path": str(source_paths[group[0]]), "chat_template": chat})
        elif group in published:
            members.append({"name": group_name(group), "registry": published[group], "merged": True, "chat_template": chat})
        else:
            members.append({"name": group_name(group), "run": str(group_dir(design, group)), "chat_template": chat})
    data["members"] = members
    encoder = resident_encoder(template, [member["name"] for member in members])
    if encoder is not template.router.encoder:
        data["router"]["encoder"] = {**data["router"]["encoder"], "member": encoder.member}
    data["work_dir"] = str(design.work_dir / "router")
    data.pop("priority", None)
    if template.tasks is not None and template.tasks.include_path is not None:
        data["tasks"] = {**data["tasks"], "include_path": str(template.tasks.include_path)}
    if design.registry is not None and published:
        data["registry_root"] = str(design.registry)
    elif template.registry_root is not None:
        data["registry_root"] = str(template.registry_root)
    path = design.work_dir / POOL_FILE
    write_atomic(path, yaml.safe_dump(data, sort_keys=False).encode())
    return path


def resident_encoder(template: Pool, names: list[str]) -> EncoderSettings:
    """The template's encoder for a pool of `names`: a hidden-states encoder whose member is not among them
    reads the first of them instead (the template's member is not resident there)."""
    encoder = template.router.encoder
    if encoder.kind == "hidden_states" and encoder.member not in names:
        return encoder.model_copy(update={"member": names[0]})
    return encoder


def write_design(design: PoolDesign, measurement: Measurement, predictions: list[Predicted]) -> Path:
    """WORK_DIR/design.json: the measurement and every partition scored, the chosen first."""
    record = {
        "measurement": asdict(measurement),
        "partitions": [
            {"groups": [list(group) for group in p.partition], "predicted": p.accuracy, "skills": p.skills}
            for p in predictions
        ],
    }
    path = design.work_dir / DESIGN_FILE
    write_atomic(path, json.dumps(record, indent=1).encode())
    return path
