"""Seconds per generation: the in-process executor vs Ray with 2 one-core workers, same recipe, one run.

Each evaluation gets one torch thread (the in-process run and every Ray worker alike), so with evaluation
dominating and 2 free cores Ray should approach 2x. Models are small random Llamas built here; tasks are the
tiny lm-eval tasks of the tests with more items. After each search the executor scores every source, as
the end of a run does. Prints one line per executor, the scoring ratio, then the ratio of seconds per
generation in-process / Ray as the last line.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/ray_scaling.py [--hidden 256 --layers 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from merger.executors.jobs import score_models  # noqa: E402
from merger.recipe import parse_recipe  # noqa: E402
from merger.search.loop import Search  # noqa: E402
from merger.search.open import open_run  # noqa: E402
from tests.tiny_models import build_tokenizer, write_tasks  # noqa: E402


def build_sources(root: Path, hidden: int, layers: int) -> dict[str, Path]:
    tokenizer = build_tokenizer(root / "tokenizer")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    paths = {}
    for index, name in enumerate(("base", "specialist1", "specialist2")):
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                reference = base.get_parameter(parameter_name)
                noise = torch.randn_like(reference) * reference.std().clamp_min(1e-3) * 0.3 * (index > 0)
                parameter.copy_(reference + noise)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def recipe_data(
    sources: dict[str, Path], evals: Path, args: argparse.Namespace, executor: dict
) -> dict[str, Any]:
    return {
        "sources": [{"name": name, "path": str(path)} for name, path in sources.items()],
        "base_model": "base",
        "genome": {
            "method": "task_arithmetic",
            "layer_granularity": 2,
            "parameters": {"weight": {"min": 0.0, "max": 1.0}},
        },
        "optimizer": {"popsize": args.popsize, "max_evaluations": args.popsize * args.generations, "seed": 1},
        "fitness": {"tasks": ["tiny_mc", "tiny_gen"], "batch_size": 8},
        "task_paths": [str(evals)],
        "executor": executor,
    }


def timed_run(data: dict[str, Any], run_dir: Path, sources: dict[str, Path]) -> tuple[float, float, float]:
    """(median seconds per generation, best score, seconds to score every source as the end of a run
    does) of a fresh run; start-up is not counted."""
    with open_run(parse_recipe(data), run_dir) as run:
        result = Search(run).run()
        seconds = [generation.seconds for generation in run.ledger.generations()]
        started = time.perf_counter()
        score_models(run.executor, [(path, "fitness") for path in sources.values()])
        scoring = time.perf_counter() - started
    return statistics.median(seconds), result.best.score, scoring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--items", type=int, default=48, help="items per task")
    parser.add_argument("--popsize", type=int, default=8)
    parser.add_argument("--generations", type=int, default=3)
    args = parser.parse_args()

    import ray

    torch.set_num_threads(1)  # one core per evaluation, as each Ray worker gets
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        sources = build_sources(root / "sources", args.hidden, args.layers)
        write_tasks(root / "evals", num_items=args.items)
        params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(sources["base"]).parameters())
        print(
            f"models: {params / 1e6:.1f}M parameters; {args.popsize} candidates x {args.generations} generations; "
            f"2 x {args.items} items per candidate; {os.cpu_count()} cores"
        )

        started = time.perf_counter()
        in_process, best_in_process, scoring_in_process = timed_run(
            recipe_data(sources, root / "evals", args, {"kind": "in_process"}), root / "in_process", sources
        )
        print(
            f"in-process (1 thread):        {in_process:.2f} s/generation  (best {best_in_process:.4f}); "
            f"scoring the {len(sources)} sources {scoring_in_process:.2f} s"
        )

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            on_ray, best_ray, scoring_on_ray = timed_run(
                recipe_data(
                    sources, root / "evals", args, {"kind": "ray", "num_workers": 2, "cpus_per_worker": 1}
                ),
                root / "ray",
                sources,
            )
        finally:
            ray.shutdown()
        print(
            f"ray, 2 workers x 1 core:      {on_ray:.2f} s/generation  (best {best_ray:.4f}); "
            f"scoring the {len(sources)} sources {scoring_on_ray:.2f} s"
        )
        print(f"scoring {len(sources)} sources, in-process / ray: {scoring_in_process / scoring_on_ray:.2f}")
        print(
            f"same best: {best_ray == best_in_process}; wall time {time.perf_counter() - started:.0f} s; "
            f"load average {os.getloadavg()[1]:.1f} over the last 5 min on {os.cpu_count()} cores "
            "(the ratio nears 2 only when 2 cores are free)"
        )
        print(f"in-process / ray: {in_process / on_ray:.2f}")


if __name__ == "__main__":
    main()
