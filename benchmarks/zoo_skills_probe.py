"""Does each specialist of the multi-skill zoo know its skill, and only its skill?

    python benchmarks/zoo_skills_probe.py [--limit 40]

Scores the base and the four specialists (`zoo:skills/add`, `/sort`, `/rev`, `/date`; built and cached
on first use) on each skill's selection split (`skills_SKILL_sel`, generated exact match, fp32, one
thread). The test splits are never read here: this is a check of the testbed, made before any search.
The last line is JSON: {model: {task: exact match}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from merger.common.bundled import bundled_dir  # noqa: E402
from merger.scoring.fitness import load_tokenizer  # noqa: E402
from merger.scoring.lm_eval_bridge import evaluate_tasks, load_tasks, quiet_lm  # noqa: E402
from merger.zoo.build import zoo_checkpoint  # noqa: E402

SKILLS = ("add", "sort", "rev", "date")
MODELS = {"base": "zoo:base"} | {skill: f"zoo:skills/{skill}" for skill in SKILLS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=40, help="items per task")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    tasks = [f"skills_{skill}_sel" for skill in SKILLS]
    loaded = load_tasks(tasks, (str(bundled_dir("evals") / "skills"),))
    paths = {name: zoo_checkpoint(reference) for name, reference in MODELS.items()}
    tokenizer = load_tokenizer(paths["base"])
    table = {}
    for name, path in paths.items():
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        results = evaluate_tasks(quiet_lm(model, tokenizer, args.limit), loaded, limit=args.limit)["results"]
        table[name] = {task: round(float(results[task]["exact_match,none"]), 3) for task in tasks}
        cells = "  ".join(f"{task.removeprefix('skills_')}={value:.3f}" for task, value in table[name].items())
        print(f"{name:<5} {cells}  ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"load average {[round(x, 2) for x in os.getloadavg()]}  limit {args.limit}")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
