"""What each output tensor is made of, resolved from a mergekit config with mergekit's own rules.

The plan is the engine's only input per candidate: for every tensor, the method's shared values
(lambda, normalize, t, ...) and each source's values (weight, density, epsilon, gamma, ...).
Resolution uses mergekit's `resolve_parameters`, so filters, gradients, defaults and the
"embeddings take the first slice, final norm and lm_head the last" rule are exactly mergekit's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mergekit import merge_methods
from mergekit.common import ModelReference
from mergekit.config import (
    ConfigReader,
    InputModelDefinition,
    InputSliceDefinition,
    MergeConfiguration,
    OutputSliceDefinition,
)
from mergekit.parameter_resolver import resolve_parameters

LAYER_PATTERN = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorMerge:
    shared: Mapping[str, Any]
    per_source: Mapping[str, Mapping[str, Any]]  # source name -> its values, in input order


@dataclass(frozen=True)
class MergePlan:
    method: str
    base: str | None
    tensors: Mapping[str, TensorMerge]


def layer_index(tensor_name: str) -> int | None:
    match = LAYER_PATTERN.search(tensor_name)
    return int(match.group(1)) if match else None


def output_slices(config: MergeConfiguration, num_layers: int) -> list[OutputSliceDefinition]:
    """The config's slices; a `models:` config is one slice over every layer."""
    if config.slices:
        return list(config.slices)
    if config.models:
        models = list(config.models)
        if config.base_model and all(m.model != config.base_model for m in models):
            models.append(InputModelDefinition(model=config.base_model))
        sources = [
            InputSliceDefinition(model=m.model, layer_range=(0, num_layers), parameters=m.parameters)
            for m in models
        ]
        return [OutputSliceDefinition(sources=sources)]
    raise ValueError("only `slices:` or `models:` merge configs can be planned")


def _locate(
    tensor_name: str, slices: list[OutputSliceDefinition]
) -> tuple[OutputSliceDefinition, int, float]:
    """The output slice that produces a tensor, the input layer offset, and mergekit's gradient t."""
    index = layer_index(tensor_name)
    if index is None:
        is_post = not tensor_name.startswith("model.embed_tokens")
        chosen = slices[-1] if is_post else slices[0]
        return chosen, 0, 0.0
    start = 0
    for out_slice in slices:
        length = out_slice.sources[0].layer_range[1] - out_slice.sources[0].layer_range[0]
        if index < start + length:
            offset = index - start
            t = offset / (length - 1) if length > 1 else 1.0
            return out_slice, offset, t
        start += length
    raise ValueError(f"tensor {tensor_name} lies beyond the config's slices")


def resolve_plan(
    config: MergeConfiguration,
    tensor_names: Iterable[str],
    source_names: Mapping[str, str],
    num_layers: int,
) -> MergePlan:
    """Resolve every tensor's parameters. `source_names` maps a model path to its source name.

    Output layer i takes input layer i of each source (the genome never reorders layers).
    """
    method = merge_methods.get(config.merge_method)
    slices = output_slices(config, num_layers)
    base_ref = config.base_model
    tensors = {}
    for tensor_name in tensor_names:
        out_slice, _, t = _locate(tensor_name, slices)
        reader = ConfigReader(config=config, slice_out=out_slice, t=t)
        base = out_slice.base_model or base_ref
        inputs: dict[ModelReference, str] = {source.model: tensor_name for source in out_slice.sources}
        shared, per_input = resolve_parameters(
            method.spec,
            tensor_name=tensor_name,
            inputs=inputs,
            sources=reader.parameter_sources,
            base_model=base,
            t=t,
        )
        tensors[tensor_name] = TensorMerge(
            shared=dict(shared),
            per_source={source_names[str(ref.model)]: dict(values) for ref, values in per_input.items()},
        )
    base_name = source_names[str(base_ref.model)] if base_ref is not None else None
    return MergePlan(method=config.merge_method, base=base_name, tensors=tensors)
