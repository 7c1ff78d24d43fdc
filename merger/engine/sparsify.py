"""mergekit's sparsification methods, one class each: what it precomputes per group, the per-candidate
tensors its kernel mask reads (and the l1 rescale factors), and the mask itself (`keep`, run inside the fused
task-arithmetic kernel). `SPARSIFIERS` keys them by mergekit's own `SparsificationMethod`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch
from mergekit.sparsify import SparsificationMethod

from merger.common.errors import MergerError
from merger.engine.buffers import Group, GroupInputs
from merger.engine.context import GroupCandidate, MergeContext
from merger.engine.kernels import (
    DELLA_ALWAYS,
    LEVEL_SHIFT,
    RANDOM_LEVELS,
    della_level_counts,
    della_terms,
    make_kept_l1,
    pack_bytes,
    plane,
    random_levels,
    rescale_factors,
)
from merger.engine.precompute import (
    GroupStats,
    block_prefix_sums,
    dare_tables,
    della_tables,
    prefix_l1,
    rank_levels,
    searchsorted,
    suffix_l1,
    total_l1,
)

MaskArgs = tuple[torch.Tensor, ...]


class Sparsifier(ABC):
    name: ClassVar[str]  # the kernels' name for it (kernel cache keys)
    draws_random: ClassVar[bool] = False  # keyed by the run seed and, with fresh randomness, the candidate

    @abstractmethod
    def prepare(self, context: MergeContext, group: Group, inputs: GroupInputs, draw: int) -> GroupStats:
        """The group's constants for this sparsification (computed once, or per candidate when streaming)."""

    @abstractmethod
    def masks(
        self, context: MergeContext, candidate: GroupCandidate, density: np.ndarray, rescale: np.ndarray
    ) -> tuple[MaskArgs, torch.Tensor | None]:
        """The tensors `keep` reads for this candidate, and [S, L] l1 rescale factors (None: no rescale)."""

    @staticmethod
    @abstractmethod
    def keep(delta: torch.Tensor, index: int, args: MaskArgs) -> torch.Tensor:
        """Which elements of source `index`'s task vector survive (inside the compiled kernel)."""

    def kept_l1(self, context: MergeContext, inputs: GroupInputs, mask_args: MaskArgs) -> torch.Tensor:
        """Per source and layer, the l1 of the kept task vector: a second pass over memory."""
        return context.kernels.call(
            f"kept_l1:{self.name}", lambda: make_kept_l1(self.keep), inputs.base, inputs.others, *mask_args
        )


def _magnitudes(inputs: GroupInputs) -> torch.Tensor:
    return (inputs.others - inputs.base).abs()


def _where_flag(flags: np.ndarray, value: float, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not flags.any():
        return tensor
    mask = torch.from_numpy(flags).to(device).unsqueeze(-1)
    return torch.where(mask, torch.full_like(tensor, value), tensor)


def _rescaled(
    context: MergeContext, before: torch.Tensor, kept: torch.Tensor, partial: np.ndarray, rescale: np.ndarray
) -> torch.Tensor:
    """[S, L] multipliers: the l1 rescale where a tensor is rescaled and actually sparsified, else 1."""
    factors = rescale_factors(before, kept)
    applies = torch.from_numpy(partial & rescale[None, :]).to(context.device)
    return torch.where(applies, factors, torch.ones_like(factors))


class _SortedMagnitudes(Sparsifier):
    """Thresholds on |task vector| taken from its sorted magnitudes; kept l1 from their prefix sums."""

    def prepare(self, context: MergeContext, group: Group, inputs: GroupInputs, draw: int) -> GroupStats:
        ascending = torch.sort(_magnitudes(inputs), dim=-1).values
        return GroupStats(ascending=ascending, block_sums=block_prefix_sums(ascending))


class Magnitude(_SortedMagnitudes):
    """TIES: keep the `density` fraction of largest magnitudes."""

    name = "magnitude"

    def masks(
        self, context: MergeContext, candidate: GroupCandidate, density: np.ndarray, rescale: np.ndarray
    ) -> tuple[MaskArgs, torch.Tensor | None]:
        n, stats = candidate.group.elements, candidate.stats
        keep_all, keep_none = density >= 1, density <= 0
        partial = ~(keep_all | keep_none)
        counts = np.where(partial, np.maximum(1, (density * n).astype(np.int64)), 1)
        # Python's int(density * n) truncates exactly like mergekit; numpy's astype does too for positives
        positions = torch.from_numpy(np.clip(n - counts, 0, n - 1)).to(context.device).unsqueeze(-1)
        threshold = stats.ascending.gather(-1, positions)
        threshold = _where_flag(keep_all, -math.inf, threshold, context.device)
        threshold = _where_flag(keep_none, math.nan, threshold, context.device)
        factors = None
        if (partial & rescale[None, :]).any():
            kept = suffix_l1(stats, torch.nan_to_num(threshold, nan=0.0))
            factors = _rescaled(context, total_l1(stats), kept, partial, rescale)
        return (threshold,), factors

    @staticmethod
    def keep(delta: torch.Tensor, index: int, args: MaskArgs) -> torch.Tensor:
        (threshold,) = args
        return delta.abs() >= threshold[index]


class MagnitudeOutliers(_SortedMagnitudes):
    """Breadcrumbs: drop the `gamma` fraction of largest magnitudes and the smallest, keeping `density`."""

    name = "outliers"

    def masks(
        self, context: MergeContext, candidate: GroupCandidate, density: np.ndarray, rescale: np.ndarray
    ) -> tuple[MaskArgs, torch.Tensor | None]:
        gamma = context.per_source(candidate.merges, "gamma", 0.0)
        n, stats = candidate.group.elements, candidate.stats
        keep_all = density >= 1
        target = np.trunc(density * n).astype(np.int64)
        top = np.trunc(gamma * n).astype(np.int64)
        bottom = np.maximum(0, n - target - top)
        keep_none = ~keep_all & (target <= 0)
        partial = ~(keep_all | keep_none)
        # clipped so that out-of-range gamma (negative) cannot index past the tensor
        low_pos = np.clip(np.where(partial, bottom, 0), 0, n - 1)
        high_pos = np.clip(np.where(partial, bottom + target - 1, 0), 0, n - 1)
        low = stats.ascending.gather(-1, torch.from_numpy(low_pos).to(context.device).unsqueeze(-1))
        high = stats.ascending.gather(-1, torch.from_numpy(high_pos).to(context.device).unsqueeze(-1))
        low = _where_flag(keep_all, -math.inf, low, context.device)
        high = _where_flag(keep_all, math.inf, high, context.device)
        low = _where_flag(keep_none, math.nan, low, context.device)
        factors = None
        if (partial & rescale[None, :]).any():
            upto_high = prefix_l1(stats, searchsorted(stats, high, right=True))
            below_low = prefix_l1(stats, searchsorted(stats, torch.nan_to_num(low, nan=0.0), right=False))
            factors = _rescaled(context, total_l1(stats), upto_high - below_low, partial, rescale)
        return (low, high), factors

    @staticmethod
    def keep(delta: torch.Tensor, index: int, args: MaskArgs) -> torch.Tensor:
        low, high = args
        magnitude = delta.abs()
        return (magnitude >= low[index]) & (magnitude <= high[index])


class _RandomFields(Sparsifier):
    """Masks drawn from 8-bit random levels (common random numbers across candidates): stored once with
    their kept-l1 tables, or, with `context.hashed_fields`, hashed inside the kernels from per-tensor keys."""

    draws_random = True

    def prepare(self, context: MergeContext, group: Group, inputs: GroupInputs, draw: int) -> GroupStats:
        magnitudes = _magnitudes(inputs)
        stats = GroupStats(
            keys=context.random_keys(group.names, draw), l1=magnitudes.sum(dim=-1, dtype=torch.float64)
        )
        self._prepare_fields(context, group, stats, magnitudes)
        return stats

    @abstractmethod
    def _prepare_fields(
        self, context: MergeContext, group: Group, stats: GroupStats, magnitudes: torch.Tensor
    ) -> None:
        """Fill in what this kind stores besides the keys and l1 norms."""

    @staticmethod
    def _levels(context: MergeContext, group: Group, stats: GroupStats) -> torch.Tensor:
        return torch.stack([random_levels(key, group.elements, context.device) for key in stats.keys])


class Random(_RandomFields):
    """DARE: keep each element with probability `density`."""

    name = "random"

    def _prepare_fields(
        self, context: MergeContext, group: Group, stats: GroupStats, magnitudes: torch.Tensor
    ) -> None:
        if context.hashed_fields:
            return
        levels = self._levels(context, group, stats)
        stats.fields = pack_bytes(levels)
        stats.dare_table = dare_tables(levels, magnitudes)

    def masks(
        self, context: MergeContext, candidate: GroupCandidate, density: np.ndarray, rescale: np.ndarray
    ) -> tuple[MaskArgs, torch.Tensor | None]:
        stats = candidate.stats
        keep_all = density >= 1
        # keep where (level + 0.5) / RANDOM_LEVELS < density: a keep probability of levels / RANDOM_LEVELS
        levels = np.clip(np.ceil(density * RANDOM_LEVELS - 0.5), 0, RANDOM_LEVELS).astype(np.int64)
        levels = np.where(keep_all, RANDOM_LEVELS, levels)
        cut = torch.from_numpy(levels).to(device=context.device, dtype=torch.int32).unsqueeze(-1)
        mask_args = (stats.fields if stats.fields is not None else stats.keys, cut)
        partial = ~keep_all
        factors = None
        if (partial & rescale[None, :]).any():
            if stats.dare_table is not None:
                table = stats.dare_table
                kept = (
                    table.gather(-1, torch.from_numpy(levels).to(context.device).unsqueeze(-1))
                    .squeeze(-1)
                    .double()
                )
                total = table[..., -1].double()
            else:
                kept = self.kept_l1(context, candidate.inputs, mask_args)
                total = stats.l1
            factors = _rescaled(context, total, kept, partial, rescale)
        return mask_args, factors

    @staticmethod
    def keep(delta: torch.Tensor, index: int, args: MaskArgs) -> torch.Tensor:
        field, cut = args
        # hashed from int32 keys [S, L, 1], or stored: plane `index` of float32 `pack_bytes` words
        if field.dtype == torch.int32:
            levels = random_levels(field[index], delta.shape[-1], delta.device)
        else:
            levels = plane(field, index)
        return levels < cut[index]


class DellaMagprune(_RandomFields):
    """DELLA: keep with a probability that grows with the element's magnitude rank within its row."""

    name = "della"

    def _prepare_fields(
        self, context: MergeContext, group: Group, stats: GroupStats, magnitudes: torch.Tensor
    ) -> None:
        ranks = rank_levels(magnitudes, group.shape)
        if context.hashed_fields:
            stats.ranks = ranks
            return
        levels = self._levels(context, group, stats)
        stats.fields = pack_bytes(torch.stack([levels, ranks.int()], dim=1).flatten(0, 1))
        stats.della_table = della_tables(levels, ranks, magnitudes)

    def masks(
        self, context: MergeContext, candidate: GroupCandidate, density: np.ndarray, rescale: np.ndarray
    ) -> tuple[MaskArgs, torch.Tensor | None]:
        epsilon = context.per_source(candidate.merges, "epsilon", 0.0)
        stats = candidate.stats
        keep_all, keep_none = density >= 1, density <= 0
        partial = ~(keep_all | keep_none)
        # mergekit's check, for a negative epsilon too (where mergekit's bernoulli would fail instead); it
        # also keeps |epsilon| < 0.5, which bounds the kernel's integer terms below 2**25
        spread = np.abs(epsilon)
        invalid = partial & ((density + spread >= 1) | (density - spread <= 0))
        if invalid.any():
            index, row = (int(i[0]) for i in np.nonzero(invalid))
            raise MergerError(
                f"della: epsilon {epsilon[index, row]} with density {density[index, row]} for "
                f"{context.other_names[index]} in {candidate.group.names[row]} leaves density +/- epsilon outside (0, 1)"
            )
        floor, slope = della_terms(np.where(partial, density, 0.5), np.where(partial, epsilon, 0.0))
        floor = np.where(keep_all, DELLA_ALWAYS, np.where(keep_none, -DELLA_ALWAYS, floor))
        slope = np.where(partial, slope, 0.0)
        floor_t, slope_t = (
            torch.from_numpy(value.astype(np.int32)).to(context.device).unsqueeze(-1)
            for value in (floor, slope)
        )
        if stats.fields is not None:
            mask_args: MaskArgs = (stats.fields, floor_t, slope_t)
        else:
            mask_args = (stats.keys, stats.ranks, floor_t, slope_t)
        factors = None
        if (partial & rescale[None, :]).any():
            if stats.della_table is not None:
                counts = della_level_counts(floor_t, slope_t).unsqueeze(-1)
                kept = stats.della_table.gather(-1, counts).squeeze(-1).sum(dim=-1, dtype=torch.float64)
            else:
                kept = self.kept_l1(context, candidate.inputs, mask_args)
            factors = _rescaled(context, stats.l1, kept, partial, rescale)
        return mask_args, factors

    @staticmethod
    def keep(delta: torch.Tensor, index: int, args: MaskArgs) -> torch.Tensor:
        if len(args) == 3:  # `pack_bytes` words [ceil(S / 2), L, n]: planes 2i, 2i + 1 = level, rank level
            words, floor, slope = args
            bits = words[index // 2].view(torch.int32)
            if index % 2 == 0:
                shifted_level = (bits & 0xFF) << LEVEL_SHIFT
                rank = (bits >> 8) & 0xFF
            else:  # the level already sits at bits 16..23
                shifted_level = bits & (0xFF << LEVEL_SHIFT)
                rank = (bits >> 24) & 0xFF
        else:  # int32 keys [S, L, 1] to hash, uint8 rank levels [S, L, n]
            keys, ranks, floor, slope = args
            shifted_level = random_levels(keys[index], delta.shape[-1], delta.device) << LEVEL_SHIFT
            rank = ranks[index].to(torch.int32)
        return shifted_level < floor[index] + rank * slope[index]


# The sparsification methods the kernels implement, by mergekit's name for them.
SPARSIFIERS: dict[SparsificationMethod, type[Sparsifier]] = {
    SparsificationMethod.magnitude: Magnitude,
    SparsificationMethod.magnitude_outliers: MagnitudeOutliers,
    SparsificationMethod.random: Random,
    SparsificationMethod.della_magprune: DellaMagprune,
}
