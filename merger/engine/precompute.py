"""What the resident engine computes once per group, before any candidate: the structures that turn a
candidate's sparsification and l1 rescale into lookups.

- sorted magnitudes and their block prefix sums (TIES / breadcrumbs thresholds, kept l1 by bisection);
- DARE's and DELLA's kept-l1 tables by random level (and DELLA's by rank level too);
- DELLA's quantized magnitude ranks.
Which of them a method needs is its sparsifier's choice (`sparsify.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merger.common.errors import MergerError
from merger.engine.kernels import RANDOM_LEVELS, RANK_LEVELS

PREFIX_BLOCK = 1024  # block size of the prefix sums over sorted magnitudes (rescaled TIES/breadcrumbs)


def nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


@dataclass
class GroupStats:
    """Per-candidate constants of one group; any field a method does not need stays None."""

    ascending: torch.Tensor | None = None  # |task vector| sorted ascending, [S, L, n]
    block_sums: torch.Tensor | None = None  # float64 prefix sums of `ascending` at block starts
    l1: torch.Tensor | None = None  # float64 [S, L]: l1 norm of each task vector (DARE / DELLA rescale)
    keys: torch.Tensor | None = None  # int32 [S, L, 1]: random-field keys
    # `pack_bytes` words: DARE [ceil(S / 4), L, n] a level per source, DELLA [ceil(S / 2), L, n] a level and a
    # rank level per source; None where the kernels hash the levels from `keys`
    fields: torch.Tensor | None = None
    dare_table: torch.Tensor | None = None  # [S, L, 257]: l1 of |task vector| where random level < index
    ranks: torch.Tensor | None = None  # DELLA with hashed levels: uint8 [S, L, n] rank levels
    della_table: torch.Tensor | None = None  # [S, L, 256, 257]: l1 where rank level = r, random level < index
    dots: list[list[float]] | None = None  # slerp: normalized dot(base, source), [S][L]

    def nbytes(self) -> dict[str, int]:
        sizes = {
            "magnitude_order": nbytes(self.ascending) + nbytes(self.block_sums),
            "random_keys": nbytes(self.keys) + nbytes(self.l1),
            "random_fields": nbytes(self.fields),
            "dare_tables": nbytes(self.dare_table),
            "della_ranks": nbytes(self.ranks),
            "della_tables": nbytes(self.della_table),
        }
        return {key: value for key, value in sizes.items() if value}


# ---- sorted magnitudes ------------------------------------------------------------------------------


def block_prefix_sums(ascending: torch.Tensor) -> torch.Tensor:
    """[..., blocks + 1] float64: sum of ascending[..., :b * PREFIX_BLOCK] for each block start b."""
    n = ascending.shape[-1]
    blocks = -(-n // PREFIX_BLOCK)
    padded = torch.nn.functional.pad(ascending.double(), (0, blocks * PREFIX_BLOCK - n))
    sums = padded.reshape(*ascending.shape[:-1], blocks, PREFIX_BLOCK).sum(dim=-1).cumsum(dim=-1)
    return torch.nn.functional.pad(sums, (1, 0))


def prefix_l1(stats: GroupStats, positions: torch.Tensor) -> torch.Tensor:
    """[S, L] float64: sum of the `positions` smallest magnitudes (positions: [S, L, 1] int64)."""
    ascending = stats.ascending
    n = ascending.shape[-1]
    block = positions // PREFIX_BLOCK
    head = stats.block_sums.gather(-1, block).squeeze(-1)
    offsets = block * PREFIX_BLOCK + torch.arange(PREFIX_BLOCK, device=ascending.device)
    window = ascending.gather(-1, offsets.clamp(max=n - 1)).double()
    return head + torch.where(offsets < positions, window, 0.0).sum(dim=-1)


def total_l1(stats: GroupStats) -> torch.Tensor:
    n = stats.ascending.shape[-1]
    full = torch.full((*stats.ascending.shape[:-1], 1), n, dtype=torch.int64, device=stats.ascending.device)
    return prefix_l1(stats, full)


def searchsorted(stats: GroupStats, values: torch.Tensor, right: bool) -> torch.Tensor:
    return torch.searchsorted(stats.ascending, values.to(stats.ascending.dtype).contiguous(), right=right)


def suffix_l1(stats: GroupStats, threshold: torch.Tensor) -> torch.Tensor:
    """[S, L]: the l1 of magnitudes >= threshold."""
    return total_l1(stats) - prefix_l1(stats, searchsorted(stats, threshold, right=False))


# ---- kept-l1 tables by random level ------------------------------------------------------------------


def _cumulative_l1(
    cells: torch.Tensor, magnitudes: torch.Tensor, layers: int, per_layer: int
) -> torch.Tensor:
    """[layers, per_layer / 256, 257] float32: l1 of `magnitudes` by cell, cumulated over the last 256 cells."""
    row_offsets = torch.arange(layers, device=magnitudes.device).unsqueeze(-1) * per_layer
    sums = torch.bincount(
        (cells + row_offsets).reshape(-1),
        weights=magnitudes.reshape(-1).double(),
        minlength=layers * per_layer,
    )
    cumulative = sums.reshape(layers, -1, RANDOM_LEVELS).cumsum(dim=-1)
    return torch.nn.functional.pad(cumulative, (1, 0)).to(torch.float32)


def dare_tables(levels: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """[S, L, 257]: for each level, the l1 of magnitudes whose random level lies below it."""
    layers = magnitudes.shape[1]
    return torch.stack(
        [
            _cumulative_l1(levels[index].long(), magnitudes[index], layers, RANDOM_LEVELS)[:, 0]
            for index in range(magnitudes.shape[0])
        ]
    )


def della_tables(levels: torch.Tensor, ranks: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """[S, L, 256, 257]: per rank level r and random level u, the l1 of magnitudes in cells (r, < u)."""
    layers = magnitudes.shape[1]
    per_layer = RANK_LEVELS * RANDOM_LEVELS
    return torch.stack(
        [
            _cumulative_l1(
                ranks[index].long() * RANDOM_LEVELS + levels[index].long(),
                magnitudes[index],
                layers,
                per_layer,
            )
            for index in range(magnitudes.shape[0])
        ]
    )


def rank_levels(magnitudes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """DELLA's ranks, uint8: round(255 * ascending position / (row length - 1)) within each row (dim 1;
    a 1-D tensor is one row), so a row's smallest magnitude has 0 and its largest 255, like mergekit's
    rank normalization."""
    if len(shape) > 2:
        raise MergerError(f"della ranks rows of 1-D or 2-D tensors; got shape {shape}")
    row_length = shape[-1]
    span = max(1, row_length - 1)
    positions = torch.arange(row_length, device=magnitudes.device)
    rounded = torch.div(positions * (2 * (RANK_LEVELS - 1)) + span, 2 * span, rounding_mode="floor").to(
        torch.uint8
    )
    levels = torch.empty(magnitudes.shape, dtype=torch.uint8, device=magnitudes.device)
    for index in range(magnitudes.shape[0]):  # one source at a time bounds the argsort's int64 scratch
        rows = magnitudes[index].reshape(-1, row_length)
        order = torch.argsort(rows, dim=-1)
        target = levels[index].view(-1, row_length)
        target.scatter_(-1, order, rounded.expand_as(rows))
    return levels
