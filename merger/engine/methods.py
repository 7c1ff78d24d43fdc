"""The merge methods the resident engine runs with its own kernels: one object per method, registered by
mergekit's method name, the way mergekit puts each method behind a `MergeMethod`.

Each object owns its precomputation (`prepare`) and its kernel call (`merge`); a generalized-task-arithmetic
method carries mergekit's sparsification as a `sparsify.Sparsifier` and its sign consensus as a flag, both
read from mergekit's own method object. What a method takes (parameters, ranges, base policy) is
`merger.recipe.methods.METHODS`; methods missing here merge through mergekit's executor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from mergekit import merge_methods
from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod, GeneralizedTaskArithmeticMerge

from merger.common.errors import MergerError
from merger.engine.buffers import Group, GroupInputs
from merger.engine.context import GroupCandidate, MergeContext
from merger.engine.kernels import (
    DIVISOR_EPS,
    make_task_arithmetic,
    normalized_dot,
    slerp_coefficients,
    weighted_sum,
)
from merger.engine.precompute import GroupStats
from merger.engine.sparsify import SPARSIFIERS, MaskArgs, Sparsifier
from merger.recipe.methods import METHODS, MethodInfo


class ResidentMethod(ABC):
    def __init__(self, name: str):
        self.name = name  # mergekit's

    @property
    def info(self) -> MethodInfo:
        return METHODS[self.name]

    @property
    def needs_base(self) -> bool:
        return self.info.needs_base

    @property
    def draws_random(self) -> bool:
        """Whether its candidates depend on random fields (the run seed, and the draw with fresh randomness)."""
        return False

    def prepare(self, context: MergeContext, group: Group, inputs: GroupInputs, draw: int) -> GroupStats:
        """The group's constants that every candidate of this method reads."""
        return GroupStats()

    @abstractmethod
    def merge(self, context: MergeContext, candidate: GroupCandidate) -> None:
        """Write the candidate's tensors of `candidate.group` into its output buffer."""


def _weighted_sum(
    context: MergeContext, candidate: GroupCandidate, base_coefs: np.ndarray, coefs: np.ndarray
) -> None:
    """output = base_coefs * base + sum_i coefs[i] * others[i], per layer ([L] and [S, L] coefficients)."""
    inputs = candidate.inputs
    context.kernels.call(
        "weighted_sum",
        lambda: weighted_sum,
        candidate.group.output,
        inputs.base,
        inputs.others,
        context.scalars(base_coefs),
        context.scalars(coefs),
    )


class Linear(ResidentMethod):
    def merge(self, context: MergeContext, candidate: GroupCandidate) -> None:
        merges = candidate.merges
        weights = context.per_source(merges, "weight", 0.0)
        base_weights = np.zeros(len(merges))
        if context.base_name is not None:
            for row, merge in enumerate(merges):
                base_weights[row] = float(merge.per_source.get(context.base_name, {}).get("weight", 0.0))
        normalize = context.shared(merges, "normalize", 1.0) > 0
        totals = weights.sum(axis=0) + base_weights
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(normalize, 1.0 / totals, 1.0)
        _weighted_sum(context, candidate, base_weights * scale, weights * scale)


class Slerp(ResidentMethod):
    def prepare(self, context: MergeContext, group: Group, inputs: GroupInputs, draw: int) -> GroupStats:
        dots = [
            [normalized_dot(inputs.base[row], inputs.others[index, row]) for row in range(len(group.names))]
            for index in range(len(context.other_names))
        ]
        return GroupStats(dots=dots)

    def merge(self, context: MergeContext, candidate: GroupCandidate) -> None:
        group, merges = candidate.group, candidate.merges
        active = np.zeros((len(context.other_names), len(merges)))
        for row, merge in enumerate(merges):
            for index, source in enumerate(context.other_names):
                active[index, row] = float(source in merge.per_source)
        t = context.shared(merges, "t", 0.0)
        base_coefs = np.ones(len(merges))
        coefs = np.zeros_like(active)
        for row in range(len(merges)):
            chosen = np.flatnonzero(active[:, row])
            if len(chosen) > 1:
                raise MergerError(
                    f"slerp merges exactly two models; {group.names[row]} has {len(chosen) + 1}"
                )
            if len(chosen) == 1:
                index = int(chosen[0])
                dot = candidate.stats.dots[index][row]
                base_coefs[row], coefs[index, row] = slerp_coefficients(float(t[row]), dot)
        _weighted_sum(context, candidate, base_coefs, coefs)


class TaskArithmetic(ResidentMethod):
    """mergekit's generalized task arithmetic: task vectors, optionally sparsified, optionally with TIES's
    sign consensus ("sum"), weighted, summed and scaled by lambda."""

    def __init__(self, name: str, sparsifier: Sparsifier | None, consensus: bool):
        super().__init__(name)
        self.sparsifier = sparsifier
        self.consensus = consensus

    @property
    def draws_random(self) -> bool:
        return self.sparsifier is not None and self.sparsifier.draws_random

    def prepare(self, context: MergeContext, group: Group, inputs: GroupInputs, draw: int) -> GroupStats:
        if self.sparsifier is None:
            return GroupStats()
        return self.sparsifier.prepare(context, group, inputs, draw)

    def merge(self, context: MergeContext, candidate: GroupCandidate) -> None:
        group, inputs, merges = candidate.group, candidate.inputs, candidate.merges
        weights = context.per_source(merges, "weight", 0.0)
        density = context.per_source(merges, "density", 1.0)
        lam = context.shared(merges, "lambda", 1.0)
        normalize = context.shared(merges, "normalize", 0.0) > 0
        rescale = context.shared(merges, "rescale", 0.0) > 0
        if self.consensus:
            divisor = normalize.astype(np.float64)
        else:
            # mergekit sums the weights in the tensors' dtype before guarding against zero
            totals = weights.astype(np.float32).sum(axis=0, dtype=np.float32).astype(np.float64)
            divisor = np.where(normalize & (np.abs(totals) >= DIVISOR_EPS), totals, 1.0)
        mask_args: MaskArgs = ()
        factors = None
        keep = None
        if self.sparsifier is not None:
            mask_args, factors = self.sparsifier.masks(context, candidate, density, rescale)
            keep = self.sparsifier.keep
        weights_t = context.scalars(weights)
        coefs = weights_t if factors is None else weights_t * factors.to(weights_t.dtype).unsqueeze(-1)
        kind = None if self.sparsifier is None else self.sparsifier.name
        context.kernels.call(
            f"task_arithmetic:{kind}:{self.consensus}",
            lambda: make_task_arithmetic(keep, self.consensus),
            group.output,
            inputs.base,
            inputs.others,
            coefs,
            weights_t,
            context.scalars(divisor),
            context.scalars(lam),
            *mask_args,
        )


# Methods whose kernel is chosen by mergekit's name alone; the others are found by their mergekit class.
NAMED_KERNELS: dict[str, type[ResidentMethod]] = {"linear": Linear, "slerp": Slerp}


def _resident_method(name: str) -> ResidentMethod | None:
    """The kernel object for a registered mergekit method; None when the kernels do not implement it (those
    methods merge through mergekit's executor)."""
    if name in NAMED_KERNELS:
        return NAMED_KERNELS[name](name)
    method = merge_methods.get(name)
    if not isinstance(method, GeneralizedTaskArithmeticMerge):
        return None
    sparsification = method.sparsification_method
    if sparsification is not None and sparsification not in SPARSIFIERS:
        return None
    if method.consensus_method not in (None, ConsensusMethod.sum):
        return None
    sparsifier = SPARSIFIERS[sparsification]() if sparsification is not None else None
    return TaskArithmetic(name, sparsifier, consensus=method.consensus_method is not None)


# The methods the resident engine merges with its own kernels, by mergekit's name.
RESIDENT_METHODS: dict[str, ResidentMethod] = {
    name: method for name in METHODS if (method := _resident_method(name)) is not None
}
