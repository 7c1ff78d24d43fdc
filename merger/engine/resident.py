"""The search loop's merge engine: sources resident once, each candidate written in place.

One model lives in memory; its parameters are views into one `[layers, elements]` buffer per tensor
kind, so a candidate is one fused kernel call per tensor kind (`methods.py`). What does not change
between candidates is computed once: the sources themselves (task vectors are formed inside the
kernel, where they cost no extra memory traffic), sorted magnitudes for TIES / breadcrumbs thresholds,
DARE / DELLA random fields keyed by run seed (common random numbers; with `fresh_randomness` also by
the candidate's `factory.draw_key`, so any process draws the same masks for the same candidate) and DELLA's
quantized magnitude ranks (bytes packed four per 32-bit word: 1 byte per element and source for DARE,
2 for DELLA), the kept-l1 tables that make DARE / DELLA's l1 rescale a lookup, and slerp's angles.
`streaming=True` keeps only the model and rebuilds those per candidate from the safetensors files
(hashing the random fields inside the kernels, as `fresh_randomness=True` does, and a second pass for
the kept l1).

Source tensors holding NaN or inf are refused as they load: mergekit's results on them are not the
engine's (sorting, thresholds and consensus treat NaN differently), and the engine must never differ
silently from the export.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mergekit.config import MergeConfiguration
from safetensors import safe_open

from merger.common.errors import MergerError
from merger.engine.methods import (
    DELLA_ALWAYS,
    DIVISOR_EPS,
    RANDOM_LEVELS,
    RANK_LEVELS,
    RESIDENT_METHODS,
    KernelCache,
    della_level_counts,
    della_terms,
    make_kept_l1,
    make_task_arithmetic,
    normalized_dot,
    pack_bytes,
    random_levels,
    rescale_factors,
    slerp_coefficients,
    weighted_sum,
)
from merger.engine.plan import LAYER_PATTERN, MergePlan, TensorMerge, layer_index, resolve_plan
from merger.engine.weights import CandidateWeights, check_checkpoint_finite, check_finite

PREFIX_BLOCK = 1024  # block size of the prefix sums over sorted magnitudes (rescaled TIES/breadcrumbs)
AUTO_COMPILE_PARAMETERS = 20_000_000  # compile kernels for models at least this big (when not told)


class Checkpoint:
    """Tensor-by-tensor reads from an HF safetensors directory (single file or sharded)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.path / file for name, file in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise MergerError(f"source {self.path} has no .safetensors weights")
            self.files = {}
            for file in files:
                with safe_open(file, framework="pt") as handle:
                    self.files.update(dict.fromkeys(handle.keys(), file))
        self._handles: dict[Path, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        file = self.files.get(name)
        if file is None:
            raise MergerError(f"source {self.path} has no tensor {name}")
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return tuple(self._handles[file].get_slice(name).get_shape())


@dataclass
class GroupInputs:
    base: torch.Tensor | None  # [layers, elements]
    others: torch.Tensor  # [non-base sources, layers, elements]


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
            "magnitude_order": _nbytes(self.ascending) + _nbytes(self.block_sums),
            "random_keys": _nbytes(self.keys) + _nbytes(self.l1),
            "random_fields": _nbytes(self.fields),
            "dare_tables": _nbytes(self.dare_table),
            "della_ranks": _nbytes(self.ranks),
            "della_tables": _nbytes(self.della_table),
        }
        return {key: value for key, value in sizes.items() if value}


@dataclass
class Group:
    """Every layer's copy of one tensor kind; `output` backs the model's parameters."""

    names: list[str]
    shape: tuple[int, ...]
    output: torch.Tensor  # [layers, elements]
    inputs: GroupInputs | None = None
    stats: GroupStats | None = None
    elements: int = field(init=False)

    def __post_init__(self) -> None:
        self.elements = math.prod(self.shape)


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def _stable_seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _group_key(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    return LAYER_PATTERN.sub(".layers.*.", name), shape


class ResidentEngine(CandidateWeights):
    def __init__(
        self,
        sources: Mapping[str, Path],
        base: str | None,
        method: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        seed: int = 0,
        fresh_randomness: bool = False,
        streaming: bool = False,
        compile_kernels: bool | None = None,
    ) -> None:
        if method not in RESIDENT_METHODS:
            raise MergerError(
                f"merge method {method!r} has no resident kernel; use one of {', '.join(RESIDENT_METHODS)}"
            )
        self.method = method
        self.traits = RESIDENT_METHODS[method]
        if self.traits.needs_base and base is None:
            raise MergerError(f"merge method {method} needs a base model")
        if base is not None and base not in sources:
            raise MergerError(f"base model {base!r} is not one of the sources ({', '.join(sources)})")
        if not sources:
            raise MergerError("the engine needs at least one source")
        self.dtype = dtype
        self.device = torch.device(device)
        self.seed = seed
        self.fresh_randomness = fresh_randomness
        self.streaming = streaming
        self.base_name = base
        self.other_names = [name for name in sources if name != base]
        self.checkpoints = {name: Checkpoint(Path(path)) for name, path in sources.items()}
        self.names_by_path = {str(path): name for name, path in sources.items()}
        first = base if base is not None else next(iter(sources))
        self.model = self._build_model(Path(sources[first]))
        self.num_layers = int(self.model.config.num_hidden_layers)
        self.tensor_names = self._covered_tensors(self.checkpoints[first])
        self._check_sources_match()
        self.groups = self._build_groups()
        total = sum(group.output.numel() for group in self.groups)
        if compile_kernels is None:
            compile_kernels = total >= AUTO_COMPILE_PARAMETERS
        _raise_recompile_limit()
        self.kernels = KernelCache(compile_kernels)
        with torch.no_grad():
            if streaming:  # sources are read per candidate; checked once here
                for name, path in sources.items():
                    check_checkpoint_finite(name, Path(path))
            else:
                for group in self.groups:
                    group.inputs = self._read_inputs(group, check=True)
                    group.stats = self._prepare(group, group.inputs, draw=0)
            self.load_source(first)

    # ---- construction -------------------------------------------------------------------------

    def _build_model(self, path: Path) -> Any:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path)
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # older transformers
            from transformers.modeling_utils import no_init_weights
        with no_init_weights(), torch.device(self.device):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        model.tie_weights()  # skipped under no_init_weights
        model.eval()
        model.requires_grad_(False)
        return model

    def _covered_tensors(self, checkpoint: Checkpoint) -> list[str]:
        parameters = dict(self.model.named_parameters())
        names = [name for name in parameters if name in checkpoint.files]
        missing = sorted(set(parameters) - set(names))
        if missing:
            raise MergerError(
                f"checkpoint {checkpoint.path} lacks model parameter {missing[0]} (and {len(missing) - 1} more)"
            )
        return names

    def _check_sources_match(self) -> None:
        reference = self.checkpoints[self.base_name or next(iter(self.checkpoints))]
        for name, checkpoint in self.checkpoints.items():
            for tensor in self.tensor_names:
                if tensor not in checkpoint.files:
                    raise MergerError(f"source {name} has no tensor {tensor}")
                if checkpoint.shape(tensor) != reference.shape(tensor):
                    raise MergerError(
                        f"source {name}: {tensor} has shape {checkpoint.shape(tensor)}, "
                        f"expected {reference.shape(tensor)}"
                    )

    def _build_groups(self) -> list[Group]:
        parameters = dict(self.model.named_parameters())
        by_key: dict[tuple[str, tuple[int, ...]], list[str]] = {}
        for name in self.tensor_names:
            by_key.setdefault(_group_key(name, tuple(parameters[name].shape)), []).append(name)
        groups = []
        for (_, shape), names in by_key.items():
            names.sort(key=lambda n: layer_index(n) or 0)
            output = torch.empty((len(names), math.prod(shape)), dtype=self.dtype, device=self.device)
            for row, name in enumerate(names):
                parameters[name].data = output[row].view(shape)
            groups.append(Group(names=names, shape=shape, output=output))
        return groups

    def _read_source(self, source: str, group: Group, into: torch.Tensor, check: bool = False) -> None:
        for row, name in enumerate(group.names):
            tensor = self.checkpoints[source].get(name)
            if check:
                check_finite(source, name, tensor)
            into[row].copy_(tensor.reshape(-1))

    def _read_inputs(self, group: Group, check: bool = False) -> GroupInputs:
        size = (len(group.names), group.elements)
        base = None
        if self.base_name is not None:
            base = torch.empty(size, dtype=self.dtype, device=self.device)
            self._read_source(self.base_name, group, base, check)
        others = torch.empty((len(self.other_names), *size), dtype=self.dtype, device=self.device)
        for index, source in enumerate(self.other_names):
            self._read_source(source, group, others[index], check)
        return GroupInputs(base=base, others=others)

    def _prepare(self, group: Group, inputs: GroupInputs, draw: int) -> GroupStats:
        """The group's per-candidate constants for this engine's method."""
        traits = self.traits
        stats = GroupStats()
        if traits.family == "slerp":
            stats.dots = [
                [
                    normalized_dot(inputs.base[row], inputs.others[index, row])
                    for row in range(len(group.names))
                ]
                for index in range(len(self.other_names))
            ]
        kind = traits.sparsification
        if kind is None:
            return stats
        magnitudes = (inputs.others - inputs.base).abs()
        if kind in ("magnitude", "outliers"):
            stats.ascending = torch.sort(magnitudes, dim=-1).values
            stats.block_sums = _block_prefix_sums(stats.ascending)
        if kind in ("random", "della"):
            stats.keys = self._random_keys(group, draw)
            stats.l1 = magnitudes.sum(dim=-1, dtype=torch.float64)
        ranks = _rank_levels(magnitudes, group.shape) if kind == "della" else None
        if kind in ("random", "della") and (self.streaming or self.fresh_randomness):
            stats.ranks = ranks
        elif kind in ("random", "della"):
            levels = torch.stack([random_levels(key, group.elements, self.device) for key in stats.keys])
            if ranks is None:
                stats.fields = pack_bytes(levels)
                stats.dare_table = _dare_tables(levels, magnitudes)
            else:
                stats.fields = pack_bytes(torch.stack([levels, ranks.int()], dim=1).flatten(0, 1))
                stats.della_table = _della_tables(levels, ranks, magnitudes)
        return stats

    def _random_keys(self, group: Group, draw: int) -> torch.Tensor:
        """Per (run seed, source, tensor, draw): identical in resident and streaming mode."""
        keys = [
            [_stable_seed(self.seed, source, name, draw) & 0xFFFFFFFF for name in group.names]
            for source in self.other_names
        ]
        as_int32 = np.array(keys, dtype=np.uint32).view(np.int32)
        return torch.from_numpy(as_int32).to(self.device).unsqueeze(-1)

    # ---- public interface ---------------------------------------------------------------------

    def load_source(self, name: str) -> None:
        """Write one source's own weights into the model."""
        if name not in self.checkpoints:
            raise MergerError(f"unknown source {name!r}; sources are {', '.join(self.checkpoints)}")
        with torch.no_grad():
            for group in self.groups:
                if group.inputs is None:
                    self._read_source(name, group, group.output)
                elif name == self.base_name:
                    group.output.copy_(group.inputs.base)
                else:
                    group.output.copy_(group.inputs.others[self.other_names.index(name)])

    def resident_bytes(self) -> dict[str, int]:
        """Bytes held: the model, each source's resident tensors, each precomputed structure."""
        sizes: dict[str, int] = {"model": sum(_nbytes(group.output) for group in self.groups)}
        for name in self.checkpoints:
            sizes[f"source:{name}"] = 0
        for group in self.groups:
            if group.inputs is not None:
                if self.base_name is not None:
                    sizes[f"source:{self.base_name}"] += _nbytes(group.inputs.base)
                per_source = _nbytes(group.inputs.others) // max(1, len(self.other_names))
                for name in self.other_names:
                    sizes[f"source:{name}"] += per_source
            if group.stats is not None:
                for key, value in group.stats.nbytes().items():
                    sizes[key] = sizes.get(key, 0) + value
        sizes["total"] = sum(sizes.values())
        return sizes

    def apply_config(self, config: MergeConfiguration, draw: int = 0) -> None:
        """Write the candidate of a mergekit config (its model paths: this engine's sources) in place."""
        self.apply(resolve_plan(config, self.tensor_names, self.names_by_path, self.num_layers), draw)

    def apply(self, plan: MergePlan, draw: int = 0) -> None:
        """Write the candidate described by `plan` into the model's parameters in place.

        With `fresh_randomness`, DARE / DELLA masks are keyed by `draw` (`factory.draw_key`): the same plan
        and draw give the same weights in any process, in any order; otherwise every candidate has draw 0.
        """
        self._check_plan(plan)
        draw = draw if self.fresh_randomness else 0
        with torch.no_grad():
            for group in self.groups:
                if group.inputs is None:
                    inputs = self._read_inputs(group)
                    stats = self._prepare(group, inputs, draw)
                else:
                    inputs, stats = group.inputs, group.stats
                    if self.fresh_randomness and stats.keys is not None:
                        stats.keys = self._random_keys(group, draw)
                self._merge_group(group, inputs, stats, [plan.tensors[name] for name in group.names])

    def _check_plan(self, plan: MergePlan) -> None:
        if plan.method != self.method:
            raise MergerError(
                f"plan is for merge method {plan.method}, the engine was built for {self.method}"
            )
        if self.traits.needs_base and plan.base != self.base_name:
            raise MergerError(f"plan's base model is {plan.base}, the engine's is {self.base_name}")
        missing = [name for name in self.tensor_names if name not in plan.tensors]
        if missing:
            raise MergerError(f"plan does not cover tensor {missing[0]} (and {len(missing) - 1} more)")
        known = set(self.checkpoints)
        for name, merge in plan.tensors.items():
            unknown = set(merge.per_source) - known
            if unknown:
                raise MergerError(f"plan for {name} uses unknown source {sorted(unknown)[0]!r}")

    # ---- per-candidate math -------------------------------------------------------------------

    def _scalars(self, values: np.ndarray) -> torch.Tensor:
        """[...] host values -> [..., 1] tensor on the device, in the kernels' scalar dtype."""
        dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        return (
            torch.from_numpy(np.ascontiguousarray(values)).to(device=self.device, dtype=dtype).unsqueeze(-1)
        )

    def _per_source(self, merges: list[TensorMerge], key: str, inactive: float) -> np.ndarray:
        """[S, L] values of a per-source parameter; `inactive` where a source is not in a tensor's inputs."""
        table = np.full((len(self.other_names), len(merges)), inactive, dtype=np.float64)
        for row, merge in enumerate(merges):
            for index, source in enumerate(self.other_names):
                values = merge.per_source.get(source)
                if values is not None and key in values:
                    table[index, row] = float(values[key])
        return table

    @staticmethod
    def _shared(merges: list[TensorMerge], key: str, default: float) -> np.ndarray:
        return np.array([float(merge.shared.get(key, default)) for merge in merges], dtype=np.float64)

    def _merge_group(
        self, group: Group, inputs: GroupInputs, stats: GroupStats, merges: list[TensorMerge]
    ) -> None:
        family = self.traits.family
        if family == "linear":
            self._linear(group, inputs, merges)
        elif family == "slerp":
            self._slerp(group, inputs, stats, merges)
        else:
            self._task_arithmetic(group, inputs, stats, merges)

    def _linear(self, group: Group, inputs: GroupInputs, merges: list[TensorMerge]) -> None:
        weights = self._per_source(merges, "weight", 0.0)
        base_weights = np.zeros(len(merges))
        if self.base_name is not None:
            for row, merge in enumerate(merges):
                base_weights[row] = float(merge.per_source.get(self.base_name, {}).get("weight", 0.0))
        normalize = self._shared(merges, "normalize", 1.0) > 0
        totals = weights.sum(axis=0) + base_weights
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(normalize, 1.0 / totals, 1.0)
        self.kernels.call(
            "weighted_sum",
            lambda: weighted_sum,
            group.output,
            inputs.base,
            inputs.others,
            self._scalars(base_weights * scale),
            self._scalars(weights * scale),
        )

    def _slerp(self, group: Group, inputs: GroupInputs, stats: GroupStats, merges: list[TensorMerge]) -> None:
        active = np.zeros((len(self.other_names), len(merges)))
        for row, merge in enumerate(merges):
            for index, source in enumerate(self.other_names):
                active[index, row] = float(source in merge.per_source)
        t = self._shared(merges, "t", 0.0)
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
                base_coefs[row], coefs[index, row] = slerp_coefficients(float(t[row]), stats.dots[index][row])
        self.kernels.call(
            "weighted_sum",
            lambda: weighted_sum,
            group.output,
            inputs.base,
            inputs.others,
            self._scalars(base_coefs),
            self._scalars(coefs),
        )

    def _task_arithmetic(
        self, group: Group, inputs: GroupInputs, stats: GroupStats, merges: list[TensorMerge]
    ) -> None:
        traits = self.traits
        kind = traits.sparsification
        weights = self._per_source(merges, "weight", 0.0)
        density = self._per_source(merges, "density", 1.0)
        lam = self._shared(merges, "lambda", 1.0)
        normalize = self._shared(merges, "normalize", 0.0) > 0
        rescale = self._shared(merges, "rescale", 0.0) > 0
        if traits.consensus:
            divisor = normalize.astype(np.float64)
        else:
            # mergekit sums the weights in the tensors' dtype before guarding against zero
            totals = weights.astype(np.float32).sum(axis=0, dtype=np.float32).astype(np.float64)
            divisor = np.where(normalize & (np.abs(totals) >= DIVISOR_EPS), totals, 1.0)
        mask_args: tuple[torch.Tensor, ...] = ()
        factors = None
        if kind == "magnitude":
            mask_args, factors = self._magnitude_masks(group, stats, density, rescale)
        elif kind == "outliers":
            gamma = self._per_source(merges, "gamma", 0.0)
            mask_args, factors = self._outlier_masks(group, stats, density, gamma, rescale)
        elif kind == "random":
            mask_args, factors = self._random_masks(inputs, stats, density, rescale)
        elif kind == "della":
            epsilon = self._per_source(merges, "epsilon", 0.0)
            mask_args, factors = self._della_masks(group, inputs, stats, density, epsilon, rescale)
        weights_t = self._scalars(weights)
        coefs = weights_t if factors is None else weights_t * factors.to(weights_t.dtype).unsqueeze(-1)
        self.kernels.call(
            f"task_arithmetic:{kind}:{traits.consensus}",
            lambda: make_task_arithmetic(kind, traits.consensus),
            group.output,
            inputs.base,
            inputs.others,
            coefs,
            weights_t,
            self._scalars(divisor),
            self._scalars(lam),
            *mask_args,
        )

    def _rescaled(
        self, stats_l1: torch.Tensor, kept: torch.Tensor, partial: np.ndarray, rescale: np.ndarray
    ) -> torch.Tensor:
        """[S, L] multipliers: the l1 rescale where a tensor is rescaled and actually sparsified, else 1."""
        factors = rescale_factors(stats_l1, kept)
        applies = torch.from_numpy(partial & rescale[None, :]).to(self.device)
        return torch.where(applies, factors, torch.ones_like(factors))

    def _magnitude_masks(
        self, group: Group, stats: GroupStats, density: np.ndarray, rescale: np.ndarray
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        n = group.elements
        keep_all, keep_none = density >= 1, density <= 0
        partial = ~(keep_all | keep_none)
        counts = np.where(partial, np.maximum(1, (density * n).astype(np.int64)), 1)
        # Python's int(density * n) truncates exactly like mergekit; numpy's astype does too for positives
        positions = torch.from_numpy(np.clip(n - counts, 0, n - 1)).to(self.device).unsqueeze(-1)
        threshold = stats.ascending.gather(-1, positions)
        threshold = _where_flag(keep_all, -math.inf, threshold, self.device)
        threshold = _where_flag(keep_none, math.nan, threshold, self.device)
        factors = None
        if (partial & rescale[None, :]).any():
            kept = _suffix_l1(stats, torch.nan_to_num(threshold, nan=0.0))
            factors = self._rescaled(_total_l1(stats), kept, partial, rescale)
        return (threshold,), factors

    def _outlier_masks(
        self, group: Group, stats: GroupStats, density: np.ndarray, gamma: np.ndarray, rescale: np.ndarray
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        n = group.elements
        keep_all = density >= 1
        target = np.trunc(density * n).astype(np.int64)
        top = np.trunc(gamma * n).astype(np.int64)
        bottom = np.maximum(0, n - target - top)
        keep_none = ~keep_all & (target <= 0)
        partial = ~(keep_all | keep_none)
        # clipped so that out-of-range gamma (negative) cannot index past the tensor
        low_pos = np.clip(np.where(partial, bottom, 0), 0, n - 1)
        high_pos = np.clip(np.where(partial, bottom + target - 1, 0), 0, n - 1)
        low = stats.ascending.gather(-1, torch.from_numpy(low_pos).to(self.device).unsqueeze(-1))
        high = stats.ascending.gather(-1, torch.from_numpy(high_pos).to(self.device).unsqueeze(-1))
        low = _where_flag(keep_all, -math.inf, low, self.device)
        high = _where_flag(keep_all, math.inf, high, self.device)
        low = _where_flag(keep_none, math.nan, low, self.device)
        factors = None
        if (partial & rescale[None, :]).any():
            upto_high = _prefix_l1(stats, _searchsorted(stats, high, right=True))
            below_low = _prefix_l1(stats, _searchsorted(stats, torch.nan_to_num(low, nan=0.0), right=False))
            factors = self._rescaled(_total_l1(stats), upto_high - below_low, partial, rescale)
        return (low, high), factors

    def _random_masks(
        self, inputs: GroupInputs, stats: GroupStats, density: np.ndarray, rescale: np.ndarray
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        keep_all = density >= 1
        # keep where (level + 0.5) / RANDOM_LEVELS < density: a keep probability of levels / RANDOM_LEVELS
        levels = np.clip(np.ceil(density * RANDOM_LEVELS - 0.5), 0, RANDOM_LEVELS).astype(np.int64)
        levels = np.where(keep_all, RANDOM_LEVELS, levels)
        cut = torch.from_numpy(levels).to(device=self.device, dtype=torch.int32).unsqueeze(-1)
        mask_args = (stats.fields if stats.fields is not None else stats.keys, cut)
        partial = ~keep_all
        factors = None
        if (partial & rescale[None, :]).any():
            if stats.dare_table is not None:
                table = stats.dare_table
                kept = (
                    table.gather(-1, torch.from_numpy(levels).to(self.device).unsqueeze(-1))
                    .squeeze(-1)
                    .double()
                )
                total = table[..., -1].double()
            else:
                kept = self._kept_l1("random", inputs, mask_args)
                total = stats.l1
            factors = self._rescaled(total, kept, partial, rescale)
        return mask_args, factors

    def _della_masks(
        self,
        group: Group,
        inputs: GroupInputs,
        stats: GroupStats,
        density: np.ndarray,
        epsilon: np.ndarray,
        rescale: np.ndarray,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
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
                f"{self.other_names[index]} in {group.names[row]} leaves density +/- epsilon outside (0, 1)"
            )
        floor, slope = della_terms(np.where(partial, density, 0.5), np.where(partial, epsilon, 0.0))
        floor = np.where(keep_all, DELLA_ALWAYS, np.where(keep_none, -DELLA_ALWAYS, floor))
        slope = np.where(partial, slope, 0.0)
        floor_t, slope_t = (
            torch.from_numpy(value.astype(np.int32)).to(self.device).unsqueeze(-1) for value in (floor, slope)
        )
        if stats.fields is not None:
            mask_args: tuple[torch.Tensor, ...] = (stats.fields, floor_t, slope_t)
        else:
            mask_args = (stats.keys, stats.ranks, floor_t, slope_t)
        factors = None
        if (partial & rescale[None, :]).any():
            if stats.della_table is not None:
                counts = della_level_counts(floor_t, slope_t).unsqueeze(-1)
                kept = stats.della_table.gather(-1, counts).squeeze(-1).sum(dim=-1, dtype=torch.float64)
            else:
                kept = self._kept_l1("della", inputs, mask_args)
            factors = self._rescaled(stats.l1, kept, partial, rescale)
        return mask_args, factors

    def _kept_l1(self, kind: str, inputs: GroupInputs, mask_args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.kernels.call(
            f"kept_l1:{kind}", lambda: make_kept_l1(kind), inputs.base, inputs.others, *mask_args
        )


# ---- precomputed structures ------------------------------------------------------------------------


def _where_flag(flags: np.ndarray, value: float, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not flags.any():
        return tensor
    mask = torch.from_numpy(flags).to(device).unsqueeze(-1)
    return torch.where(mask, torch.full_like(tensor, value), tensor)


def _block_prefix_sums(ascending: torch.Tensor) -> torch.Tensor:
    """[..., blocks + 1] float64: sum of ascending[..., :b * PREFIX_BLOCK] for each block start b."""
    n = ascending.shape[-1]
    blocks = -(-n // PREFIX_BLOCK)
    padded = torch.nn.functional.pad(ascending.double(), (0, blocks * PREFIX_BLOCK - n))
    sums = padded.reshape(*ascending.shape[:-1], blocks, PREFIX_BLOCK).sum(dim=-1).cumsum(dim=-1)
    return torch.nn.functional.pad(sums, (1, 0))


def _prefix_l1(stats: GroupStats, positions: torch.Tensor) -> torch.Tensor:
    """[S, L] float64: sum of the `positions` smallest magnitudes (positions: [S, L, 1] int64)."""
    ascending = stats.ascending
    n = ascending.shape[-1]
    block = positions // PREFIX_BLOCK
    head = stats.block_sums.gather(-1, block).squeeze(-1)
    offsets = block * PREFIX_BLOCK + torch.arange(PREFIX_BLOCK, device=ascending.device)
    window = ascending.gather(-1, offsets.clamp(max=n - 1)).double()
    return head + torch.where(offsets < positions, window, 0.0).sum(dim=-1)


def _total_l1(stats: GroupStats) -> torch.Tensor:
    n = stats.ascending.shape[-1]
    full = torch.full((*stats.ascending.shape[:-1], 1), n, dtype=torch.int64, device=stats.ascending.device)
    return _prefix_l1(stats, full)


def _searchsorted(stats: GroupStats, values: torch.Tensor, right: bool) -> torch.Tensor:
    return torch.searchsorted(stats.ascending, values.to(stats.ascending.dtype).contiguous(), right=right)


def _suffix_l1(stats: GroupStats, threshold: torch.Tensor) -> torch.Tensor:
    """[S, L]: the l1 of magnitudes >= threshold."""
    return _total_l1(stats) - _prefix_l1(stats, _searchsorted(stats, threshold, right=False))


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


def _dare_tables(levels: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """[S, L, 257]: for each level, the l1 of magnitudes whose random level lies below it."""
    layers = magnitudes.shape[1]
    return torch.stack(
        [
            _cumulative_l1(levels[index].long(), magnitudes[index], layers, RANDOM_LEVELS)[:, 0]
            for index in range(magnitudes.shape[0])
        ]
    )


def _della_tables(levels: torch.Tensor, ranks: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
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


def _rank_levels(magnitudes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
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


def _raise_recompile_limit() -> None:
    """Each kernel meets a few shapes (layers, L=1 embeddings); keep dynamo from giving up on them."""
    config = torch._dynamo.config
    for attribute in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, attribute) and getattr(config, attribute) < 64:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                setattr(config, attribute, 64)
