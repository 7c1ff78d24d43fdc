"""`genome.method: auto`: search the method of the best untuned merge, so the search starts where untuned
merging ends.

Before the search, each of the recipe's baselines whose method takes a weight per source is exported by
mergekit and scored on the fitness set, the search's own items (the validation set stays unseen for
selection); the best of them names the method, and its settings become the genome's fixed values (a
density range the recipe gives is searched instead), so that baseline is the search's warm start. The
scoring runs in a probe run directory inside the run's (RUN_DIR/method_probe, resumable like any run's
end); the choice, with every score and item it rests on, is kept in RUN_DIR/method_choice.json, handed
to the run's ledger (the end reuses those scores, it does not score them again) and the probe removed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from merger.common.errors import MergerError
from merger.common.files import write_atomic
from merger.finish.baselines import baseline_models
from merger.finish.scores import score_final
from merger.recipe import Recipe, recipe_to_yaml
from merger.recipe.baselines import BaselinePlan, plan_baselines
from merger.recipe.methods import METHODS
from merger.recipe.untuned import UNTUNED_MERGES
from merger.rundir.layout import RunDir
from merger.rundir.ledger import FinalScore, baseline_key, final_items_key
from merger.rundir.summary import MethodChosen
from merger.scoring.fitness import fitness_score
from merger.search.open import OpenRun, open_run

FITNESS = "fitness"


@dataclass
class ScoredBaseline:
    identity: str  # its mergekit YAML's identity (merger.finish.models.config_identity)
    scores: dict[str, float]  # fitness task -> score
    items: dict[str, dict[int, float]]  # fitness task -> doc -> value
    fitness: float  # the aggregate the search maximizes


@dataclass
class MethodChoice:
    baseline: str  # the untuned merge whose method is searched
    method: str
    scored: dict[str, ScoredBaseline]  # every baseline considered, in the recipe's order
    skipped: dict[str, str] = field(default_factory=dict)  # baseline: why it was not considered
    items: int = 0  # item-evaluations the choice cost
    seconds: float = 0.0

    def summary(self) -> MethodChosen:
        """The choice as summary.json keeps it."""
        fitness = {name: scored.fitness for name, scored in self.scored.items()}
        return MethodChosen(baseline=self.baseline, method=self.method, fitness=fitness, skipped=self.skipped)

    def line(self) -> str:
        """The choice in one line, with what it was chosen from."""
        others = ", ".join(f"{name} {scored.fitness:.3f}" for name, scored in self.scored.items())
        return (
            f"method auto: {self.method}, the method of {self.baseline}, the best untuned merge on the fitness "
            f"set ({others})"
        )


def considered(recipe: Recipe) -> tuple[list[str], dict[str, str]]:
    """The recipe's baselines whose method auto can search (a weight per source, a recipe that checks),
    and why each of the others is not."""
    names: list[str] = []
    skipped: dict[str, str] = {}
    for name in recipe.baseline_names:
        method = UNTUNED_MERGES[name].method
        if method is None:
            skipped[name] = "the searched method's own defaults: auto has none until it chooses"
            continue
        info = METHODS[method]
        if not info.searchable or "weight" not in info.source_parameters:
            skipped[name] = f"{method} has no weight per source to search"
            continue
        try:
            recipe.with_method(name)
        except ValidationError as error:
            skipped[name] = str(error.errors()[0]["msg"]).removeprefix("Value error, ")
            continue
        names.append(name)
    return names, skipped


def choose_method(recipe: Recipe, run_dir: Path) -> tuple[Recipe, MethodChoice]:
    """The recipe searching the chosen method, and the choice: read back from an earlier sitting, or made
    now by scoring the baselines on the fitness set."""
    layout = RunDir(run_dir)
    text = recipe_to_yaml(recipe)
    stored = layout.method_choice
    if stored.is_file():
        data = json.loads(stored.read_text())
        if data["recipe"] != text:
            raise MergerError(f"{run_dir} holds a run of a different recipe; give another --run-dir or remove it")
        choice = _from_json(data["choice"])
        return recipe.with_method(choice.baseline), choice
    if layout.recipe.is_file() or (run_dir.exists() and any(p != layout.method_probe for p in run_dir.iterdir())):
        raise MergerError(f"{run_dir} holds a run of a different recipe; give another --run-dir or remove it")
    names, skipped = considered(recipe)
    if not names:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        raise MergerError(f"method auto: no baseline of the recipe has a method it can search ({reasons})")
    probe_recipe = recipe.with_method(names[0]).model_copy(update={"baselines": []})
    with open_run(probe_recipe, layout.method_probe) as probe:
        choice = _score_and_choose(probe, recipe, names, skipped)
    write_atomic(stored, json.dumps({"recipe": text, "choice": asdict(choice)}, indent=1).encode())
    shutil.rmtree(layout.method_probe, ignore_errors=True)
    return recipe.with_method(choice.baseline), choice


def _score_and_choose(probe: OpenRun, recipe: Recipe, names: list[str], skipped: dict[str, str]) -> MethodChoice:
    plan = plan_baselines(recipe, probe.source_paths)  # a baseline that does not apply, or repeats one, is skipped
    skipped.update({name: why for name, why in plan.skipped.items() if name in names})
    considered_plan = BaselinePlan({name: config for name, config in plan.configs.items() if name in names}, {})
    models = baseline_models(probe.layout, considered_plan)
    if not models:
        raise MergerError("method auto: no baseline of the recipe applies to these sources")
    scores = score_final(probe, list(models.values()), [FITNESS])
    scored = {}
    for name, model in models.items():
        task_scores = scores[model.key][FITNESS]
        items = probe.ledger.outcomes_of(final_items_key(model.identity))
        scored[name] = ScoredBaseline(
            model.identity, task_scores, {task: items[task] for task in task_scores if task in items},
            fitness_score(task_scores, recipe.fitness),
        )
    best = max(scored, key=lambda name: scored[name].fitness)  # the first of equals, in the recipe's order
    cost = probe.ledger.phase_costs().get("finals")
    return MethodChoice(
        best, recipe.with_method(best).genome.method, scored, skipped,
        items=cost.items if cost else 0, seconds=cost.seconds if cost else 0.0,
    )


def adopt_choice(run: OpenRun, choice: MethodChoice) -> None:
    """The run's ledger takes the baselines' fitness scores and items (its end reuses them) and the
    choice's cost (as the end's: what scoring the baselines on the fitness set would have cost there)."""
    held = {(row.identity, row.eval_set) for row in run.ledger.final_scores()}
    for name, scored in choice.scored.items():
        if (scored.identity, FITNESS) in held:
            continue
        run.ledger.record_items(final_items_key(scored.identity), scored.items)
        run.ledger.record_final_score(FinalScore(baseline_key(name), FITNESS, scored.identity, scored.scores))
    run.ledger.record_cost("finals", "method auto: baselines on fitness", choice.items, choice.seconds)


def _from_json(data: dict[str, Any]) -> MethodChoice:
    scored = {
        name: ScoredBaseline(
            row["identity"], row["scores"],
            {task: {int(doc): value for doc, value in docs.items()} for task, docs in row["items"].items()},
            row["fitness"],
        )
        for name, row in data["scored"].items()
    }
    return MethodChoice(**{**data, "scored": scored})
