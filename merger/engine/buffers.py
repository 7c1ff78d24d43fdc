"""The resident engine's memory layout: one `[layers, elements]` buffer per tensor kind ("group").

The model's parameters are views into the groups' output buffers, so writing a candidate is one kernel call
per group; a group's sources are stacked the same way (`GroupInputs`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from merger.engine.checkpoint import Checkpoint
from merger.engine.plan import LAYER_PATTERN, layer_index
from merger.engine.precompute import GroupStats
from merger.engine.weights import check_finite


@dataclass
class GroupInputs:
    base: torch.Tensor | None  # [layers, elements]
    others: torch.Tensor  # [non-base sources, layers, elements]


@dataclass
class Group:
    """Every layer's copy of one tensor kind; `output` backs the model's parameters."""

    names: list[str]
    shape: tuple[int, ...]
    output: torch.Tensor  # [layers, elements]
    inputs: GroupInputs | None = None  # None when streaming: read per candidate
    stats: GroupStats | None = None
    elements: int = field(init=False)

    def __post_init__(self) -> None:
        self.elements = math.prod(self.shape)


def _group_key(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    return LAYER_PATTERN.sub(".layers.*.", name), shape


def build_groups(
    parameters: Mapping[str, torch.nn.Parameter],
    tensor_names: list[str],
    dtype: torch.dtype,
    device: torch.device,
) -> list[Group]:
    """Group `tensor_names` by kind and shape, and make each parameter a view of its group's row."""
    by_key: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for name in tensor_names:
        by_key.setdefault(_group_key(name, tuple(parameters[name].shape)), []).append(name)
    groups = []
    for (_, shape), names in by_key.items():
        names.sort(key=lambda n: layer_index(n) or 0)
        output = torch.empty((len(names), math.prod(shape)), dtype=dtype, device=device)
        for row, name in enumerate(names):
            parameters[name].data = output[row].view(shape)
        groups.append(Group(names=names, shape=shape, output=output))
    return groups


def read_source(
    checkpoint: Checkpoint, source: str, group: Group, into: torch.Tensor, check: bool = False
) -> None:
    """Copy a source's tensors of `group` into `into` [layers, elements]; with `check`, refuse NaN / inf."""
    for row, name in enumerate(group.names):
        tensor = checkpoint.get(name)
        if check:
            check_finite(source, name, tensor)
        into[row].copy_(tensor.reshape(-1))


def read_inputs(
    checkpoints: Mapping[str, Checkpoint],
    base_name: str | None,
    other_names: list[str],
    group: Group,
    dtype: torch.dtype,
    device: torch.device,
    check: bool = False,
) -> GroupInputs:
    """A group's base and non-base sources, stacked."""
    size = (len(group.names), group.elements)
    base = None
    if base_name is not None:
        base = torch.empty(size, dtype=dtype, device=device)
        read_source(checkpoints[base_name], base_name, group, base, check)
    others = torch.empty((len(other_names), *size), dtype=dtype, device=device)
    for index, source in enumerate(other_names):
        read_source(checkpoints[source], source, group, others[index], check)
    return GroupInputs(base=base, others=others)
