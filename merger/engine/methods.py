"""The per-candidate arithmetic of each merge method, on stacks of same-shape tensors.

A "group" is every layer's copy of one tensor (e.g. all `mlp.up_proj.weight`), flattened to
`[layers, elements]`; non-base sources are stacked to `[sources, layers, elements]`. Every value a
candidate changes arrives as a small tensor: `[layers, 1]` for shared values, `[sources, layers, 1]`
for per-source ones, so one kernel call (and, compiled, one fused pass over memory) covers a group.

The semantics follow mergekit 0.1.5 (`generalized_task_arithmetic.py`, `sparsify.py`, `linear.py`,
`slerp.py`); the expensive parts that do not change between candidates (sorting magnitudes, ranks,
random fields, slerp's angles) are computed once by `resident.py` and only looked up here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# DARE / DELLA random fields are 16-bit uniform levels l in [0, 65536), standing for (l + 0.5) / 65536,
# computed inside the kernels by hashing (element index, key); a key per (run seed, source, tensor, draw)
# makes them common random numbers across candidates without storing or reading them.
RANDOM_LEVELS = 65536
_GOLDEN = -1640531527  # 0x9E3779B9 as int32
_MIX1 = 0x7FEB352D  # lowbias32 multipliers (int32 arithmetic wraps like uint32)
_MIX2 = -2073451893  # 0x846CA68B as int32
RESCALE_EPS = 1e-7  # mergekit's `rescaled_masked_tensor` tolerance
DIVISOR_EPS = 1e-8  # mergekit's guard on the sum of weights without sign consensus
SLERP_DOT_THRESHOLD = 0.9995
SLERP_NORM_EPS = 1e-8


@dataclass(frozen=True)
class MethodTraits:
    family: str  # "linear", "slerp" or "task_arithmetic" (mergekit's generalized task arithmetic)
    sparsification: str | None  # None, "magnitude", "outliers", "random", "della"
    consensus: bool  # TIES sign election ("sum" method)
    needs_base: bool


METHODS: dict[str, MethodTraits] = {
    "linear": MethodTraits("linear", None, False, False),
    "slerp": MethodTraits("slerp", None, False, True),
    "task_arithmetic": MethodTraits("task_arithmetic", None, False, True),
    "ties": MethodTraits("task_arithmetic", "magnitude", True, True),
    "dare_ties": MethodTraits("task_arithmetic", "random", True, True),
    "dare_linear": MethodTraits("task_arithmetic", "random", False, True),
    "breadcrumbs": MethodTraits("task_arithmetic", "outliers", False, True),
    "breadcrumbs_ties": MethodTraits("task_arithmetic", "outliers", True, True),
    "della": MethodTraits("task_arithmetic", "della", True, True),
    "della_linear": MethodTraits("task_arithmetic", "della", False, True),
}


def _work(tensor: torch.Tensor) -> torch.Tensor:
    """linear and slerp compute in float32 (float64 stays float64), like mergekit."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def weighted_sum(
    out: torch.Tensor,
    base: torch.Tensor | None,
    others: torch.Tensor,
    base_coef: torch.Tensor,
    coefs: torch.Tensor,
) -> None:
    """out = base_coef * base + sum_i coefs[i] * others[i]: linear, and slerp with precomputed angles."""
    total = _work(base) * base_coef if base is not None else None
    for index in range(others.shape[0]):
        term = _work(others[index]) * coefs[index]
        total = term if total is None else total + term
    out.copy_(total)


def random_levels(key: torch.Tensor, length: int, device: torch.device) -> torch.Tensor:
    """[..., length] int32 uniform levels in [0, 65536) from `key` [..., 1] int32 (lowbias32 hash)."""
    index = torch.arange(length, dtype=torch.int32, device=device)
    mixed = index * _GOLDEN + key
    mixed = mixed ^ ((mixed >> 16) & 0xFFFF)
    mixed = mixed * _MIX1
    mixed = mixed ^ ((mixed >> 15) & 0x1FFFF)
    mixed = mixed * _MIX2
    mixed = mixed ^ ((mixed >> 16) & 0xFFFF)
    return (mixed >> 16) & 0xFFFF


def _keep(kind: str, delta: torch.Tensor, index: int, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Which elements of source `index`'s task vector survive sparsification."""
    if kind == "magnitude":
        (threshold,) = args
        return delta.abs() >= threshold[index]
    if kind == "outliers":
        low, high = args
        magnitude = delta.abs()
        return (magnitude >= low[index]) & (magnitude <= high[index])
    if kind == "random":
        keys, cut = args
        return random_levels(keys[index], delta.shape[-1], delta.device) < cut[index]
    if kind == "della":
        keys, ranks, floor_probability, slope = args
        probability = floor_probability[index] + ranks[index] * slope[index]
        uniform = (random_levels(keys[index], delta.shape[-1], delta.device) + 0.5) * (1.0 / RANDOM_LEVELS)
        return uniform < probability
    raise ValueError(kind)


def make_task_arithmetic(kind: str | None, consensus: bool) -> Callable[..., None]:
    """The fused generalized-task-arithmetic kernel for one sparsification kind and consensus choice."""

    def task_arithmetic(
        out: torch.Tensor,
        base: torch.Tensor,
        others: torch.Tensor,
        coefs: torch.Tensor,
        weights: torch.Tensor,
        divisor: torch.Tensor,
        lam: torch.Tensor,
        *mask_args: torch.Tensor,
    ) -> None:
        # coefs = weight * l1 rescale factor; weights = the raw weights (TIES divisor); divisor is used
        # only without consensus (1 when not normalizing); with consensus it is a 0/1 "normalize" flag.
        contributions = []
        for index in range(others.shape[0]):
            delta = others[index] - base
            scaled = delta * coefs[index]
            if kind is not None:
                scaled = torch.where(_keep(kind, delta, index, mask_args), scaled, 0.0)
            contributions.append(scaled)
        if not consensus:
            mixed = contributions[0]
            for scaled in contributions[1:]:
                mixed = mixed + scaled
            out.copy_(base + mixed / divisor * lam)
            return
        total = contributions[0]
        for scaled in contributions[1:]:
            total = total + scaled
        positive = total >= 0
        mixed = None
        weight_sum = None
        for index, scaled in enumerate(contributions):
            agrees = torch.where(positive, scaled > 0, scaled < 0)
            kept = torch.where(agrees, scaled, 0.0)
            kept_weight = torch.where(agrees, weights[index], 0.0)
            mixed = kept if mixed is None else mixed + kept
            weight_sum = kept_weight if weight_sum is None else weight_sum + kept_weight
        weight_sum = torch.where(weight_sum == 0, 1.0, weight_sum)
        mixed = torch.where(divisor > 0, mixed / weight_sum, mixed)
        out.copy_(base + mixed * lam)

    return task_arithmetic


def make_kept_l1(kind: str) -> Callable[..., torch.Tensor]:
    """Per source and layer, the l1 norm of the task vector after a random (DARE/DELLA) mask."""

    def kept_l1(base: torch.Tensor, others: torch.Tensor, *mask_args: torch.Tensor) -> torch.Tensor:
        sums = []
        for index in range(others.shape[0]):
            delta = others[index] - base
            kept = torch.where(_keep(kind, delta, index, mask_args), delta.abs(), 0.0)
            sums.append(kept.sum(dim=-1, dtype=torch.float64))
        return torch.stack(sums)

    return kept_l1


def rescale_factors(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """mergekit's l1 rescale: before/after unless either norm is (nearly) zero."""
    usable = (before >= RESCALE_EPS) & (after >= RESCALE_EPS)
    return torch.where(usable, before / torch.where(usable, after, 1.0), 1.0)


def slerp_coefficients(t: float, dot: float) -> tuple[float, float]:
    """Coefficients of (base, other) for mergekit's slerp, given their normalized dot product."""
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def normalized_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """mergekit's slerp dot: vectors divided by their norms, a zero-norm vector left unscaled."""
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    norm_a, norm_b = float(a64.norm()), float(b64.norm())
    norm_a = norm_a if norm_a > SLERP_NORM_EPS else 1.0
    norm_b = norm_b if norm_b > SLERP_NORM_EPS else 1.0
    return float(torch.dot(a64, b64)) / (norm_a * norm_b)


class KernelCache:
    """Kernels by name, compiled with torch.compile when asked; falls back to eager if compiling fails."""

    def __init__(self, compile_kernels: bool):
        self.compile_kernels = compile_kernels
        self._kernels: dict[str, Callable[..., object]] = {}
        self._eager: dict[str, Callable[..., object]] = {}

    def get(self, name: str, build: Callable[[], Callable[..., object]]) -> Callable[..., object]:
        if name not in self._kernels:
            eager = build()
            self._eager[name] = eager
            self._kernels[name] = torch.compile(eager, dynamic=True) if self.compile_kernels else eager
        return self._kernels[name]

    def call(self, name: str, build: Callable[[], Callable[..., object]], *args: object) -> object:
        kernel = self.get(name, build)
        if kernel is self._eager[name]:
            return kernel(*args)
        try:
            return kernel(*args)
        except Exception as error:  # a missing compiler or backend must not stop a search
            log.warning("torch.compile failed for %s (%s); using eager kernels", name, error)
            self._kernels[name] = self._eager[name]
            return self._eager[name](*args)
