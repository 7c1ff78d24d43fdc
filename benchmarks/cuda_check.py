"""The resident engine on a GPU against itself on the CPU and against mergekit, every method, one run.

For each method, each candidate is applied in turn to every engine (so a later candidate overwrites an
earlier one, as in a search):
- cpu: the engine on the CPU, eager kernels: the reference for everything the device computes;
- device: resident, compiled kernels (the search loop's path on a GPU); device_eager: resident, eager;
- device_streaming: `streaming=True`, compiled (DARE/DELLA levels hashed inside the kernels, kept-l1 second
  pass); device_bf16 and cpu_bf16 (--bf16-methods): bfloat16 engines on both sides;
- mergekit: `merge_in_memory` on the CPU. Deterministic methods must equal it; DARE/DELLA draw their own
  masks in mergekit, so there a density-1 candidate must equal it, and for the sparse candidates the ratio
  of merged task-vector norms (engine / mergekit) is reported.
DARE/DELLA keep masks come from a seeded hash of (seed, source, tensor, element): `mask_mismatch` counts
elements kept on one side and dropped on the other (device vs cpu), which should be 0.

Usage: python benchmarks/cuda_check.py [--device cuda] [--methods ties,della] [--out report.json]
Prints one line per comparison, a summary table, and exits 1 if any comparison is outside tolerance.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from mergekit.config import MergeConfiguration  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_speed import METHODS, SHAPES, build_base, build_specialist, method_raw, synchronize  # noqa: E402

from merger.engine.methods import RESIDENT_METHODS  # noqa: E402
from merger.engine.plan import resolve_plan  # noqa: E402
from merger.engine.reference import merge_in_memory  # noqa: E402
from merger.engine.resident import ResidentEngine  # noqa: E402
from merger.engine.sparsify import Magnitude, MagnitudeOutliers  # noqa: E402

FP32 = {"rtol": 1e-5, "atol": 1e-6}
BF16 = {"rtol": 1.6e-2, "atol": 1e-5}


class FallbackCounter(logging.Handler):
    """Counts the engine's 'torch.compile failed ... using eager kernels' warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def build_sources(root: Path) -> dict[str, Path]:
    paths = {"base": build_base(root, use_random=True, shape="check")[0]}
    for index in (1, 2):
        paths[f"specialist{index}"] = build_specialist(
            paths["base"], root / f"specialist{index}", seed=index, scale=0.1
        )
    return paths


def candidates(method: str, paths: dict[str, Path]) -> list[tuple[str, MergeConfiguration, bool]]:
    """(label, config, must equal mergekit) for the method's candidates, applied in this order."""
    resident = RESIDENT_METHODS[method]
    exact = not resident.draws_random
    raws = [("a", method_raw(method, paths, 0), exact), ("b", method_raw(method, paths, 1), exact)]
    if isinstance(getattr(resident, "sparsifier", None), (Magnitude, MagnitudeOutliers)):
        rescaled = method_raw(method, paths, 0)
        rescaled["parameters"] = {"rescale": True, "lambda": 1.3}
        raws.append(("rescaled", rescaled, True))
    if resident.draws_random:
        dense = method_raw(method, paths, 1)
        for model in dense["models"][1:]:
            model["parameters"]["density"] = 1.0
        raws.append(("density1", dense, True))
        rescaled = method_raw(method, paths, 0)
        rescaled["parameters"] = {"rescale": False, "lambda": 0.9}
        raws.append(("no_rescale", rescaled, False))
    return [(label, MergeConfiguration.model_validate(raw), must) for label, raw, must in raws]


def weights(engine: ResidentEngine) -> dict[str, torch.Tensor]:
    parameters = dict(engine.model.named_parameters())
    return {name: parameters[name].detach().to("cpu", copy=True) for name in engine.tensor_names}


def compare(
    ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], rtol: float, atol: float
) -> dict[str, Any]:
    """max |difference|, how many elements lie outside atol + rtol * |reference|, NaN mismatches counted."""
    max_abs, outside, elements, worst = 0.0, 0, 0, ""
    for name, expected in reference.items():
        got, want = ours[name].double(), expected.double()
        difference = (got - want).abs()
        bad = (difference > atol + rtol * want.abs()) | (got.isnan() != want.isnan())
        finite = difference[~difference.isnan()]
        tensor_max = float(finite.max()) if finite.numel() else 0.0
        if tensor_max > max_abs:
            max_abs, worst = tensor_max, name
        outside += int(bad.sum())
        elements += want.numel()
    return {"max_abs": max_abs, "outside": outside, "elements": elements, "worst_tensor": worst}


def mask_mismatch(
    ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> int:
    """Elements where one side changed the base weight and the other left it (a different keep decision)."""
    count = 0
    for name, expected in reference.items():
        count += int(((ours[name] != base[name]) != (expected != base[name])).sum())
    return count


def delta_norm_ratio(
    ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> float:
    ours_sq = sum(float((ours[n].double() - base[n].double()).pow(2).sum()) for n in reference)
    ref_sq = sum(float((reference[n].double() - base[n].double()).pow(2).sum()) for n in reference)
    return (ours_sq / ref_sq) ** 0.5 if ref_sq > 0 else float("nan")


def logits(engine: ResidentEngine, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return engine.model(tokens.to(engine.device)).logits.float().cpu()


def check_method(
    method: str, paths: dict[str, Path], device: str, bf16: bool, compile_kernels: bool = True
) -> dict[str, Any]:
    names = {str(path): name for name, path in paths.items()}
    sources = {k: v for k, v in paths.items() if method != "slerp" or k != "specialist2"}
    engines: dict[str, ResidentEngine] = {}
    timings: dict[str, float] = {}
    specs: list[tuple[str, dict[str, Any]]] = [
        ("cpu", {"device": "cpu", "compile_kernels": False}),
        ("device", {"device": device, "compile_kernels": compile_kernels}),
        ("device_eager", {"device": device, "compile_kernels": False}),
        ("device_streaming", {"device": device, "compile_kernels": compile_kernels, "streaming": True}),
    ]
    if bf16:
        specs += [
            ("cpu_bf16", {"device": "cpu", "compile_kernels": False, "dtype": torch.bfloat16}),
            ("device_bf16", {"device": device, "compile_kernels": compile_kernels, "dtype": torch.bfloat16}),
        ]
    for label, options in specs:
        started = time.perf_counter()
        engines[label] = ResidentEngine(sources, "base", method, **options)
        timings[f"{label}_setup_s"] = round(time.perf_counter() - started, 3)
    base = weights(engines["cpu"])  # the engine loads the base source at construction
    tokens = torch.randint(
        0, SHAPES["check"]["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0)
    )
    results: dict[str, Any] = {"candidates": {}, "timings": timings}
    for label, config, must_equal_mergekit in candidates(method, paths):
        plan = resolve_plan(config, engines["cpu"].tensor_names, names, engines["cpu"].num_layers)
        merged: dict[str, dict[str, torch.Tensor]] = {}
        for engine_label, engine in engines.items():
            synchronize(device)
            started = time.perf_counter()
            engine.apply(plan)
            synchronize(device)
            timings[f"{engine_label}_{label}_apply_s"] = round(time.perf_counter() - started, 4)
            merged[engine_label] = weights(engine)
        row: dict[str, Any] = {}
        for engine_label in ("device", "device_eager", "device_streaming"):
            row[f"{engine_label}_vs_cpu"] = compare(merged[engine_label], merged["cpu"], **FP32)
            if RESIDENT_METHODS[method].draws_random:
                row[f"{engine_label}_vs_cpu"]["mask_mismatch"] = mask_mismatch(
                    merged[engine_label], merged["cpu"], base
                )
        if bf16:
            row["device_bf16_vs_cpu_bf16"] = compare(merged["device_bf16"], merged["cpu_bf16"], **BF16)
        reference = merge_in_memory(config, seed=0)
        row["device_vs_mergekit"] = compare(merged["device"], reference, **FP32)
        row["device_vs_mergekit"]["must_equal"] = must_equal_mergekit
        row["cpu_vs_mergekit"] = compare(merged["cpu"], reference, **FP32)
        if not must_equal_mergekit:
            row["device_vs_mergekit"]["delta_norm_ratio"] = round(
                delta_norm_ratio(merged["device"], reference, base), 4
            )
        device_logits, cpu_logits = logits(engines["device"], tokens), logits(engines["cpu"], tokens)
        row["logits_device_vs_cpu_max_abs"] = float((device_logits - cpu_logits).abs().max())
        row["logits_scale"] = float(cpu_logits.abs().max())
        results["candidates"][label] = row
    return results


def failures(method: str, result: dict[str, Any]) -> list[str]:
    problems = []
    for label, row in result["candidates"].items():
        for key, value in row.items():
            if not isinstance(value, dict):
                continue
            if key == "cpu_vs_mergekit" or (key == "device_vs_mergekit" and not value["must_equal"]):
                continue
            # the CPU engine's own differences from mergekit are the CPU test suite's business (ties at a
            # magnitude threshold: mergekit's topk keeps some of the equal elements, the engine keeps all)
            allowed = row["cpu_vs_mergekit"]["outside"] if key == "device_vs_mergekit" else 0
            if value["outside"] > allowed or value.get("mask_mismatch"):
                problems.append(f"{method}/{label}/{key}: {value}")
        if row["logits_device_vs_cpu_max_abs"] > 1e-3 * max(1.0, row["logits_scale"]):
            problems.append(f"{method}/{label}: logits differ by {row['logits_device_vs_cpu_max_abs']}")
    return problems


def summary_rows(method: str, result: dict[str, Any]) -> list[str]:
    lines = []
    for label, row in result["candidates"].items():
        dev, eager, stream = row["device_vs_cpu"], row["device_eager_vs_cpu"], row["device_streaming_vs_cpu"]
        mk = row["device_vs_mergekit"]
        mk_text = (
            f"{mk['max_abs']:.2e}/{mk['outside']}" if mk["must_equal"] else f"ratio {mk['delta_norm_ratio']}"
        )
        bf16 = row.get("device_bf16_vs_cpu_bf16")
        bf16_text = f"{bf16['max_abs']:.1e}/{bf16['outside']}" if bf16 else "-"
        lines.append(
            f"{method:<17}{label:<11}{dev['max_abs']:>10.2e}{dev['outside']:>6}{dev.get('mask_mismatch', '-'):>6}"
            f"{eager['max_abs']:>10.2e}{stream['max_abs']:>10.2e}{stream.get('mask_mismatch', '-'):>6}"
            f"{mk_text:>18}{row['cpu_vs_mergekit']['max_abs']:>10.2e}"
            f"{bf16_text:>14}"
            f"{row['logits_device_vs_cpu_max_abs']:>10.1e}"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--bf16-methods", default="linear,ties,dare_ties,della", help="also compare bfloat16")
    parser.add_argument("--out", type=Path, help="write the full report here (JSON)")
    parser.add_argument("--no-compile", action="store_true", help="eager device kernels (smoke-testing)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    counter = FallbackCounter()
    logging.getLogger("merger.engine.kernels").addHandler(counter)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bf16_methods = {m.strip() for m in args.bf16_methods.split(",") if m.strip()}
    environment = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "cuda": torch.version.cuda,
        "compile": not args.no_compile,
    }
    print(f"# {environment}", flush=True)
    report: dict[str, Any] = {"environment": environment, "methods": {}, "errors": {}}
    problems: list[str] = []
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cuda-check-") as scratch:
        paths = build_sources(Path(scratch))
        for method in methods:
            started = time.perf_counter()
            try:
                result = check_method(method, paths, args.device, method in bf16_methods, not args.no_compile)
            except Exception as error:  # report every method even when one breaks
                report["errors"][method] = traceback.format_exc()
                problems.append(f"{method}: {type(error).__name__}: {error}")
                print(f"# {method}: ERROR\n{traceback.format_exc()}", flush=True)
                continue
            result["seconds"] = round(time.perf_counter() - started, 1)
            report["methods"][method] = result
            problems += failures(method, result)
            lines += summary_rows(method, result)
            print(f"# {method} ({result['seconds']} s): {json.dumps(result['candidates'])}", flush=True)
            if args.out:
                args.out.write_text(json.dumps(report, indent=1))
    report["compile_fallbacks"] = counter.messages
    report["problems"] = problems
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print(f"compile fallbacks to eager: {len(counter.messages)} {counter.messages[:3]}")
    print(
        f"{'method':<17}{'candidate':<11}{'dev-cpu':>10}{'out':>6}{'mask':>6}{'eager-cpu':>10}{'stream':>10}"
        f"{'mask':>6}{'dev-mergekit/out':>18}{'cpu-mk':>10}{'bf16 dev-cpu':>14}{'logits':>10}"
    )
    print("\n".join(lines))
    print("problems:" if problems else "all comparisons within tolerance")
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
