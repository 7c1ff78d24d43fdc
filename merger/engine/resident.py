"""The search loop's merge engine: sources resident once, each candidate written in place.

One model lives in memory; its parameters are views into one `[layers, elements]` buffer per tensor
kind (`buffers.py`), so a candidate is one fused kernel call per tensor kind (`kernels.py`), chosen by the
method's object in the registry (`methods.RESIDENT_METHODS`). What does not change between candidates is
computed once by that object (`precompute.py`, `sparsify.py`): the sources themselves (task vectors are
formed inside the kernel, where they cost no extra memory traffic), sorted magnitudes for TIES /
breadcrumbs thresholds, DARE / DELLA random fields keyed by run seed (common random numbers; with
`fresh_randomness` also by the candidate's `factory.draw_key`, so any process draws the same masks for the
same candidate) and DELLA's quantized magnitude ranks (bytes packed four per 32-bit word: 1 byte per element
and source for DARE, 2 for DELLA), the kept-l1 tables that make DARE / DELLA's l1 rescale a lookup, and
slerp's angles. `streaming=True` keeps only the model and rebuilds those per candidate from the safetensors
files (hashing the random fields inside the kernels, as `fresh_randomness=True` does, and a second pass for
the kept l1).

Source tensors holding NaN or inf are refused as they load: mergekit's results on them are not the
engine's (sorting, thresholds and consensus treat NaN differently), and the engine must never differ
silently from the export.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from mergekit.config import MergeConfiguration

from merger.common.errors import MergerError
from merger.engine.buffers import Group, GroupInputs, build_groups, read_inputs, read_source
from merger.engine.checkpoint import Checkpoint
from merger.engine.context import GroupCandidate, MergeContext
from merger.engine.kernels import KernelCache, raise_recompile_limit
from merger.engine.methods import RESIDENT_METHODS
from merger.engine.plan import MergePlan, resolve_plan
from merger.engine.precompute import GroupStats, nbytes
from merger.engine.weights import CandidateWeights, check_checkpoint_finite

AUTO_COMPILE_PARAMETERS = 20_000_000  # compile kernels for models at least this big (when not told)


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
        self.merge_method = RESIDENT_METHODS[method]
        if self.merge_method.needs_base and base is None:
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
        self.groups = build_groups(dict(self.model.named_parameters()), self.tensor_names, dtype, self.device)
        total = sum(group.output.numel() for group in self.groups)
        if compile_kernels is None:
            compile_kernels = total >= AUTO_COMPILE_PARAMETERS
        raise_recompile_limit()
        self.kernels = KernelCache(compile_kernels)
        self.context = MergeContext(
            device=self.device,
            dtype=dtype,
            seed=seed,
            base_name=base,
            other_names=self.other_names,
            kernels=self.kernels,
            hashed_fields=streaming or fresh_randomness,
        )
        with torch.no_grad():
            if streaming:  # sources are read per candidate; checked once here
                for name, path in sources.items():
                    check_checkpoint_finite(name, Path(path))
            else:
                for group in self.groups:
                    group.inputs = self._read_inputs(group, check=True)
                    group.stats = self.merge_method.prepare(self.context, group, group.inputs, draw=0)
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

    def _read_inputs(self, group: Group, check: bool = False) -> GroupInputs:
        return read_inputs(
            self.checkpoints, self.base_name, self.other_names, group, self.dtype, self.device, check
        )

    # ---- public interface ---------------------------------------------------------------------

    def load_source(self, name: str) -> None:
        """Write one source's own weights into the model."""
        if name not in self.checkpoints:
            raise MergerError(f"unknown source {name!r}; sources are {', '.join(self.checkpoints)}")
        with torch.no_grad():
            for group in self.groups:
                if group.inputs is None:
                    read_source(self.checkpoints[name], name, group, group.output)
                elif name == self.base_name:
                    group.output.copy_(group.inputs.base)
                else:
                    group.output.copy_(group.inputs.others[self.other_names.index(name)])

    def resident_bytes(self) -> dict[str, int]:
        """Bytes held: the model, each source's resident tensors, each precomputed structure."""
        sizes: dict[str, int] = {"model": sum(nbytes(group.output) for group in self.groups)}
        for name in self.checkpoints:
            sizes[f"source:{name}"] = 0
        for group in self.groups:
            if group.inputs is not None:
                if self.base_name is not None:
                    sizes[f"source:{self.base_name}"] += nbytes(group.inputs.base)
                per_source = nbytes(group.inputs.others) // max(1, len(self.other_names))
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
                inputs, stats = self._candidate_inputs(group, draw)
                merges = [plan.tensors[name] for name in group.names]
                self.merge_method.merge(self.context, GroupCandidate(group, inputs, stats, merges))

    def _candidate_inputs(self, group: Group, draw: int) -> tuple[GroupInputs, GroupStats]:
        """The group's sources and constants for a candidate of draw `draw`: read and prepared when
        streaming, else the resident ones (with fresh random keys under `fresh_randomness`)."""
        if group.inputs is None:
            inputs = self._read_inputs(group)
            return inputs, self.merge_method.prepare(self.context, group, inputs, draw)
        if self.fresh_randomness and group.stats.keys is not None:
            group.stats.keys = self.context.random_keys(group.names, draw)
        return group.inputs, group.stats

    def _check_plan(self, plan: MergePlan) -> None:
        if plan.method != self.method:
            raise MergerError(
                f"plan is for merge method {plan.method}, the engine was built for {self.method}"
            )
        if self.merge_method.needs_base and plan.base != self.base_name:
            raise MergerError(f"plan's base model is {plan.base}, the engine's is {self.base_name}")
        missing = [name for name in self.tensor_names if name not in plan.tensors]
        if missing:
            raise MergerError(f"plan does not cover tensor {missing[0]} (and {len(missing) - 1} more)")
        known = set(self.checkpoints)
        for name, merge in plan.tensors.items():
            unknown = set(merge.per_source) - known
            if unknown:
                raise MergerError(f"plan for {name} uses unknown source {sorted(unknown)[0]!r}")
