"""Reading a source checkpoint tensor by tensor, without loading the whole model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from merger.common.errors import MergerError


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

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        file = self.files.get(name)
        if file is None:
            raise MergerError(f"source {self.path} has no tensor {name}")
        return self._handle(file).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())
