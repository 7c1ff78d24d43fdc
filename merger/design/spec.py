"""The pool design YAML (`merger pool design DESIGN.yaml`): the recipe each group's search starts from, the
pool the router and server settings come from, each specialist's tasks, and the budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationError, model_validator

from merger.common.errors import MergerError
from merger.common.schema import StrictModel, format_validation_error
from merger.common.yamlsafe import read_yaml_file


class SkillTasks(StrictModel):
    """One specialist's skill: its lm-eval task in each set. `measure`: the items the pairwise interference
    is measured on (validation items: the design is a decision, so the test items stay out of it)."""

    fitness: str
    validation: str
    test: str
    measure: str


class Limits(StrictModel):
    """Items per skill task in each group's search, and in the pairwise measurement."""

    fitness: Annotated[int, Field(ge=1)] = 50
    validation: Annotated[int, Field(ge=1)] = 200
    test: Annotated[int, Field(ge=1)] = 100
    measure: Annotated[int, Field(ge=1)] = 50


class PoolDesign(StrictModel):
    recipe: Path  # each group's search: this recipe with the group's sources and skills
    pool: Path  # the designed pool's tasks, router and server settings: this pool's
    members: Annotated[int, Field(ge=1)] | None = None  # K: resident models at most
    memory_gib: Annotated[float, Field(gt=0)] | None = None  # or the resident GiB they may take
    skills: Annotated[dict[str, SkillTasks], Field(min_length=1)]  # specialist (a source of the recipe): tasks
    limits: Limits = Field(default_factory=Limits)
    measure_merge: str = "task_arithmetic"  # the untuned merge of each pair (merger.recipe.untuned)
    work_dir: Path = Path("pool-design")
    # each merged group's winner published as PUBLISH-GROUP (its lineage: the group's sources), and the
    # designed pool names it by that registry reference; None: by its run directory
    publish: str | None = None
    registry: Path | None = None  # the registry's root (default: the registry's own)

    @model_validator(mode="after")
    def _one_budget(self) -> PoolDesign:
        if (self.members is None) == (self.memory_gib is None):
            raise ValueError("give the budget as members (K resident models) or memory_gib, one of them")
        if self.members is not None and self.members > len(self.skills):
            raise ValueError(
                f"members: {self.members} is more than the {len(self.skills)} specialists; at most "
                f"{len(self.skills)} (every specialist kept apart)"
            )
        return self

    def with_members(self, members: int) -> PoolDesign:
        """The design with the budget K = `members` (`--members`), checked as the file's budget is."""
        try:
            return PoolDesign.model_validate({**self.model_dump(), "members": members, "memory_gib": None})
        except ValidationError as error:
            raise MergerError(format_validation_error(error, "--members")) from None


def load_design(path: Path) -> PoolDesign:
    """The design file, its paths anchored at its directory; one line for anything wrong with its shape."""
    data = read_yaml_file(path, "pool design")
    if not isinstance(data, dict):
        raise MergerError(f"{path}: a pool design is a YAML mapping, got {type(data).__name__}")
    try:
        design = PoolDesign.model_validate(data)
    except ValidationError as error:
        raise MergerError(format_validation_error(error, str(path))) from None
    root = path.resolve().parent
    anchored = ("recipe", "pool", "work_dir", "registry")
    return design.model_copy(
        update={name: root / getattr(design, name) for name in anchored if getattr(design, name) is not None}
    )
