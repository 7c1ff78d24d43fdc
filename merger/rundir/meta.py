"""What a run records about itself (the ledger's meta table): one typed field per key.

Opening a run writes most of it (merger.search.open); the warm start's labels and a strategy's anchors
come later. Everything that reads a run (the end of the run, the score cache, `merger status`, the
report) reads it through `RunMeta`, never by bare key.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class LineageRecord(BaseModel):
    """Where one source came from, as the ledger records it (the summary's `LineageEntry` plus the stamp
    that lets a later session reuse the digest, merger.sources.digest)."""

    model_config = ConfigDict(extra="allow")

    path: str | None = None
    registry: str | None = None
    reference: str | None = None
    sha256: str | None = None
    stamp: Any = None


class RunMeta(BaseModel):
    # extra="allow": a ledger written by another version keeps what this one does not know
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    lineage: dict[str, LineageRecord] = Field(default_factory=dict)  # source name -> where it came from
    seed: int | None = None
    dimension: int | None = None  # genes in the search space
    # the search space in one line (`SearchSpace.describe`); stored under its first name
    search_space: str | None = Field(default=None, alias="genome")
    popsize: int | None = None  # the budget (merger.search.budget.Budget), as the recipe gave it
    max_evaluations: int | None = None
    max_seconds: float | None = None
    max_items: int | None = None
    strategy: str | None = None  # fitness.strategy
    scoring_precision: str | None = None  # fp32 or bf16: `engine.scoring_precision` resolved on this machine
    fitness_items: int | None = None  # items a whole fitness evaluation scores
    # what the end of the run scores at most (merger.commands.status prices it): the items of each
    # eval set, per model, and the models it scores on the validation set and on the others
    set_items: dict[str, int] | None = None
    finalists: int | None = None
    final_models: int | None = None
    planned_items: int | None = None  # every phase's items at most (merger.search.budget.planned_items)
    warm_starts: list[str] | None = None  # each warm start's label, by its index in generation -1
    anchors: Any = None  # fitness.strategy anchors: the anchors chosen (a list, or a dict for IRT)

    @classmethod
    def storage_keys(cls, **values: Any) -> dict[str, Any]:
        """`values` by field name, keyed as the ledger stores them; an unknown name is a programming error."""
        stored = {}
        for name, value in values.items():
            field = cls.model_fields.get(name)
            if field is None:
                raise KeyError(f"RunMeta has no field {name!r}")
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="json")
            elif isinstance(value, dict):
                value = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in value.items()}
            stored[field.alias or name] = value
        return stored
