"""Reading checkpoints into an existing model, tensor by tensor, without a second copy of the model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open


def weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors weights")
    return files


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in weight_files(path):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, handle.get_tensor(name)


def load_into(model: torch.nn.Module, path: Path) -> None:
    """Copy a checkpoint's tensors into the model's parameters and buffers in place."""
    targets = model.state_dict(keep_vars=True)
    missing = set(targets)
    with torch.no_grad():
        for name, tensor in iter_tensors(path):
            if name in targets:
                targets[name].data.copy_(tensor)
                missing.discard(name)
    tied = {
        name
        for name in missing
        if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)
    }
    unexpected_missing = {name for name in missing - tied if not name.endswith(("rotary_emb.inv_freq",))}
    if unexpected_missing:
        raise ValueError(
            f"{path} lacks {len(unexpected_missing)} tensors, e.g. {sorted(unexpected_missing)[0]}"
        )
