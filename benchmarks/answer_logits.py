"""Teacher-forced scoring with the output head over every position (lm-eval's HFLM) vs only at the
answer's positions (`merger.scoring.answer_logits`), fp32 and bf16, side by side in one run.

The task's loglikelihood requests (a `_tf` twin: prompt, then the gold answer) are scored on the real
SmolLM2-135M (`zoo:base`, from MERGER_CACHE) by each of the four scorers in turn, `--repeats` times with
the order rotated; the median seconds per item is printed for each, with the answer-only path's speedup
and its agreement with the full path (largest |log-probability difference| and is-greedy agreement),
the prompt and answer lengths in tokens, the positions per item the output head ran over, and the load average it ran under. The last line is JSON.

Usage: python benchmarks/answer_logits.py [--task skills_mix_fit_tf] [--limit 200] [--batch-size 50]
       [--fewshot 0] [--repeats 3] [--source zoo:base]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from merger.scoring.fitness import BUNDLED_EVALS, load_tokenizer  # noqa: E402
from merger.scoring.lm_eval_bridge import load_tasks, quiet_lm  # noqa: E402
from merger.scoring.precision import ScoringModel  # noqa: E402

SCORERS = ("fp32 full", "fp32 answer-only", "bf16 full", "bf16 answer-only")
Answers = list[tuple[float, bool]]


def task_requests(task_name: str, limit: int, fewshot: int) -> list[Any]:
    """The task's loglikelihood requests for its first `limit` items, as lm-eval's evaluate builds them."""
    task = load_tasks([task_name], (str(BUNDLED_EVALS),), fewshot)["tasks"][task_name]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return list(task.instances)


def token_lengths(lm: Any, requests: list[Any]) -> dict[str, float]:
    """Median prompt and answer lengths in tokens, as lm-eval splits them."""
    pairs = [lm._encode_pair(*request.args) for request in requests]
    return {
        "prompt_tokens": statistics.median(len(context) for context, _ in pairs),
        "answer_tokens": statistics.median(len(answer) for _, answer in pairs),
    }


def timed(lm: Any, requests: list[Any]) -> tuple[Answers, float, int]:
    """lm's answers, the seconds they took, and how many positions went through the output head."""
    positions = 0

    def count(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        nonlocal positions
        positions += inputs[0].shape[:-1].numel()

    hook = lm.model.get_output_embeddings().register_forward_pre_hook(count)
    try:
        started = time.perf_counter()
        answers = lm.loglikelihood(requests)
        return answers, time.perf_counter() - started, positions
    finally:
        hook.remove()


def agreement(full: Answers, answer_only: Answers) -> dict[str, float]:
    """Largest |log-probability difference| and the share of items with the same is-greedy."""
    return {
        "max_abs_logprob_diff": max(abs(a[0] - b[0]) for a, b in zip(full, answer_only, strict=True)),
        "greedy_agreement": sum(a[1] == b[1] for a, b in zip(full, answer_only, strict=True)) / len(full),
    }


def compare(source: str, task_name: str, limit: int, batch_size: int, fewshot: int, repeats: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from merger.sources.resolve import resolve_path

    path = resolve_path(source)
    tokenizer = load_tokenizer(path)
    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    bf16 = ScoringModel(fp32, "bf16").model
    lms = {
        name: quiet_lm(model, tokenizer, batch_size, answer_logits_only=name.endswith("answer-only"))
        for name, model in zip(SCORERS, (fp32, fp32, bf16, bf16), strict=True)
    }
    requests = task_requests(task_name, limit, fewshot)
    seconds: dict[str, list[float]] = {name: [] for name in SCORERS}
    answers: dict[str, Answers] = {}
    head_positions: dict[str, int] = {}
    for repeat in range(repeats):
        for name in SCORERS[repeat % len(SCORERS) :] + SCORERS[: repeat % len(SCORERS)]:
            answers[name], elapsed, head_positions[name] = timed(lms[name], requests)
            seconds[name].append(elapsed)
    per_item = {name: statistics.median(values) / len(requests) for name, values in seconds.items()}
    return {
        "source": source,
        "task": task_name,
        "items": len(requests),
        "batch_size": batch_size,
        "fewshot": fewshot,
        "repeats": repeats,
        **token_lengths(lms[SCORERS[0]], requests),
        "head_positions_per_item": {
            name: round(positions / len(requests), 1) for name, positions in head_positions.items()
        },
        "ms_per_item": {name: round(1000 * value, 2) for name, value in per_item.items()},
        "speedup": {
            precision: round(per_item[f"{precision} full"] / per_item[f"{precision} answer-only"], 2)
            for precision in ("fp32", "bf16")
        },
        "agreement": {
            precision: agreement(answers[f"{precision} full"], answers[f"{precision} answer-only"])
            for precision in ("fp32", "bf16")
        },
        "loadavg": [round(load, 2) for load in os.getloadavg()],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"{result['source']} on {result['task']}: {result['items']} items, batch {result['batch_size']}, "
        f"{result['fewshot']}-shot, median prompt {result['prompt_tokens']} / answer {result['answer_tokens']} "
        f"tokens, median of {result['repeats']} runs",
        "output-head positions per item: full "
        f"{result['head_positions_per_item']['fp32 full']}, answer-only "
        f"{result['head_positions_per_item']['fp32 answer-only']}",
        f"{'precision':<10}{'full ms/item':>14}{'answer-only ms/item':>21}{'speedup':>9}"
        f"{'max |dlogp|':>13}{'greedy same':>13}",
    ]
    for precision in ("fp32", "bf16"):
        same = result["agreement"][precision]
        lines.append(
            f"{precision:<10}{result['ms_per_item'][f'{precision} full']:>14}"
            f"{result['ms_per_item'][f'{precision} answer-only']:>21}{result['speedup'][precision]:>8}x"
            f"{same['max_abs_logprob_diff']:>13.2e}{100 * same['greedy_agreement']:>12.1f}%"
        )
    lines.append(
        f"load average {result['loadavg']}  OMP_NUM_THREADS={result['omp_num_threads']}  "
        f"torch threads {result['torch_threads']}"
    )
    lines.append(json.dumps(result))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="zoo:base")
    parser.add_argument("--task", default="skills_mix_fit_tf")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--fewshot", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = compare(args.source, args.task, args.limit, args.batch_size, args.fewshot, args.repeats)
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
