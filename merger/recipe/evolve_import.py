"""A mergekit-evolve configuration as a merger recipe with the same search space.

The configuration is read with mergekit's own classes (`mergekit.evo.config.EvolMergeConfiguration`), so
it is accepted or refused exactly as mergekit-evolve would. Each field is mapped:

- genome.models / base_model -> sources (a base that is not among the models is added as a source);
  tokenizer_source -> tokenizer_source when it names one of them;
- merge_method -> genome.method; its parameters (weight, density, t) are searched;
- layer_granularity -> genome.layer_granularity (0, one group for the whole model, -> the layer count);
- normalize (unset: true for linear, ties and dare_ties, as mergekit-evolve does) and mergekit-evolve's
  int8_mask -> genome.options;
- allow_negative_weights -> the weight range: [-1, 1] with, [0, 1] without (mergekit-evolve takes |w|);
- filters that name one of merger's tensor classes (self_attn, mlp, norm, embed_tokens, lm_head) ->
  genome.tensor_classes;
- tasks (name, weight, metric), limit, num_fewshot, apply_chat_template -> fitness; shuffle -> a fixed
  random subset (subsample_seed);
- mergekit-evolve's starting point (each weight 1/n, density 1) -> optimizer.x0, and its CLI defaults
  (--max-fevals 100, --sigma0 1/6) -> the budget and sigma0.

What has no equivalent is collected in `Imported.unmapped` and reported by the command in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from merger.common.errors import MergerError, shown
from merger.common.schema import format_validation_error
from merger.common.yamlsafe import read_yaml_file
from merger.recipe.load import parse_recipe
from merger.recipe.methods import OPEN_BELOW, OPEN_BELOW_FLOOR, method_info
from merger.recipe.schema import TENSOR_CLASS_FILTERS, Recipe

EVOLVE_MAX_EVALUATIONS = 100  # mergekit-evolve --max-fevals default
EVOLVE_SIGMA0 = round(1 / 6, 4)  # mergekit-evolve --sigma0 default; its weights live on [0, 1] as ours do
SHUFFLE_SEED = 1  # mergekit-evolve shuffles unseeded; a recipe's item subset is fixed and reproducible
NORMALIZED_BY_DEFAULT = ("ties", "dare_ties", "linear")  # mergekit-evolve's default for `normalize: null`
EVOLVE_START = {"density": 1.0, "t": 0.5}  # mergekit-evolve's starting point besides each weight 1/n
_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Imported:
    recipe: dict[str, Any]
    unmapped: list[str] = field(default_factory=list)
    implied: list[str] = field(default_factory=list)  # settings the configuration implies: what and why


def read_evolve_config(path: Path) -> Any:
    """The configuration as mergekit-evolve validates it (its own pydantic classes)."""
    from mergekit.evo.config import EvolMergeConfiguration

    data = read_yaml_file(path, "mergekit-evolve configuration")
    if not isinstance(data, dict):
        raise MergerError(f"{path}: a mergekit-evolve configuration is a YAML mapping")
    try:
        return EvolMergeConfiguration.model_validate(data)
    except ValidationError as error:
        raise MergerError(format_validation_error(error, f"{path} (mergekit-evolve)")) from None


def _source_name(reference: Any, taken: set[str]) -> str:
    stem = _NAME_CHARACTERS.sub("-", Path(reference.model.path.rstrip("/")).name).strip("-.") or "model"
    name, suffix = stem[:60], 2
    while name in taken:
        name, suffix = f"{stem[:56]}-{suffix}", suffix + 1
    taken.add(name)
    return name


def _source_path(reference: Any, config_dir: Path) -> str:
    """A local directory as an absolute path (tried against the working directory, as mergekit-evolve
    does, then next to the configuration); anything else (a hub id) as written."""
    for root in (Path.cwd(), config_dir):
        candidate = root / reference.model.path
        if candidate.is_dir():
            return str(candidate.resolve())
    return reference.model.path


def _sources(genome: Any, config_dir: Path, unmapped: list[str]) -> tuple[list[dict[str, str]], dict[Any, str]]:
    references = list(genome.models)
    if genome.base_model is not None and genome.base_model not in references:
        references.append(genome.base_model)
    taken: set[str] = set()
    sources, names = [], {}
    for index, reference in enumerate(references):
        if reference.lora is not None:
            raise MergerError(
                f"genome.models.{index}: {shown(str(reference))} applies a LoRA adapter, which merger cannot "
                "load as a source; merge the adapter into a checkpoint and name that directory"
            )
        if reference.model.revision is not None:
            unmapped.append(f"revision @{reference.model.revision} of {reference.model.path} (the cached copy is used)")
        names[reference] = _source_name(reference, taken)
        sources.append({"name": names[reference], "path": _source_path(reference, config_dir)})
    return sources, names


def _layer_count(path: str, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise MergerError(
            f"layer_granularity 0 (one group for all layers) needs the layer count of {shown(path)}, whose "
            f"config is not available locally ({type(error).__name__}); give it with --num-layers"
        ) from None
    return int(config.num_hidden_layers)


def _tensor_classes(filters: list[str] | None, unmapped: list[str]) -> list[str]:
    classes = []
    for text in filters or []:
        matched = [name for name, parts in TENSOR_CLASS_FILTERS.items() if text in parts]
        if not matched:
            known = ", ".join(part for parts in TENSOR_CLASS_FILTERS.values() for part in parts)
            unmapped.append(f"filter {text!r} (merger's tensor classes split on {known})")
        elif matched[0] not in classes:
            classes.append(matched[0])
            extra = [part for part in TENSOR_CLASS_FILTERS[matched[0]] if part != text]
            if extra:
                unmapped.append(f"filter {text!r} alone (merger's {matched[0]} class also takes {', '.join(extra)})")
    return classes


def _genome(genome: Any, num_layers: int | None, unmapped: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the recipe's genome, its optimizer.x0)."""
    from mergekit.evo.genome import METHOD_PARAM_MAPS  # what mergekit-evolve searches for each method

    method = genome.merge_method
    info = method_info(method)
    parameters: dict[str, Any] = {}
    x0: dict[str, Any] = {}
    for name in METHOD_PARAM_MAPS[method]:
        if name == "weight":
            low, high = (-1.0 if genome.allow_negative_weights else 0.0), 1.0
            x0[name] = round(1 / len(genome.models), 6)
        else:
            # slerp: mergekit-evolve takes the two best-weighted models per group and t = softmax of their
            # weights (t <= 0.5 against the better one); t over all it can take against a fixed base spans
            # the same merges. density: mergekit-evolve clamps it to what it can take.
            low, high = info.parameters[name].limits
            if name in OPEN_BELOW:  # density 0 keeps nothing: not a value a recipe can name
                low = OPEN_BELOW_FLOOR
            x0[name] = EVOLVE_START[name]
        parameters[name] = {"min": low, "max": high}
    normalize = genome.normalize if genome.normalize is not None else method in NORMALIZED_BY_DEFAULT
    # mergekit-evolve's merge config sets both switches; the method keeps those it reads (slerp none)
    switches = {"normalize": normalize, "int8_mask": True}
    granularity = genome.layer_granularity
    if granularity < 1:
        if num_layers is None:
            raise MergerError("layer_granularity 0 needs the models' layer count; give it with --num-layers")
        granularity = num_layers
    if genome.smooth:
        unmapped.append("smooth: true (values are constant per layer group, not interpolated across layers)")
    result = {
        "method": method,
        "parameters": parameters,
        "options": {name: value for name, value in switches.items() if name in info.options},
        "layer_granularity": granularity,
        "tensor_classes": _tensor_classes(genome.filters, unmapped),
    }
    return result, x0


def _chat_template_note(config: Any) -> str | None:
    """Why the recipe applies a chat template, when it does (a base model without one cannot be scored so)."""
    if not config.apply_chat_template:
        return None
    why = (
        "the configuration sets it"
        if "apply_chat_template" in config.model_fields_set
        else "mergekit-evolve's default when the configuration leaves it out"
    )
    return (
        f"set fitness.apply_chat_template: true ({why}); "
        "sources without a chat template need apply_chat_template: false"
    )


def _fitness(config: Any, unmapped: list[str]) -> dict[str, Any]:
    tasks = []
    for index, task in enumerate(config.tasks):
        if task.weight <= 0:
            raise MergerError(
                f"tasks.{index}: weight {task.weight} of {shown(task.name)}: merger maximizes a weighted mean "
                "with positive weights; score a lower-is-better metric with a task that reports its negation"
            )
        tasks.append({"name": task.name, "weight": task.weight, "metric": task.metric})
    fitness: dict[str, Any] = {"tasks": tasks, "apply_chat_template": config.apply_chat_template}
    if config.limit is not None:
        fitness["limit"] = config.limit
    if config.num_fewshot is not None:
        fitness["num_fewshot"] = config.num_fewshot
    if config.shuffle:
        fitness["subsample_seed"] = SHUFFLE_SEED
    if config.apply_chat_template and not config.fewshot_as_multiturn:
        unmapped.append("fewshot_as_multiturn: false with a chat template (merger sends few-shot examples as turns)")
    return fitness


def import_evolve(
    path: Path,
    *,
    num_layers: int | None = None,
    task_paths: list[str] | None = None,
    trust_remote_code: bool = False,
) -> Imported:
    """The recipe (a plain dict, ready for YAML) and what of the configuration it could not express."""
    config = read_evolve_config(path)
    genome = config.genome
    unmapped: list[str] = []
    if genome.merge_method == "slerp" and len(genome.models) != 2:
        raise MergerError(
            f"genome.models: slerp over {len(genome.models)} models (mergekit-evolve picks two per layer "
            "group) has no equivalent; merger's slerp merges exactly two models"
        )
    if genome.merge_method == "slerp" and genome.base_model not in (None, *genome.models):
        raise MergerError("genome.base_model: slerp merges the two models; a third (the base) cannot take part")
    sources, names = _sources(genome, path.resolve().parent, unmapped)
    if genome.base_model is not None and genome.base_model in genome.models and genome.merge_method != "slerp":
        unmapped.append(f"the base model's own {genome.merge_method} values (merger searches the other models')")
    if genome.layer_granularity < 1 and num_layers is None:
        num_layers = _layer_count(sources[0]["path"], trust_remote_code)
    genome_section, x0 = _genome(genome, num_layers, unmapped)
    recipe: dict[str, Any] = {"sources": sources}
    if genome.base_model is not None:
        recipe["base_model"] = names[genome.base_model]
    elif genome.merge_method == "slerp":
        recipe["base_model"] = names[genome.models[0]]
    if genome.tokenizer_source is not None:
        named = [names[ref] for ref in names if str(ref) == genome.tokenizer_source]
        if named:
            recipe["tokenizer_source"] = named[0]
        else:
            unmapped.append(f"tokenizer_source {genome.tokenizer_source!r} (merger takes one of the sources)")
    if trust_remote_code:
        recipe["trust_remote_code"] = True
    recipe["genome"] = genome_section
    recipe["optimizer"] = {"sigma0": EVOLVE_SIGMA0, "max_evaluations": EVOLVE_MAX_EVALUATIONS, "x0": x0}
    if config.random_init:
        unmapped.append("random_init (merger starts at the centre of the ranges, the random start's mean)")
        del recipe["optimizer"]["x0"]
    recipe["fitness"] = _fitness(config, unmapped)
    chat_template = _chat_template_note(config)
    if task_paths:
        recipe["task_paths"] = task_paths
    recipe["output"] = {"run_dir": f"runs/{_NAME_CHARACTERS.sub('-', path.stem)}"}
    return Imported(recipe=recipe, unmapped=unmapped, implied=[chat_template] if chat_template else [])


def recipe_yaml(imported: Imported, origin: Path) -> str:
    header = [f"# Imported from the mergekit-evolve configuration {origin} by `merger import-evolve`."]
    if imported.implied:
        header.append("# Implied by the configuration: " + "; ".join(imported.implied))
    if imported.unmapped:
        header.append("# No equivalent in merger: " + "; ".join(imported.unmapped))
    return "\n".join(header) + "\n" + yaml.safe_dump(imported.recipe, sort_keys=False)


def validated(imported: Imported, origin: str) -> Recipe:
    """The imported recipe through merger's own validation."""
    return parse_recipe(imported.recipe, origin)
