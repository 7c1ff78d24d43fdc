"""The precision lm-eval scores candidates in (`engine.scoring_precision`).

Merges stay in the precision they are built in (`engine.dtype`): the digest and the export are of those
weights. Scoring in bf16 scores a bfloat16 copy of the merged model whose parameters are refreshed
(`copy_` with a cast) from the merged ones before every scoring; buffers (e.g. rotary frequencies) keep
their dtype, as a model loaded in bf16 computes them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from merger.common.errors import MergerError

Precision = Literal["fp32", "bf16"]
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matrix units
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where there is no /proc/cpuinfo)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def has_native_bf16(device: str, cpuinfo: Path = CPUINFO) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware (AMX-BF16 / AVX512-BF16, or a bf16 GPU)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device != "cpu":
        return False
    return bool(cpu_flags(cpuinfo) & set(CPU_BF16_FLAGS))


def resolve_precision(requested: str, device: str, cpuinfo: Path = CPUINFO) -> Precision:
    """`auto` becomes bf16 where the hardware has native bf16 matrix units, else fp32."""
    if requested == "auto":
        return "bf16" if has_native_bf16(device, cpuinfo) else "fp32"
    if requested not in ("fp32", "bf16"):
        raise ValueError(f"unknown scoring precision {requested!r} (fp32, bf16 or auto)")
    return "bf16" if requested == "bf16" else "fp32"


def check_precision(requested: str, device: str, cpuinfo: Path | None = None) -> None:
    """bf16 asked for by name needs native bf16 units: elsewhere it is emulated, slower than fp32."""
    if requested != "bf16" or has_native_bf16(device, cpuinfo or CPUINFO):
        return
    raise MergerError(
        f"engine.scoring_precision: bf16 was asked for, but {device} here has no native bf16 matrix units "
        f"({', '.join(CPU_BF16_FLAGS)} or a bf16 GPU), so it would be emulated and slower than fp32; "
        f"`auto` would score in {resolve_precision('auto', device, cpuinfo or CPUINFO)} here: set auto or fp32"
    )


class ScoringModel:
    """The model lm-eval scores: the merged model itself (fp32), or a bf16 copy `refresh` keeps current."""

    def __init__(self, merged: nn.Module, precision: Precision):
        self.merged = merged
        self.precision = precision
        self.model = merged if not self.casts else _bf16_copy(merged)

    @property
    def casts(self) -> bool:
        """Whether scoring needs a copy (the merge is not already in bf16)."""
        return self.precision == "bf16" and _parameter_dtype(self.merged) != torch.bfloat16

    def refresh(self) -> None:
        """The copy's parameters become the merged model's, cast to bf16 (a no-op without a copy)."""
        if self.model is self.merged:
            return
        targets = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, parameter in self.merged.named_parameters():
                targets[name].copy_(parameter)


def _parameter_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _bf16_copy(model: nn.Module) -> nn.Module:
    scoring = copy.deepcopy(model)
    for parameter in scoring.parameters():  # tied parameters are one object: cast once
        parameter.data = parameter.data.to(torch.bfloat16)
    # The resident model's parameters have requires_grad False; a bf16 copy like that generated 4x slower
    # through lm-eval on this CPU (7.0 s against 1.7 s for the quickstart's 40 fitness items, one thread),
    # while its plain forward pass was as fast. lm-eval and generate run under no_grad: no graph is built.
    scoring.requires_grad_(True)
    return scoring
