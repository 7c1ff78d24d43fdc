"""What a merge method needs of the resident engine to write one group: where tensors live, which sources
there are, the kernels, and a candidate's parameters as per-source and shared tables."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from merger.engine.buffers import Group, GroupInputs
from merger.engine.kernels import KernelCache
from merger.engine.plan import TensorMerge
from merger.engine.precompute import GroupStats


def stable_seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class GroupCandidate:
    """One group of one candidate: where it is written, what it is made of, and its plan per layer."""

    group: Group
    inputs: GroupInputs
    stats: GroupStats
    merges: list[TensorMerge]  # one per layer of the group


@dataclass(frozen=True)
class MergeContext:
    device: torch.device
    dtype: torch.dtype
    seed: int
    base_name: str | None
    other_names: list[str]  # the non-base sources, in the order of `GroupInputs.others`
    kernels: KernelCache
    # streaming or fresh randomness: the kernels hash DARE / DELLA's random levels instead of storing them
    hashed_fields: bool

    def scalars(self, values: np.ndarray) -> torch.Tensor:
        """[...] host values -> [..., 1] tensor on the device, in the kernels' scalar dtype."""
        dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        return (
            torch.from_numpy(np.ascontiguousarray(values)).to(device=self.device, dtype=dtype).unsqueeze(-1)
        )

    def per_source(self, merges: list[TensorMerge], key: str, inactive: float) -> np.ndarray:
        """[S, L] values of a per-source parameter; `inactive` where a source is not in a tensor's inputs."""
        table = np.full((len(self.other_names), len(merges)), inactive, dtype=np.float64)
        for row, merge in enumerate(merges):
            for index, source in enumerate(self.other_names):
                values = merge.per_source.get(source)
                if values is not None and key in values:
                    table[index, row] = float(values[key])
        return table

    @staticmethod
    def shared(merges: list[TensorMerge], key: str, default: float) -> np.ndarray:
        return np.array([float(merge.shared.get(key, default)) for merge in merges], dtype=np.float64)

    def random_keys(self, names: list[str], draw: int) -> torch.Tensor:
        """int32 [S, L, 1] random-field keys per (run seed, source, tensor, draw): identical in resident and
        streaming mode."""
        keys = [
            [stable_seed(self.seed, source, name, draw) & 0xFFFFFFFF for name in names]
            for source in self.other_names
        ]
        as_int32 = np.array(keys, dtype=np.uint32).view(np.int32)
        return torch.from_numpy(as_int32).to(self.device).unsqueeze(-1)
