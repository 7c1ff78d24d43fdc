"""Teacher-forced scoring: the `*_tf` twins of generated tasks, greedy match (`acc`) and `gold_prob`."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from merger.common.errors import MergerError
from merger.recipe import EvalSet, parse_recipe
from merger.rundir.ledger import Ledger
from merger.scoring.fitness import TaskSuite
from merger.scoring.lm_eval_bridge import load_tasks, quiet_lm
from merger.search.open import open_run
from merger.zoo import data
from tests.test_overnight import recipe_data, run_here
from tests.tiny_models import build_model, build_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
FOLDER = "tiny_tf"
TASK = "tiny_sum_val"
TWIN = TASK + data.TEACHER_FORCED_SUFFIX
TRAINED = 6  # the first items, which the fine-tuned model learns


def sum_rows(count: int = 12) -> list[data.Row]:
    rng = random.Random(7)
    pairs = [(rng.randint(0, 30), rng.randint(0, 30)) for _ in range(count)]
    return [{"question": f"what is {a} plus {b}?", "answer": str(a + b)} for a, b in pairs]


def tiny_yaml(task: str, data_file: str) -> str:
    return data.task_yaml(task, data_file, "# tiny", max_gen_toks=8, ignore_punctuation=False)


@pytest.fixture
def tf_evals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A generate task and its teacher-forced twin on one jsonl, written by the zoo's own writer; the
    YAML names its data as `evals/<folder>/data/...`, so the test runs from the folder above `evals`."""
    monkeypatch.chdir(tmp_path)
    data.write_eval_data(
        tmp_path / "evals", FOLDER, {"sum_val": sum_rows()}, "tiny_", tiny_yaml, data.teacher_forced_yaml
    )
    return tmp_path / "evals" / FOLDER


def trained_texts(rows: list[data.Row]) -> list[str]:
    return [data.prompt_text(row) + data.completion_text(row) for row in rows]


def fine_tuned(tmp_path: Path, texts: list[str], steps: int = 300) -> tuple[torch.nn.Module, object]:
    """The tiny random model, trained on `texts` (prompt + completion) until it answers them."""
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    model = build_model(tmp_path / "model", tokenizer, seed=0)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    torch.manual_seed(0)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    model.eval()
    return model, tokenizer


def item_scores(evals: Path, lm: object, task: str, metric: str | None) -> dict[int, float]:
    suite = TaskSuite(EvalSet(tasks=[{"name": task, "metric": metric}]), (str(evals),))
    return suite.score_logged(lm)[1][task]


def test_bundled_twins_score_the_trained_completion_after_the_same_prompt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # data files are anchored at the bundle root, not the working directory
    tasks = load_tasks(["zoo_mix_val", "zoo_mix_val_tf"], (str(REPO_ROOT / "evals" / "zoo"),))["tasks"]
    generate, twin = tasks["zoo_mix_val"], tasks["zoo_mix_val_tf"]
    assert twin.get_config("output_type") == "loglikelihood"
    row = data.generate()["mix_val"][0]
    doc = next(iter(twin.test_docs()))
    assert twin.doc_to_text(doc) == generate.doc_to_text(doc) == data.prompt_text(row)
    assert twin.doc_to_target(doc) == data.completion_text(row) == f" {row['answer']}\n"


def test_greedy_match_equals_generated_exact_match_item_by_item(tf_evals: Path, tmp_path: Path) -> None:
    """A tiny model fine-tuned on half the items answers those and misses the others; the twin's greedy
    match agrees with generated exact match on every item, and gold_prob ranks the learnt items higher."""
    model, tokenizer = fine_tuned(tmp_path, trained_texts(sum_rows()[:TRAINED]))
    lm = quiet_lm(model, tokenizer, batch_size=4)
    generated = item_scores(tf_evals, lm, TASK, None)
    greedy = item_scores(tf_evals, lm, TWIN, "acc")
    gold = item_scores(tf_evals, lm, TWIN, "gold_prob")
    assert greedy == generated
    assert {doc for doc, value in generated.items() if value == 1.0} >= set(range(TRAINED - 1))
    assert 0.0 in generated.values(), "the tiny model answered every item, so no item can disagree"
    assert all(0.0 <= value <= 1.0 for value in gold.values())
    right = [gold[doc] for doc, value in greedy.items() if value == 1.0]
    wrong = [gold[doc] for doc, value in greedy.items() if value == 0.0]
    assert min(right) > max(wrong)


def test_greedy_match_needs_the_exact_gold_tokens_where_exact_match_normalises(
    tf_evals: Path, tmp_path: Path
) -> None:
    """Taught to answer item 0 with a space before the newline, the model's generated answer still
    matches (exact match strips surrounding spaces), but its greedy tokens are not the gold ones."""
    rows = sum_rows()[:TRAINED]
    texts = [data.prompt_text(rows[0]) + f" {rows[0]['answer']} \n", *trained_texts(rows[1:])]
    model, tokenizer = fine_tuned(tmp_path, texts)
    lm = quiet_lm(model, tokenizer, batch_size=4)
    generated = item_scores(tf_evals, lm, TASK, None)
    greedy = item_scores(tf_evals, lm, TWIN, "acc")
    assert generated[0] == 1.0 and greedy[0] == 0.0
    assert {doc: value for doc, value in greedy.items() if doc} == {
        doc: value for doc, value in generated.items() if doc
    }


def test_gold_prob_is_the_probability_of_the_gold_continuation(tf_evals: Path, tmp_path: Path) -> None:
    """exp of lm-eval's logged log-likelihood; the task score is the mean of the items."""
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    model = build_model(tmp_path / "model", tokenizer, seed=0)
    suite = TaskSuite(EvalSet(tasks=[{"name": TWIN, "metric": "gold_prob"}]), (str(tf_evals),))
    output = suite.run(quiet_lm(model, tokenizer, batch_size=4), log_samples=True)
    from merger.scoring.results import item_values, task_score

    logged = {int(sample["doc_id"]): sample["perplexity"] for sample in output["samples"][TWIN]}
    values = item_values(output, TWIN, "gold_prob")
    assert values == pytest.approx({doc: math.exp(ll) for doc, ll in logged.items()})
    assert task_score(output, TWIN, "gold_prob") == pytest.approx(sum(values.values()) / len(values))


@pytest.mark.parametrize("strategy", ["full", "racing"])
@pytest.mark.slow  # a search
def test_a_search_runs_on_gold_prob_and_records_each_item(
    strategy: str, tiny_sources: dict[str, Path], tf_evals: Path, tmp_path: Path
) -> None:
    fitness = {"tasks": [{"name": TWIN, "metric": "gold_prob"}], "strategy": strategy}
    if strategy == "racing":
        fitness["racing"] = {"block": 4, "bound": "hoeffding", "delta": 0.5}
    data_ = recipe_data(tiny_sources, tf_evals, fitness=fitness)
    result, _ = run_here(data_, tmp_path / "run")
    ledger = Ledger(tmp_path / "run")
    outcomes = ledger.item_outcomes()
    assert result.evaluations == 8 and outcomes
    values = [value for tasks in outcomes.values() for value in tasks[TWIN].values()]
    assert all(0.0 < value < 1.0 for value in values)  # continuous, never a 0/1 match
    best = ledger.best()
    scored = outcomes[best.candidate][TWIN]
    if len(scored) == len(sum_rows()):
        assert best.score == pytest.approx(sum(scored.values()) / len(scored))


@pytest.mark.parametrize(("task", "kind"), [("tiny_gen", "generate_until"), ("tiny_mc", "multiple_choice")])
def test_gold_prob_on_a_task_without_one_known_answer_is_refused_before_loading(
    task: str, kind: str, tiny_sources: dict[str, Path], tiny_evals: Path, tmp_path: Path
) -> None:
    data_ = recipe_data(tiny_sources, tiny_evals, fitness={"tasks": [{"name": task, "metric": "gold_prob"}]})
    with pytest.raises(MergerError) as raised:
        open_run(parse_recipe(data_), tmp_path / "run")
    message = str(raised.value)
    assert "\n" not in message and f"task {task} is {kind}" in message
    assert message.startswith("fitness.tasks.0.metric: metric gold_prob is teacher-forced")
    assert not (tmp_path / "run").exists()


def test_greedy_match_on_a_generating_task_is_refused(
    tiny_sources: dict[str, Path], tiny_evals: Path, tmp_path: Path
) -> None:
    data_ = recipe_data(tiny_sources, tiny_evals, validation={"tasks": [{"name": "tiny_gen", "metric": "acc"}]})
    with pytest.raises(MergerError, match=r"validation.tasks.0.metric: .*task tiny_gen generates its answer"):
        open_run(parse_recipe(data_), tmp_path / "run")
