"""One way into lm-eval: only merger.scoring.lm_eval_bridge imports it, and fitness, the router's outcome table and
the zoo all score through it (same task loading, same numbers)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from merger.recipe import EvalSet
from merger.router.outcomes import build_outcome_table
from merger.router.pool import load_pool
from merger.scoring import lm_eval_bridge
from merger.scoring.fitness import TaskSuite, load_tokenizer

PACKAGE = Path(lm_eval_bridge.__file__).resolve().parent
ITEMS = 8


def _imports_lm_eval(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        if any(name == "lm_eval" or name.startswith("lm_eval.") for name in names):
            return True
    return False


def test_only_the_bridge_imports_lm_eval() -> None:
    importers = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if _imports_lm_eval(p))
    assert importers == ["lm_eval_bridge.py"]


def test_fitness_and_router_outcomes_score_the_same_items_alike(
    tmp_path: Path, tiny_sources: dict[str, Path], tiny_evals: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fitness score of a checkpoint is the mean of the router's per-item outcomes for it."""
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    checkpoint = tiny_sources["specialist1"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    lm = lm_eval_bridge.quiet_lm(model, load_tokenizer(checkpoint), batch_size=4)
    suite = TaskSuite(EvalSet(tasks=[{"name": "tiny_mc", "metric": "acc"}], limit=ITEMS), (str(tiny_evals),))
    fitness_score = suite.score(lm)["tiny_mc"]

    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(
        f"members:\n  - {{name: a, path: {checkpoint}}}\n  - {{name: b, path: {tiny_sources['base']}}}\n"
        f"tasks: {{names: [tiny_mc], include_path: {tiny_evals}, limit: {ITEMS}, batch_size: 4}}\n"
        "work_dir: work\n"
    )
    table = build_outcome_table(load_pool(pool_file))
    assert table.correct.shape == (ITEMS, 2)
    assert float(np.mean(table.correct[:, 0])) == pytest.approx(fitness_score)


TWO_FILTERS_TASK = """task: tiny_two_filters
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "unanswerable"
generation_kwargs:
  until: ["."]
  max_gen_toks: 2
  do_sample: false
filter_list:
  - name: strict
    filter:
      - function: take_first
  - name: fallback
    filter:
      - function: regex
        regex_pattern: "(never matches this)"
        fallback: "unanswerable"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_fitness_and_router_outcomes_read_a_task_with_two_filters_by_one_rule(
    tmp_path: Path, tiny_sources: dict[str, Path], tiny_evals: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lm-eval logs each item once per filter: the `strict` filter scores every item 0 (a random model never
    says "unanswerable"), the `fallback` filter scores every item 1. Both readers take the task's first
    metric (strict) unless a metric names another, and read each item once, from that filter."""
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    evals = tmp_path / "evals"
    evals.mkdir()
    (evals / "tiny_two_filters.yaml").write_text(TWO_FILTERS_TASK.format(data=tiny_evals / "tiny_gen.jsonl"))
    checkpoint = tiny_sources["base"]
    lm = lm_eval_bridge.quiet_lm(
        AutoModelForCausalLM.from_pretrained(checkpoint).eval(), load_tokenizer(checkpoint), batch_size=4
    )

    def fitness_items(metric: str | None) -> tuple[float, dict[int, float]]:
        task = {"name": "tiny_two_filters", "metric": metric}
        scores, items = TaskSuite(EvalSet(tasks=[task], limit=ITEMS), (str(evals),)).score_logged(lm)
        return scores["tiny_two_filters"], items["tiny_two_filters"]

    assert fitness_items(None) == (0.0, dict.fromkeys(range(ITEMS), 0.0))
    assert fitness_items("exact_match,fallback") == (1.0, dict.fromkeys(range(ITEMS), 1.0))

    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(
        f"members:\n  - {{name: a, path: {checkpoint}}}\n"
        f"tasks: {{names: [tiny_two_filters], include_path: {evals}, limit: {ITEMS}, batch_size: 4}}\n"
        "work_dir: work\n"
    )
    table = build_outcome_table(load_pool(pool_file))
    assert sorted(table.item_ids) == sorted(f"tiny_two_filters:{doc}" for doc in range(ITEMS))
    assert table.correct[:, 0].tolist() == [0.0] * ITEMS


def test_a_task_manager_is_built_once_per_process_and_path_set(tiny_evals: Path) -> None:
    paths = (str(tiny_evals),)
    manager = lm_eval_bridge.task_manager_for(["tiny_mc"], paths)
    assert lm_eval_bridge.task_manager_for(["tiny_gen"], paths) is manager
    assert "tiny_mc" in manager.all_tasks and "hellaswag" not in manager.all_tasks  # no built-ins needed


def test_num_fewshot_overrides_unless_a_task_pins_zero(tiny_evals: Path) -> None:
    loaded = lm_eval_bridge.load_tasks(["tiny_mc", "tiny_gen"], (str(tiny_evals),), num_fewshot=2)
    assert {name: task.get_config("num_fewshot") for name, task in loaded["tasks"].items()} == {
        "tiny_mc": 2, "tiny_gen": 2,
    }
    plain = lm_eval_bridge.load_tasks(["tiny_mc"], (str(tiny_evals),))
    assert plain["tasks"]["tiny_mc"].get_config("num_fewshot") == 0
