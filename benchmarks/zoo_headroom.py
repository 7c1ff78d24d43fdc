"""How much a merge can gain: the base, each specialist and plain task-arithmetic merges on every zoo task.

    python benchmarks/zoo_headroom.py [--limit N] [--weights 1.0,0.5 ...]

Prints one row per model with exact-match accuracy on each task's validation and test split. This is a
measurement script for choosing the zoo's skills, not part of the search.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merger.common.bundled import bundled_dir  # noqa: E402
from merger.scoring.lm_eval_bridge import evaluate_tasks, load_tasks, quiet_lm  # noqa: E402
from merger.zoo.data import task_names  # noqa: E402


def task_arithmetic(base_state: dict, specialist_states: list[dict], weights: list[float]) -> dict:
    """base + sum_i w_i * (specialist_i - base), tensor by tensor."""
    merged = {}
    for name, base_tensor in base_state.items():
        value = base_tensor.clone()
        for state, weight in zip(specialist_states, weights, strict=True):
            value += weight * (state[name] - base_tensor)
        merged[name] = value
    return merged


def evaluate_all(lm, loaded_tasks, limit: int | None) -> dict[str, float]:
    results = evaluate_tasks(lm, loaded_tasks, limit=limit)["results"]
    return {task: metrics["exact_match,none"] for task, metrics in results.items()}


def main() -> None:
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merger.zoo.build import build_zoo
    from merger.zoo.smollm2 import base_checkpoint

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    parser.add_argument("--weights", nargs="*", default=["1.0,1.0", "1.0,0.5", "0.7,0.7"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", nargs="*", help="evaluate only these rows (base, a skill, or a TA label)")
    parser.add_argument("--zoo-dir", type=Path, help="a built specialists-<key> dir (default: build the zoo)")
    parser.add_argument("--tasks", nargs="*", help="task names (default: every zoo task)")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    if args.zoo_dir is None:
        paths = build_zoo()
    else:
        skills = json.loads((args.zoo_dir / "recipe.json").read_text())["skills"]
        paths = {"base": base_checkpoint(), **{skill: args.zoo_dir / skill for skill in skills}}
    print(f"zoo ready in {time.perf_counter() - started:.1f} s: {paths}", flush=True)
    names = args.tasks or task_names()
    loaded_tasks = load_tasks(names, (str(bundled_dir("evals")),))
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32).eval()
    lm = quiet_lm(model, tokenizer, args.batch_size)
    states = {
        name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
        for name, path in paths.items()
        if (path / "model.safetensors").is_file()
    }
    skills = [name for name in paths if name != "base"]
    # The base rambles to max_gen_toks on every item, so it goes last.
    candidates: list[tuple[str, dict]] = [(name, states[name]) for name in states if name != "base"]
    for spec in args.weights if set(skills) <= set(states) else []:
        weights = [float(w) for w in spec.split(",")]
        label = "TA " + " ".join(f"{w:g}*{s}" for s, w in zip(skills, weights, strict=True))
        candidates.append((label, task_arithmetic(states["base"], [states[s] for s in skills], weights)))

    candidates.append(("base", states["base"]))
    print("model | " + " | ".join(names))
    for label, state in candidates:
        if args.models and label not in args.models:
            continue
        model.load_state_dict(state)
        began = time.perf_counter()
        scores = evaluate_all(lm, loaded_tasks, args.limit)
        cells = " | ".join(f"{scores[name]:.3f}" for name in names)
        print(f"{label} | {cells} | {time.perf_counter() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()
