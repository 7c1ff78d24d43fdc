"""The layer-path engine: a candidate assembled from the resident sources' layers by reference.

Each source is loaded once. A candidate is one model object (the same `self.model` for the whole run,
so lm-eval's wrapper keeps pointing at it) whose embeddings, final norm and lm_head are the anchor's
modules and whose `layers` is a list of per-slot views of source layers: shallow copies of the layer,
its attention and its MLP that share every parameter tensor with the source, so assembling a
candidate copies no weight. Each view's attention has its own `layer_idx` (the KV-cache index), so a
layer that appears twice in a path keeps two cache entries and generation with a cache is correct.

Scales are applied in the forward pass: a scaled slot's o_proj and down_proj are wrapped to multiply
their output by the scale (one multiply of the hidden-size output per projection and token). A scaled
copy of the weights would cost the projections' bytes once per scaled slot, and a layer can appear in
several slots with different scales; multiplying the output equals mergekit's scaled weight up to
float rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch
from mergekit.config import MergeConfiguration
from torch import nn

from merger.common.errors import MergerError
from merger.engine.plan import resolve_plan
from merger.engine.weights import parameters_digest
from merger.space.layer_path import PathLayer

# (sub-module of a decoder layer, its output projection): the residual contributions a scale multiplies
SCALED_PROJECTIONS = (("self_attn", "o_proj"), ("mlp", "down_proj"))
PROBE_TOKENS = 8  # a fixed input every candidate's hidden states must be finite on


class ScaledOutput(nn.Module):
    """`module(x) * scale` without touching `module`'s weights."""

    def __init__(self, module: nn.Module, scale: float):
        super().__init__()
        self.inner = module
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


def _view(module: nn.Module, **children: nn.Module) -> nn.Module:
    """A shallow copy of `module` (same parameter tensors) with its own child table; `children` replace."""
    clone = copy.copy(module)
    clone._modules = {**module._modules, **children}
    return clone


def slot_layer(layer: nn.Module, index: int, scale: float) -> nn.Module:
    """A view of a decoder layer at path position `index`, its residual contributions times `scale`."""
    attention = _view(layer.self_attn)
    attention.layer_idx = index
    parts: dict[str, nn.Module] = {"self_attn": attention}
    if scale != 1.0:
        for part, projection in SCALED_PROJECTIONS:
            owner = parts.get(part) or getattr(layer, part)
            parts[part] = _view(owner, **{projection: ScaledOutput(getattr(owner, projection), scale)})
    view = _view(layer, **parts)
    if hasattr(view, "layer_idx"):
        view.layer_idx = index
    return view


def path_of_config(
    config: MergeConfiguration, source_names: Mapping[str, str], num_layers: int
) -> tuple[str, list[PathLayer]]:
    """The anchor and the layer path a passthrough config describes. As in mergekit, the embeddings come
    from the first slice's model and the final norm and lm_head from the last one's (one anchor here);
    each layer's o_proj/down_proj `scale` is resolved by mergekit's own parameter rules."""
    if config.merge_method != "passthrough" or not config.slices:
        raise MergerError("the layer-path engine takes a passthrough config with slices")
    path: list[tuple[str, int]] = []
    for out_slice in config.slices:
        if len(out_slice.sources) != 1:
            raise MergerError("a passthrough slice has exactly one source")
        source = out_slice.sources[0]
        start, end = source.layer_range
        path += [(source_names[str(source.model.model)], layer) for layer in range(start, end)]
    first, last = (source_names[str(s.sources[0].model.model)] for s in (config.slices[0], config.slices[-1]))
    if first != last:
        raise MergerError(f"the embeddings ({first}) and the head ({last}) must come from one anchor")
    names = [
        f"model.layers.{index}.{part}.{projection}.weight"
        for index in range(len(path))
        for part, projection in SCALED_PROJECTIONS
    ]
    plan = resolve_plan(config, names, source_names, num_layers)
    layers = []
    for index, (source, layer) in enumerate(path):
        scales = {
            1.0 if value.get("scale") is None else float(value["scale"])
            for part, projection in SCALED_PROJECTIONS
            for value in plan.tensors[f"model.layers.{index}.{part}.{projection}.weight"].per_source.values()
        }
        if len(scales) != 1:
            raise MergerError(
                f"{source} layer {layer}: o_proj and down_proj scales differ ({sorted(scales)}); "
                "a layer path scales both residual contributions alike"
            )
        layers.append(PathLayer(source, layer, scales.pop()))
    return first, layers


class LayerPathEngine:
    def __init__(
        self,
        sources: Mapping[str, Path],
        anchor: str,
        *,
        dtype: torch.dtype,
        device: str,
        trust_remote_code: bool = False,
    ):
        if anchor not in sources:
            raise MergerError(f"anchor {anchor!r} is not one of the sources ({', '.join(sources)})")
        self.device = torch.device(device)
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.source_models = {name: self._load(Path(path)) for name, path in sources.items()}
        self.source_names = {str(path): name for name, path in sources.items()}
        self.anchor = anchor  # until a config names another
        self.num_layers = int(self.source_models[anchor].config.num_hidden_layers)
        donor = self.source_models[anchor]
        self.prefix = donor.base_model_prefix
        self.model = _view(donor)
        self.model.config = copy.deepcopy(donor.config)
        self._inner = _view(getattr(donor, self.prefix))
        self._inner.config = self.model.config
        self.assemble([PathLayer(anchor, layer) for layer in range(self.num_layers)])

    def _load(self, path: Path) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=self.dtype, trust_remote_code=self.trust_remote_code
        ).to(self.device)
        model.eval()
        model.requires_grad_(False)
        return model

    def _point_at(self, donor: nn.Module, layers: list[nn.Module], layer_types: list[str] | None) -> None:
        """Make `self.model` the donor's embeddings, norm and head around `layers` (no weight copied)."""
        inner_donor = getattr(donor, self.prefix)
        self._inner._modules = {**inner_donor._modules, "layers": nn.ModuleList(layers)}
        self.model._modules = {**donor._modules, self.prefix: self._inner}
        self.model.config.num_hidden_layers = len(layers)
        if layer_types is not None:
            self.model.config.layer_types = layer_types

    # ---- public interface ---------------------------------------------------------------------

    def assemble(self, path: list[PathLayer], anchor: str | None = None) -> None:
        """The model becomes the anchor around `path`'s source layers, each at its own position."""
        anchor = anchor or self.anchor
        layers = []
        for index, step in enumerate(path):
            source = self.source_models[step.source]
            layer = getattr(source, self.prefix).layers[step.layer]
            layers.append(slot_layer(layer, index, step.scale))
        types = getattr(self.source_models[anchor].config, "layer_types", None)
        if types is not None:
            types = [self.source_models[s.source].config.layer_types[s.layer] for s in path]
        self._point_at(self.source_models[anchor], layers, types)

    def apply_config(self, config: MergeConfiguration, draw: int = 0) -> None:
        """The candidate of a passthrough config (`draw` is unused: a layer path draws nothing)."""
        anchor, path = path_of_config(config, self.source_names, self.num_layers)
        self.assemble(path, anchor)
        self.check_finite()

    def check_finite(self) -> None:
        """Refuse a path whose activations overflow: the sources' weights are finite, but a path that
        repeats or scales layers can drive the hidden states to inf (then every score is noise). One
        forward of a few fixed tokens through the layers and the final norm (lm_head skipped)."""
        vocab = int(self.model.config.vocab_size)
        probe = (torch.arange(PROBE_TOKENS, device=self.device) * 7919 % vocab).unsqueeze(0)
        with torch.no_grad():
            hidden = self._inner(probe, use_cache=False).last_hidden_state
        if not torch.isfinite(hidden).all():
            raise FloatingPointError(
                "the path's activations overflow: non-finite hidden states on a probe input"
            )

    def load_checkpoint(self, path: Path) -> None:
        """The model becomes a checkpoint on disk (a source is used as resident; others are loaded)."""
        name = self.source_names.get(str(Path(path).resolve())) or self.source_names.get(str(path))
        donor = self.source_models[name] if name is not None else self._load(Path(path))
        self._point_at(
            donor, list(getattr(donor, self.prefix).layers), getattr(donor.config, "layer_types", None)
        )

    def exported_state(self) -> dict[str, torch.Tensor]:
        """The candidate as its passthrough export holds it: each slot's parameters under the slot's own
        index (a repeated layer once per slot), a scaled slot's o_proj / down_proj weight times its scale,
        as mergekit's passthrough `scale` writes it."""
        scaled = {name: module.scale for name, module in self.model.named_modules() if isinstance(module, ScaledOutput)}
        state = {}
        for name, tensor in self.model.named_parameters(remove_duplicate=False):
            owner = next((module for module in scaled if name.startswith(module + ".inner.")), None)
            if owner is None:
                state[name] = tensor.detach()
            else:
                state[owner + name[len(owner) + len(".inner") :]] = tensor.detach() * scaled[owner]
        return state

    def digest(self) -> str:
        """The digest of `exported_state`, a tied lm_head once (as the exported checkpoint's is taken)."""
        state = self.exported_state()
        output, inputs = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if output is not None and output.weight is inputs.weight:
            tied = next(name for name, module in self.model.named_modules() if module is output)
            state.pop(tied + ".weight", None)
        return parameters_digest(state.items())

    def resident_bytes(self) -> dict[str, int]:
        """Bytes held: each source model (the candidate itself holds none of its own)."""
        sizes = {f"source:{name}": _model_bytes(model) for name, model in self.source_models.items()}
        sizes["model"] = 0
        sizes["total"] = sum(sizes.values())
        return sizes


def _model_bytes(model: nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # tied weights once
    return sum(t.numel() * t.element_size() for t in tensors.values())
