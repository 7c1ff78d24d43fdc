"""What the ledger's weights digest costs next to the merge it fingerprints.

Per method, interleaved: the resident engine's apply (one candidate), `model_digest` of the merged model
(xxh3-128, what the ledger records), and for comparison sha256 over the same parameter bytes.

Usage: python benchmarks/digest_cost.py [--shape smollm2|tiny] [--random] [--methods ties,dare_ties]
       [--repeats 5]
The last line printed is one JSON object {method: {merge_s, digest_s, sha256_s, digest_over_merge}}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_speed import build_base, build_specialist, method_configs  # noqa: E402

from merger.engine.plan import resolve_plan  # noqa: E402
from merger.engine.resident import ResidentEngine  # noqa: E402
from merger.engine.weights import model_digest  # noqa: E402


def sha256_seconds(model: torch.nn.Module) -> float:
    started = time.perf_counter()
    digest = hashlib.sha256()
    for _, parameter in sorted(model.named_parameters()):
        digest.update(parameter.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    digest.hexdigest()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--random", action="store_true")
    parser.add_argument("--methods", default="task_arithmetic,ties,dare_ties")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        base, label = build_base(root, args.random, args.shape)
        paths = {"base": base}
        for index in (1, 2):
            paths[f"specialist{index}"] = build_specialist(base, root / f"specialist{index}", seed=index)
        names = {str(path): name for name, path in paths.items()}
        parameters = None
        for method in args.methods.split(","):
            sources = paths if method != "slerp" else {k: paths[k] for k in ("base", "specialist1")}
            engine = ResidentEngine(sources, "base", method)  # kernels compiled as a run would
            parameters = sum(p.numel() for p in engine.model.parameters())
            plans = [
                resolve_plan(config, engine.tensor_names, names, engine.num_layers)
                for config in method_configs(method, paths)
            ]
            engine.apply(plans[0])
            merges, digests, shas = [], [], []
            for index in range(args.repeats):
                started = time.perf_counter()
                engine.apply(plans[index % 2])
                merges.append(time.perf_counter() - started)
                started = time.perf_counter()
                model_digest(engine.model)
                digests.append(time.perf_counter() - started)
                shas.append(sha256_seconds(engine.model))
            merge_s, digest_s = statistics.median(merges), statistics.median(digests)
            results[method] = {
                "merge_s": round(merge_s, 4),
                "digest_s": round(digest_s, 4),
                "sha256_s": round(statistics.median(shas), 4),
                "digest_over_merge": round(digest_s / merge_s, 3),
            }
            print(f"{method:16s} {results[method]}")
            del engine
    print(
        f"# {label}: {parameters:,} parameters, float32, {args.repeats} repeats, torch threads "
        f"{torch.get_num_threads()}"
    )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
