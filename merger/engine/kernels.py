"""The kernels: the per-candidate arithmetic of the merge methods, on stacks of same-shape tensors.

A "group" is every layer's copy of one tensor (e.g. all `mlp.up_proj.weight`), flattened to
`[layers, elements]`; non-base sources are stacked to `[sources, layers, elements]`. Every value a
candidate changes arrives as a small tensor: `[layers, 1]` for shared values, `[sources, layers, 1]`
for per-source ones, so one kernel call (and, compiled, one fused pass over memory) covers a group.

The semantics follow mergekit 0.1.5 (`generalized_task_arithmetic.py`, `sparsify.py`, `linear.py`,
`slerp.py`); the expensive parts that do not change between candidates (sorting magnitudes, ranks,
random fields, slerp's angles) are computed once (`precompute.py`, `sparsify.py`) and only looked up here.
Which kernel a method runs, with which sparsification, is the method registry's business (`methods.py`).

Two quantizations make DARE / DELLA one pass over memory (no second pass for the l1 rescale):
- random fields are 8-bit uniform levels U in [0, 256), standing for (U + 0.5) / 256, so a keep
  probability is a multiple of 1/256 (DARE keeps with probability round(density * 256) / 256);
- DELLA's normalized magnitude rank is quantized to 255 steps (round to nearest; the smallest and largest
  magnitude of a row keep their exact rank 0 and 1), so DELLA's keep probability
  (density - epsilon) + 2 * epsilon * rank is off by at most epsilon / 510 + 1 / 512 (+ 2**-16 from its
  integer terms, `della_terms`).
Then whether an element is kept depends only on its (rank, level) cell, and the kept l1 norm of a tensor
at any (density, epsilon) is a lookup in a per-tensor table of l1 by cell (`della_level_counts`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

# DARE / DELLA random fields: the top byte of a lowbias32 hash of (element index, key), a key per (run seed,
# source, tensor, draw) making them common random numbers across candidates. Streaming and
# fresh-randomness runs hash them inside the kernels; a resident run stores them once, four bytes per
# 32-bit word (`pack_bytes`: DARE one byte per source, DELLA a random level and a rank level per source). The
# words are typed float32 and bit-cast back in the kernel because the CPU kernels (torch.compile, AVX2) load
# full float vectors fast but 8-, 16- and 32-bit integer vectors through a slow partial-load path.
RANDOM_LEVELS = 256
RANK_LEVELS = 256  # DELLA's normalized rank r/(n - 1) is stored as round(r * 255 / (n - 1))
# DELLA keeps an element when level << 16 < floor + slope * rank_level in int32 (`della_terms`): integer
# math, so the kernel and the host's kept-l1 lookup (`della_level_counts`) agree bit for bit, which the exact
# l1 rescale needs.
LEVEL_SHIFT = 16
DELLA_PROBABILITY_SCALE = RANDOM_LEVELS << LEVEL_SHIFT  # 2**24: probabilities as integers
DELLA_ALWAYS = 1 << 25  # floor that keeps (or, negated, drops) every element
_GOLDEN = -1640531527  # 0x9E3779B9 as int32
_MIX1 = 0x7FEB352D  # lowbias32 multipliers (int32 arithmetic wraps like uint32)
_MIX2 = -2073451893  # 0x846CA68B as int32
RESCALE_EPS = 1e-7  # mergekit's `rescaled_masked_tensor` tolerance
DIVISOR_EPS = 1e-8  # mergekit's guard on the sum of weights without sign consensus
SLERP_DOT_THRESHOLD = 0.9995
SLERP_NORM_EPS = 1e-8

# Which elements of source `index`'s task vector `delta` survive sparsification, given the sparsifier's
# per-candidate tensors (`sparsify.Sparsifier.keep`).
Keep = Callable[[torch.Tensor, int, tuple[torch.Tensor, ...]], torch.Tensor]


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
    """[..., length] int32 uniform levels in [0, 256) from `key` [..., 1] int32 (lowbias32 hash, top byte)."""
    index = torch.arange(length, dtype=torch.int32, device=device)
    mixed = index * _GOLDEN + key
    mixed = mixed ^ ((mixed >> 16) & 0xFFFF)
    mixed = mixed * _MIX1
    mixed = mixed ^ ((mixed >> 15) & 0x1FFFF)
    mixed = mixed * _MIX2
    mixed = mixed ^ ((mixed >> 16) & 0xFFFF)
    return (mixed >> 24) & 0xFF


BYTES_PER_WORD = 4


def pack_bytes(planes: torch.Tensor) -> torch.Tensor:
    """[P, L, n] integers in [0, 256) -> [ceil(P / 4), L, n] float32 words whose bit patterns hold them:
    plane p in byte p % 4 (bits 8 * (p % 4) and up) of word p // 4; unused bytes are 0."""
    count, *shape = planes.shape
    words = -(-count // BYTES_PER_WORD)
    padded = torch.zeros((words * BYTES_PER_WORD, *shape), dtype=torch.uint8, device=planes.device)
    padded[:count] = planes
    # little-endian (x86, ARM, CUDA): byte j of an int32 in memory is its bits 8j..8j+7
    grouped = padded.reshape(words, BYTES_PER_WORD, *shape).movedim(1, -1).contiguous()
    return grouped.view(torch.int32).squeeze(-1).view(torch.float32)


def plane(words: torch.Tensor, plane: int) -> torch.Tensor:
    """int32 values of byte plane `plane` of `pack_bytes` words."""
    bits = words[plane // BYTES_PER_WORD].view(torch.int32)
    return (bits >> (8 * (plane % BYTES_PER_WORD))) & 0xFF


def della_terms(density: np.ndarray, epsilon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(floor, slope) of DELLA's integer keep rule `level << 16 < floor + slope * rank_level`.

    That is (level + 0.5) / 256 < (density - epsilon) + 2 * epsilon * rank_level / 255 with both sides times
    2**24 and rounded (2**-24 of a probability). For |epsilon| < 0.5 every term stays below 2**25: no int32
    overflow. `density`, `epsilon`: float arrays of one shape.
    """
    floor = np.rint(DELLA_PROBABILITY_SCALE * (density - epsilon)) - (1 << (LEVEL_SHIFT - 1))
    slope = np.rint(DELLA_PROBABILITY_SCALE * 2.0 * epsilon / (RANK_LEVELS - 1))
    return floor, slope


def della_level_counts(floor: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """[..., RANK_LEVELS] int64: per rank level, how many random levels DELLA keeps (those below the count).

    The closed form of `level << 16 < x` with x = floor + slope * rank: level < x / 2**16, so the count is
    ceil(x / 2**16) within [0, 256]. `floor`, `slope`: [..., 1] integers.
    """
    ranks = torch.arange(RANK_LEVELS, dtype=torch.int64, device=floor.device)
    bound = floor.long() + slope.long() * ranks
    return (-torch.div(-bound, 1 << LEVEL_SHIFT, rounding_mode="floor")).clamp(0, RANDOM_LEVELS)


def make_task_arithmetic(keep: Keep | None, consensus: bool) -> Callable[..., None]:
    """The fused generalized-task-arithmetic kernel for one sparsification (`keep`; None keeps every
    element) and consensus choice."""

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
            if keep is not None:
                scaled = torch.where(keep(delta, index, mask_args), scaled, 0.0)
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


def make_kept_l1(keep: Keep) -> Callable[..., torch.Tensor]:
    """Per source and layer, the l1 norm of the task vector after a random (DARE/DELLA) mask: a second
    pass, for streaming and fresh-randomness runs (resident runs look it up in precomputed tables)."""

    def kept_l1(base: torch.Tensor, others: torch.Tensor, *mask_args: torch.Tensor) -> torch.Tensor:
        sums = []
        for index in range(others.shape[0]):
            delta = others[index] - base
            kept = torch.where(keep(delta, index, mask_args), delta.abs(), 0.0)
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


# Inductor computes bfloat16 / float16 kernels in float32 and rounds once at the end; eager torch (and
# mergekit) rounds after every op. Emulating the per-op rounding keeps compiled kernels bit-identical to the
# eager ones at low precision, so TIES / breadcrumbs thresholds (taken from the eagerly rounded magnitudes)
# and the DARE / DELLA kept-l1 tables select the same elements. No effect on float32 / float64 kernels.
# torch.compile rejects options its inductor does not know (older torch), so ask only where it exists.
def compile_options() -> dict[str, bool]:
    from torch._inductor import config

    return {"emulate_precision_casts": True} if hasattr(config, "emulate_precision_casts") else {}


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
            self._kernels[name] = (
                torch.compile(eager, dynamic=True, options=compile_options())
                if self.compile_kernels
                else eager
            )
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


def raise_recompile_limit() -> None:
    """Each kernel meets a few shapes (layers, L=1 embeddings); keep dynamo from giving up on them."""
    config = torch._dynamo.config
    for attribute in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, attribute) and getattr(config, attribute) < 64:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                setattr(config, attribute, 64)
