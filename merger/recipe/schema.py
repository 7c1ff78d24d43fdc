"""The recipe's typed schema: every block of a recipe YAML, checked for shape (fields, types, values each
merge method can take, sources against the method's input contract) before anything is loaded.

Checks against the world (sources exist and are mergeable, tasks exist, the layer granularity fits the
model) come later, when a run opens its sources and tasks. Loading a file is `merger.recipe.load`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from merger.common.errors import MergerError
from merger.common.schema import StrictModel
from merger.recipe.methods import METHODS, NotApplicable, ParameterInfo, searchable_method, untuned_config
from merger.recipe.untuned import DEFAULT_BASELINES, EVERY, UNTUNED_MERGES, unknown_baseline

# Tensor classes a genome can give their own values, as mergekit filters (substring of the tensor
# name, first match wins, so attention comes before norms to keep q_norm/k_norm with attention).
TENSOR_CLASS_FILTERS: dict[str, tuple[str, ...]] = {
    "attention": ("self_attn",),
    "mlp": ("mlp",),
    "embeddings": ("embed_tokens", "lm_head"),
    "norms": ("norm",),
}
TensorClass = Literal["attention", "mlp", "embeddings", "norms"]


class Source(StrictModel):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    path: str


class SearchRange(StrictModel):
    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> SearchRange:
        if self.min >= self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        return self


ParameterSetting = float | SearchRange

PASSTHROUGH = "passthrough"  # the method of a layer-path genome (mergekit's passthrough)
# `genome.method: auto`: the run searches the method of its best untuned merge on the fitness set
# (merger.finish.method_choice), among the baselines whose method takes a weight per source
AUTO_METHOD = "auto"
AUTO_PARAMETERS = ("weight", "density")  # what an auto genome may set: the weight family's common parameters
AUTO_WEIGHT = SearchRange(min=0.0, max=1.0)  # an auto genome's weight range unless it gives one
SCALE_RANGE = (0.0, 4.0)  # bounds a layer path's searched scales must lie in


class LayerPathSpec(StrictModel):
    """`genome.space: layer_path`: which source layers a token passes through, in which order (DFS).

    T = layers x sources x repeats slots in a fixed order (every layer of the first source, then of the
    second, ..., the whole sequence `repeats` times); each slot is in the path or out of it.
    """

    repeats: Annotated[int, Field(ge=1)] = 1
    scales: Literal["per_slot", "none"] = "none"
    scale_range: SearchRange = SearchRange(min=0.5, max=1.5)
    anchor: str | None = None  # embeddings, final norm, lm_head; default: base_model, else the first source
    fix_ends: bool = False  # the path always starts with the anchor's first layer and ends with its last
    min_layers: Annotated[int, Field(ge=1)] = 1
    max_layers: Annotated[int, Field(ge=1)] | None = None
    start: Literal["anchor", "center"] = "anchor"  # x0: the anchor's own layers, or every indicator at 0.5

    @model_validator(mode="after")
    def _consistent(self) -> LayerPathSpec:
        if self.max_layers is not None and self.max_layers < self.min_layers:
            raise ValueError(f"max_layers ({self.max_layers}) is below min_layers ({self.min_layers})")
        low, high = SCALE_RANGE
        if not low <= self.scale_range.min < self.scale_range.max <= high:
            bounds = f"[{self.scale_range.min}, {self.scale_range.max}]"
            raise ValueError(f"scale_range {bounds} is outside [{low}, {high}]")
        if self.fix_ends and self.max_layers is not None and self.max_layers < 2:
            raise ValueError(f"max_layers ({self.max_layers}) leaves no room for fix_ends' two layers")
        return self


def _outside_limits(parameter: ParameterInfo, setting: ParameterSetting) -> str | None:
    """Why a fixed value, or either end of a searched range, is not a value `parameter` can take."""
    values = (setting.min, setting.max) if isinstance(setting, SearchRange) else (setting,)
    return next((problem for value in values if (problem := parameter.outside_limits(value))), None)


class GenomeSpec(StrictModel):
    method: str = PASSTHROUGH  # required unless space is layer_path (field validators skip defaults)
    parameters: dict[str, ParameterSetting] = Field(default_factory=dict)
    options: dict[str, bool] = Field(default_factory=dict)
    layer_granularity: Annotated[int, Field(ge=1)] = 1
    tensor_classes: list[TensorClass] = Field(default_factory=list)
    space: Literal["parameters", "layer_path"] = "parameters"
    layer_path: LayerPathSpec | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method in (PASSTHROUGH, AUTO_METHOD):  # the layer-path space's, or chosen when the run opens
            return method
        try:
            searchable_method(method)
        except MergerError as error:
            raise ValueError(str(error)) from None
        return method

    @model_validator(mode="after")
    def _parameters_fit_method(self) -> GenomeSpec:
        if self.space == "layer_path" or self.layer_path is not None or self.method == PASSTHROUGH:
            return self._fits_layer_path()
        if self.method == AUTO_METHOD:
            return self._fits_auto()
        info = METHODS[self.method]
        allowed = info.source_parameters + info.shared_parameters
        for name, setting in self.parameters.items():
            if name not in allowed:
                raise ValueError(
                    f"parameters.{name}: {self.method} has no parameter {name!r} (it takes {', '.join(allowed)})"
                )
            parameter = info.parameters[name]
            if parameter.search_range is None and isinstance(setting, SearchRange):
                raise ValueError(f"parameters.{name}: {self.method}'s {name} is not searched; give a number")
            problem = _outside_limits(parameter, setting)
            if problem:
                raise ValueError(f"parameters.{name}: {problem} in {self.method}")
        for name in info.required:
            if name not in self.parameters:
                raise ValueError(f"parameters.{name} is required for {self.method}")
        for name in self.options:
            if name not in info.options:
                raise ValueError(f"options.{name}: {self.method} has no option {name!r}")
        if len(set(self.tensor_classes)) != len(self.tensor_classes):
            raise ValueError(f"tensor_classes has a duplicate: {self.tensor_classes}")
        return self

    def _fits_auto(self) -> GenomeSpec:
        """`method: auto` takes a weight and a density at most (each checked against the method chosen)."""
        for name, setting in self.parameters.items():
            if name not in AUTO_PARAMETERS:
                raise ValueError(
                    f"parameters.{name}: method auto sets {' and '.join(AUTO_PARAMETERS)} only (the method chosen "
                    "takes the rest from its best untuned merge); give a method to set it"
                )
            problem = _outside_limits(METHODS["ties"].parameters[name], setting)
            if problem:
                raise ValueError(f"parameters.{name}: {problem}")
        if self.options:
            raise ValueError(f"options.{next(iter(self.options))}: method auto takes no options; give a method")
        return self

    def _fits_layer_path(self) -> GenomeSpec:
        if self.space != "layer_path":
            if self.layer_path is not None:
                raise ValueError("layer_path settings need space: layer_path")
            if "method" in self.model_fields_set:
                try:
                    searchable_method(PASSTHROUGH)
                except MergerError as error:
                    hint = "passthrough needs space: layer_path; as a parameter merge,"
                    raise ValueError(f"{hint} {error}") from None
            raise ValueError("method is required (a merge method, or space: layer_path)")
        if self.method != PASSTHROUGH:
            raise ValueError(f"space layer_path merges with passthrough; drop method {self.method!r}")
        given = [name for name in ("parameters", "options", "tensor_classes") if getattr(self, name)]
        if self.layer_granularity != 1:
            given.append("layer_granularity")
        if given:
            raise ValueError(f"space layer_path takes its settings under layer_path, not {given[0]}")
        return self

    @property
    def path_settings(self) -> LayerPathSpec:
        return self.layer_path or LayerPathSpec()

    @property
    def searched(self) -> dict[str, SearchRange]:
        return {name: s for name, s in self.parameters.items() if isinstance(s, SearchRange)}


class OptimizerSpec(StrictModel):
    popsize: Annotated[int, Field(ge=2)] = 8
    sigma0: Annotated[float, Field(gt=0, le=1)] = 0.25
    seed: Annotated[int, Field(ge=1)] = 1
    # grid: start from the best merge that gives every gene one value of merger.space.parameters.X0_GRID
    x0: Literal["center", "grid"] | dict[str, float | dict[str, float]] = "center"
    max_evaluations: Annotated[int, Field(ge=1)] | None = 64
    max_seconds: Annotated[float, Field(gt=0)] | None = None
    max_items: Annotated[int, Field(ge=1)] | None = None  # item-evaluations (see fitness.strategy)
    diagonal: bool | Literal["auto"] = "auto"

    @model_validator(mode="after")
    def _has_budget(self) -> OptimizerSpec:
        if self.max_evaluations is None and self.max_seconds is None and self.max_items is None:
            raise ValueError("give a budget: max_evaluations, max_seconds and/or max_items")
        if self.max_evaluations is not None and self.max_evaluations < self.popsize:
            raise ValueError(
                f"max_evaluations ({self.max_evaluations}) is below popsize ({self.popsize}): "
                "the budget must hold at least one full generation"
            )
        return self


class TaskSpec(StrictModel):
    name: str
    metric: str | None = None
    weight: Annotated[float, Field(gt=0)] = 1.0


class EvalSet(StrictModel):
    tasks: Annotated[list[TaskSpec], Field(min_length=1)]
    limit: Annotated[int, Field(ge=1)] | None = None
    subsample_seed: int | None = None
    num_fewshot: Annotated[int, Field(ge=0)] | None = None
    apply_chat_template: bool = False
    batch_size: Annotated[int, Field(ge=1)] = 16

    @field_validator("tasks", mode="before")
    @classmethod
    def _names_as_tasks(cls, tasks: Any) -> Any:
        if isinstance(tasks, list):
            return [{"name": t} if isinstance(t, str) else t for t in tasks]
        return tasks


class RacingSpec(StrictModel):
    block: Annotated[int, Field(ge=1)] = 8  # items per block; every candidate of a generation sees the same
    bound: Literal["exact", "hoeffding"] = "hoeffding"
    delta: Annotated[float, Field(gt=0, lt=1)] = 0.1  # hoeffding: chance that one bound is wrong
    # independent: a bound per candidate (`bound`); paired: a test on the candidates' per-item
    # differences (merger.search.paired), where delta is the chance of any wrong cut in a generation
    pairing: Literal["independent", "paired"] = "independent"

    @model_validator(mode="after")
    def _paired_has_its_test(self) -> RacingSpec:
        if self.pairing == "paired" and self.bound == "exact":
            raise ValueError("racing.bound: exact is for pairing: independent (paired racing has its own test)")
        return self


class AnchorsSpec(StrictModel):
    count: Annotated[int, Field(ge=1)] = 12  # anchor items
    # kmeans: clusters of the items' outcomes (merger.search.anchors); irt: the most informative items
    # of a Rasch model, the estimate from the fitted ability (merger.search.irt_anchors)
    method: Literal["kmeans", "irt"] = "kmeans"


class FitnessSet(EvalSet):
    """The fitness set, and how much of it each candidate pays for (README: search efficiency)."""

    strategy: Literal["full", "racing", "anchors"] = "full"
    racing: RacingSpec = RacingSpec()
    anchors: AnchorsSpec = AnchorsSpec()
    max_gen_toks: Annotated[int, Field(ge=1)] | None = None  # caps generation (lm-eval's default: 256)
    # how the tasks' scores make one fitness (merger.scoring.fitness.fitness_score): the weighted mean,
    # the worst task, or the weighted mean less a penalty for each task below `floor`
    aggregate: Literal["mean", "worst", "floor"] = "mean"
    floor: Annotated[float, Field(gt=0, le=1)] | None = None

    @model_validator(mode="after")
    def _aggregate_fits(self) -> FitnessSet:
        if (self.aggregate == "floor") != (self.floor is not None):
            raise ValueError("floor goes with aggregate: floor, and only with it")
        if self.aggregate != "mean" and self.strategy != "full":
            raise ValueError(
                f"aggregate: {self.aggregate} needs strategy: full ({self.strategy} "
                "estimates a weighted mean of items)"
            )
        return self


# what lm-eval scores each candidate in (merger.scoring.precision); merges stay in engine.dtype
ScoringPrecision = Literal["fp32", "bf16", "auto"]


class EngineSpec(StrictModel):
    kind: Literal["resident", "mergekit"] = "resident"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    fresh_randomness: bool = False
    streaming: bool = False
    # fp32: the merged weights as built; bf16: a bfloat16 copy of them; auto: bf16 where the hardware has
    # native bf16 matrix units (AMX-BF16/AVX512-BF16 CPUs, bf16-capable GPUs), else fp32
    scoring_precision: ScoringPrecision = "fp32"

    @model_validator(mode="after")
    def _precision_fits_dtype(self) -> EngineSpec:
        explicit_fp32 = "scoring_precision" in self.model_fields_set and self.scoring_precision == "fp32"
        if explicit_fp32 and self.dtype != "float32":
            raise ValueError(
                f"scoring_precision fp32 scores the merge as built, and dtype {self.dtype} is not float32"
            )
        return self


class ExecutorSpec(StrictModel):
    kind: Literal["in_process", "ray"] = "in_process"
    address: str | None = None
    num_workers: Annotated[int, Field(ge=1)] = 2
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1
    gpus_per_worker: Annotated[float, Field(ge=0)] = 0


class Output(StrictModel):
    run_dir: str = "runs/run"
    publish: str | None = None
    registry: str | None = None


class SelectionSpec(StrictModel):
    """How the run picks its winner (merger.finish.selection): the finalists (the `top_k` candidates by
    fitness, every baseline, every source) re-scored on the validation set, the best one exported.
    On by default where the recipe names `validation:`; `selection: {enabled: false}` exports the best
    candidate by fitness instead."""

    enabled: bool | None = None  # None: on where the recipe names validation:
    top_k: Annotated[int, Field(ge=1)] = 5
    # best: the best finalist on validation; confident: the candidate best on validation must beat the
    # best untuned finalist with a paired bootstrap lower bound above zero (one-sided at `confidence`)
    rule: Literal["best", "confident"] = "confident"
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.95
    # racing (merger.finish.selection_race): the finalists are scored on the validation items in blocks of
    # `block` items, in a seeded order, and a finalist is dropped once a paired test says another of its
    # kind (untuned, or candidate) is ahead of it on the whole set, or, under the confident rule, that an
    # untuned finalist is ahead of a candidate; `delta`: the chance that any drop is wrong. null: every
    # finalist on every validation item. 200: the paired test needs about 150 items to put a model 26 points
    # behind out at delta 0.05 (tests/test_selection_race.py), so one block does
    block: Annotated[int, Field(ge=1)] | None = 200
    delta: Annotated[float, Field(gt=0, lt=1)] = 0.05
    # which untuned models the final table scores on the test set beside the winner (merger.finish.final):
    # all: every source and baseline; contenders: only the one the winner was measured against, the best
    # untuned finalist on validation (the confident rule's reference), so the test set is spent on the
    # comparison the run's claim rests on; the others keep their validation scores (the finalists table).
    # On the skills recipe `contenders` scores 1 untuned model on test instead of 9 (4,000 items fewer)
    final_table: Literal["all", "contenders"] = "all"


DEFAULT_MONITORING_LIMIT = 100


class MonitoringSpec(StrictModel):
    """The validation curve: after each generation its best candidate is scored on the first `limit`
    items of each validation task (merger.search.loop). A curve to watch, not a decision (selection scores
    its finalists on every validation item), so a small fixed subset serves: at 100 items a score's
    standard error is at most 5 points. Its items and seconds are the run's `monitoring` phase."""

    enabled: bool = True  # where the recipe names validation:
    # items per validation task: a number (checked against the validation set), `all`, or null: the
    # default, DEFAULT_MONITORING_LIMIT cut to a smaller validation set
    limit: Annotated[int, Field(ge=1)] | Literal["all"] | None = None

    @property
    def items_per_task(self) -> int | None:
        """The first items of each validation task monitored; None: every item."""
        if self.limit == "all":
            return None
        return DEFAULT_MONITORING_LIMIT if self.limit is None else self.limit

    def subset(self, ids: Mapping[str, list[int]]) -> dict[str, list[int]]:
        """The monitored items of the validation set (doc ids per task, in order): the first of each task."""
        limit = self.items_per_task
        return {task: list(docs if limit is None else docs[:limit]) for task, docs in ids.items()}


# an untuned merge scored next to the winner, by its name in merger.recipe.untuned (merger.recipe.baselines)
BaselineName = str


class TrackingSpec(StrictModel):
    """Where a run's numbers are also logged, live (merger.tracking); the ledger stays the source of truth.
    `uri` None: a SQLite store `mlflow.db` beside the run directory (runs side by side share it);
    `experiment` None: the recipe file's name."""

    kind: Literal["mlflow"] = "mlflow"
    uri: str | None = None
    experiment: str | None = None


class Recipe(StrictModel):
    sources: Annotated[list[Source], Field(min_length=2)]
    base_model: str | None = None
    tokenizer_source: str | None = None
    allow_pickle: bool = False
    allow_nonfinite: bool = False  # merge sources holding NaN/inf (only mergekit's engine computes on them)
    trust_remote_code: bool = False
    genome: GenomeSpec
    optimizer: OptimizerSpec = OptimizerSpec()
    fitness: FitnessSet
    validation: EvalSet | None = None
    test: EvalSet | None = None
    task_paths: list[str] = Field(default_factory=list)
    engine: EngineSpec = EngineSpec()
    executor: ExecutorSpec = ExecutorSpec()
    output: Output = Output()
    baselines: list[BaselineName] | Literal["all"] = Field(default_factory=lambda: list(DEFAULT_BASELINES))
    selection: SelectionSpec = SelectionSpec()
    monitoring: MonitoringSpec = MonitoringSpec()
    tracking: TrackingSpec | None = None

    @field_validator("baselines", mode="before")
    @classmethod
    def _known_baselines(cls, names: Any) -> Any:
        if isinstance(names, str) and names != EVERY:
            raise ValueError(f"a list of untuned merges or `{EVERY}`, got {names!r}")
        if not isinstance(names, list):
            return names
        for name in names:
            problem = unknown_baseline(name) if isinstance(name, str) else None
            if problem:
                raise ValueError(problem)
        if len(set(map(str, names))) != len(names):
            raise ValueError(f"each name once, got {names}")
        return names

    @property
    def baseline_names(self) -> tuple[str, ...]:
        """The untuned merges to score, in order (`all`: every one merger knows)."""
        return tuple(UNTUNED_MERGES) if self.baselines == EVERY else tuple(self.baselines)

    @property
    def baselines_must_apply(self) -> bool:
        """A list the recipe chose itself: each name must apply to the sources. The default list and
        `all` skip, with the reason in the summary, what does not apply."""
        return self.baselines != EVERY and tuple(self.baselines) != DEFAULT_BASELINES

    def baseline_method(self, name: str) -> str:
        return UNTUNED_MERGES[name].method or self.genome.method

    @property
    def chooses_method(self) -> bool:
        """`genome.method: auto`: the method is chosen from the baselines when the run opens."""
        return self.genome.method == AUTO_METHOD and self.genome.space == "parameters"

    def baseline_config(self, name: str, source_paths: Mapping[str, Any]) -> dict[str, Any]:
        """One named untuned merge's mergekit config over the sources (name -> path), in the recipe's order;
        raises NotApplicable when the method cannot merge them untuned."""
        if self.baseline_method(name) == AUTO_METHOD:
            raise NotApplicable("it is the searched method's, and method auto chooses that from the others")
        return untuned_config(
            self.baseline_method(name),
            {source: source_paths[source] for source in self.source_names},
            base=self.base_model,
            dtype=self.engine.dtype,
            tokenizer_source=self.tokenizer_source,
            values=UNTUNED_MERGES[name].values,
        )

    @model_validator(mode="after")
    def _named_baselines_apply(self) -> Recipe:
        sources = {name: name for name in self.source_names}
        if not self.baselines_must_apply or any(
            given is not None and given not in sources for given in (self.base_model, self.tokenizer_source)
        ):
            return self  # a base or tokenizer source that is not a source: _sources_fit_method says so
        for name in self.baselines:
            try:
                self.baseline_config(name, sources)
            except NotApplicable as reason:
                raise ValueError(
                    f"baselines: {name} ({self.baseline_method(name)}) does not apply to these sources: {reason} "
                    f"(remove it, or give `baselines: {EVERY}`, which skips what does not apply)"
                ) from None
        return self

    @model_validator(mode="after")
    def _monitoring_fits_validation(self) -> Recipe:
        limit, validation = self.monitoring.limit, self.validation
        held = validation.limit if validation is not None else None
        if self.monitors and isinstance(limit, int) and held is not None and limit > held:
            raise ValueError(
                f"monitoring.limit: {limit} items per task is more than the validation set holds "
                f"(validation.limit: {held}); give at most {held}, or all"
            )
        return self

    @property
    def monitors(self) -> bool:
        """Whether each generation's best is scored on (part of) the validation set."""
        return self.monitoring.enabled and self.validation is not None

    @model_validator(mode="after")
    def _selection_has_a_set(self) -> Recipe:
        asked = self.selection.enabled or (self.selection.enabled is None and self.selection != SelectionSpec())
        if asked and self.validation is None:
            raise ValueError(
                "selection: nothing to select on: the recipe has no validation set (add `validation:` "
                "with tasks the fitness never scores, or give `selection: {enabled: false}`)"
            )
        return self

    @property
    def selects(self) -> bool:
        """Whether the winner is chosen on the validation set (merger.finish.selection)."""
        return self.selection.enabled is not False and self.validation is not None

    @property
    def tests_contenders_only(self) -> bool:
        """Whether the final table scores on the test set only the winner and its reference, the best
        untuned finalist on validation (`selection.final_table: contenders`, where the run selects)."""
        return self.selects and self.selection.final_table == "contenders"

    @model_validator(mode="after")
    def _sources_fit_method(self) -> Recipe:
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources: names must be unique, got {names}")
        for field in ("base_model", "tokenizer_source"):
            value = getattr(self, field)
            if value is not None and value not in names:
                raise ValueError(f"{field}: {value!r} is not one of the sources ({', '.join(names)})")
        if self.genome.space == "layer_path":
            return self._layer_path_fits(names)
        if self.chooses_method:
            return self  # checked against the method chosen (`with_method`)
        info = METHODS[self.genome.method]
        if info.needs_base and self.base_model is None:
            raise ValueError(f"base_model is required for {self.genome.method}")
        problem = info.source_count_problem(len(names), self.base_model is not None and info.takes_base)
        if problem:
            raise ValueError(f"sources: {problem}")
        return self

    @model_validator(mode="after")
    def _nonfinite_needs_mergekit(self) -> Recipe:
        if self.allow_nonfinite and self.engine.kind != "mergekit":
            raise ValueError(
                "allow_nonfinite: true needs engine.kind: mergekit (the resident engine refuses NaN/inf "
                "sources rather than compute something mergekit's export would not)"
            )
        return self

    def _layer_path_fits(self, names: list[str]) -> Recipe:
        if self.engine.scoring_precision != "fp32":
            raise ValueError(
                f"engine.scoring_precision: {self.engine.scoring_precision} is not available for "
                "genome.space layer_path (its candidates score in engine.dtype); give fp32"
            )
        anchor = self.genome.path_settings.anchor
        if anchor is not None and anchor not in names:
            raise ValueError(
                f"genome.layer_path.anchor: {anchor!r} is not one of the sources ({', '.join(names)})"
            )
        if self.optimizer.x0 != "center":
            raise ValueError(
                "optimizer.x0: a layer path starts from genome.layer_path.start; give x0: center"
            )
        return self

    def with_method(self, baseline: str) -> Recipe:
        """This `method: auto` recipe searching the method of the untuned merge `baseline`: the weight as
        given (or AUTO_WEIGHT), the baseline's other settings fixed unless the recipe searches them (a density
        range); checked as any recipe (ValueError, with the reason, where it does not fit)."""
        merge = UNTUNED_MERGES[baseline]
        assert merge.method is not None and self.chooses_method
        info = METHODS[merge.method]
        given = self.genome.parameters
        parameters: dict[str, Any] = {"weight": given.get("weight", AUTO_WEIGHT)}
        for name in dict.fromkeys([*merge.values, *given]):  # the recipe's setting first, else the baseline's
            if name != "weight" and name in info.parameters:
                parameters[name] = given.get(name, merge.values.get(name))
        genome = self.genome.model_dump(exclude_unset=True) | {"method": merge.method, "parameters": parameters}
        return Recipe.model_validate(self.model_dump(exclude_unset=True) | {"genome": genome})

    @property
    def tokenizer_name(self) -> str:
        """The source whose tokenizer (and chat template) scores every model of the run."""
        return self.tokenizer_source or self.base_model or self.source_names[0]

    @property
    def anchor(self) -> str:
        """The layer path's source of embeddings, final norm and lm_head."""
        return self.genome.path_settings.anchor or self.base_model or self.source_names[0]

    @property
    def source_names(self) -> list[str]:
        return [source.name for source in self.sources]

    @property
    def merged_sources(self) -> list[str]:
        """The sources that carry their own searched values (all but the base for base methods)."""
        return METHODS[self.genome.method].sources_with_values(self.source_names, self.base_model)
