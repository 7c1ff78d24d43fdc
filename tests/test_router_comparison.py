"""`merger router eval`: the merge-or-route table over several held-out splits, and its bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from merger.cli import main
from merger.common.errors import MergerError
from merger.router.comparison import (
    SPECIALISTS,
    check_splits,
    format_comparison,
    member_subsets,
    oracle_choices,
    row_key,
    run_split,
    summarize,
)
from merger.router.outcomes import OutcomeTable, build_outcome_table
from merger.router.pool import RouterSettings, load_pool
from merger.router.rows import KNN_ROW, LOGISTIC_ROW, ORACLE_ROW, ROUTED_ROWS, ROUTER_ROW
from tests.test_router_head import MEMBERS, clustered_table
from tests.test_router_outcomes import write_pool
from tests.test_router_pool import write_finished_run
from tests.tiny_models import write_tasks

ENCODER = {"id": "synthetic", "seconds": 0.001, "gib": 0.5}


def synthetic_report(splits: int = 5) -> dict:
    table, embeddings = clustered_table(items=150, seed=4)
    settings = RouterSettings(hidden_size=8, evaluations=1500)
    results = []
    for number in range(splits):
        train, held_out = table.split(0.3, seed=number)
        split_settings = settings.model_copy(update={"seed": number})
        results.append(run_split(table, embeddings, train, held_out, "synthetic", split_settings))
    member_gib = {"maths": 1.0, "geography": 2.0, "generalist": None}
    return summarize(table, results, member_gib, ENCODER)


def test_every_row_has_an_interval_around_it_and_the_oracle_bounds_them_all() -> None:
    report = synthetic_report()
    rows = report["rows"]
    assert list(rows) == [*MEMBERS, ROUTER_ROW, LOGISTIC_ROW, KNN_ROW, ORACLE_ROW]
    for name, row in rows.items():
        low, high = row["interval"]
        assert low <= row["accuracy"] <= high, name
        assert len(row["per_split"]) == 5
        assert row["accuracy"] == pytest.approx(np.mean(row["per_split"]))
        for split, oracle in zip(row["per_split"], rows[ORACLE_ROW]["per_split"], strict=True):
            assert split <= oracle, name
    # each topic has one right member, so the head, which sees the topics, closes most of the gap
    assert report["gap_closed"][ROUTER_ROW]["mean"] >= 0.75
    assert len(report["gap_closed"][ROUTER_ROW]["per_split"]) == 5
    assert report["head_parameters"] < 20_000


def test_resident_members_and_seconds_follow_the_choices() -> None:
    rows = synthetic_report(splits=2)["rows"]
    assert rows["maths"]["resident"] == ["maths"] and rows["maths"]["resident_gib"] == 1.0
    assert rows["generalist"]["resident_gib"] == 0.0  # remote: nothing resident here
    # the router answers with all three members and keeps the encoder (0.5 GiB) beside them
    assert sorted(rows[ROUTER_ROW]["resident"]) == sorted(MEMBERS)
    assert rows[ROUTER_ROW]["resident_gib"] == pytest.approx(3.5)
    # every recorded latency is 1 s; routing adds the encoder's time and the choosing
    assert rows["maths"]["seconds_per_answer"] == pytest.approx(1.0)
    for name in ROUTED_ROWS:
        assert rows[name]["seconds_per_answer"] > 1.0 + ENCODER["seconds"] - 1e-9
    assert rows[ORACLE_ROW]["seconds_per_answer"] == pytest.approx(1.0)


def test_each_rows_accuracy_per_task_is_its_share_right_on_that_tasks_held_out_items() -> None:
    report = synthetic_report(splits=2)
    table, _ = clustered_table(items=150, seed=4)
    splits = [table.split(0.3, seed=number)[1] for number in range(2)]
    topics = list(dict.fromkeys(table.tasks))
    for name in MEMBERS:
        column = table.members.index(name)
        expected = {
            task: np.mean([table.correct[rows, column][np.array(table.tasks)[rows] == task].mean() for rows in splits])
            for task in topics
        }
        assert report["rows"][name]["tasks"] == pytest.approx(expected), name
    assert set(report["rows"][ORACLE_ROW]["tasks"]) == set(topics)
    text = format_comparison(report)
    assert "accuracy per task" in text


def with_merged_members(table: OutcomeTable, seed: int = 0) -> OutcomeTable:
    """The clustered table plus a merged `winner` (right on 80% of the maths and geography topics) and an
    untuned `baseline` (right on 30% of every item)."""
    rng = np.random.default_rng(seed)
    topic = np.array([int(task.removeprefix("topic")) for task in table.tasks])
    winner = (topic < 2) & (rng.random(len(topic)) < 0.8)
    baseline = rng.random(len(topic)) < 0.3
    correct = np.column_stack([table.correct, winner, baseline]).astype(float)
    return OutcomeTable(
        table.item_ids,
        table.tasks,
        table.prompts,
        [*table.members, "winner", "baseline"],
        correct,
        np.ones_like(correct),
    )


def test_the_subset_rule_gives_the_specialists_and_the_specialists_plus_each_merged_model() -> None:
    members = ["base", "add", "sort", "winner", "baseline"]
    subsets = member_subsets(members, ["winner", "baseline"])
    assert [(subset.name, subset.columns.tolist()) for subset in subsets] == [
        (SPECIALISTS, [0, 1, 2]),
        (f"{SPECIALISTS} + winner", [0, 1, 2, 3]),
        (f"{SPECIALISTS} + baseline", [0, 1, 2, 4]),
    ]
    # one merged member: the specialists plus it are the whole pool, which has its own rows
    assert [subset.name for subset in member_subsets(members[:4], ["winner"])] == [SPECIALISTS]
    # no merged member, or one specialist alone (no routing over one member): no subset rows
    assert member_subsets(members, []) == []
    assert [
        subset.name for subset in member_subsets(["base", "winner", "baseline"], ["winner", "baseline"])
    ] == [
        f"{SPECIALISTS} + winner",
        f"{SPECIALISTS} + baseline",
    ]


def test_subset_rows_choose_only_their_members_and_their_oracle_is_below_the_pools() -> None:
    clustered, embeddings = clustered_table(items=150, seed=4)
    table = with_merged_members(clustered)
    merged = ["winner", "baseline"]
    subsets = member_subsets(table.members, merged)
    settings = RouterSettings(hidden_size=8, evaluations=1500)
    results = []
    for number in range(3):
        train, held_out = table.split(0.3, seed=number)
        split_settings = settings.model_copy(update={"seed": number})
        results.append(run_split(table, embeddings, train, held_out, "synthetic", split_settings, subsets))
    for split in results:
        for subset in subsets:
            for row in (ROUTER_ROW, ORACLE_ROW):
                chosen = set(split.choices[row_key(row, subset.name)].tolist())
                assert chosen <= set(subset.columns.tolist()), (row, subset.name)
    notes = {"winner": "merged winner", "baseline": "best untuned merge baseline"}
    report = summarize(table, results, {}, ENCODER, member_notes=notes, merged=merged)
    rows = report["rows"]
    specialists_rows = [row_key(row, SPECIALISTS) for row in (ROUTER_ROW, LOGISTIC_ROW, KNN_ROW, ORACLE_ROW)]
    assert set(specialists_rows) <= set(rows)
    assert row_key(ROUTER_ROW, f"{SPECIALISTS} + winner") in rows
    assert row_key(LOGISTIC_ROW, f"{SPECIALISTS} + winner") not in rows  # baselines: pool and specialists
    assert list(rows)[-1] == ORACLE_ROW
    for name, row in rows.items():
        low, high = row["interval"]
        assert low <= row["accuracy"] <= high, name
    for subset in subsets:
        subset_oracle = rows[row_key(ORACLE_ROW, subset.name)]["per_split"]
        assert all(s <= o for s, o in zip(subset_oracle, rows[ORACLE_ROW]["per_split"], strict=True))
        assert rows[row_key(ROUTER_ROW, subset.name)]["choosable"] == [
            table.members[c] for c in subset.columns
        ]
        assert row_key(ROUTER_ROW, subset.name) in report["gap_closed"]
    assert rows[ROUTER_ROW]["scope"] == f"{SPECIALISTS} + winner + baseline"
    assert rows["winner"]["note"] == "merged winner" and rows["maths"]["note"] is None
    text = format_comparison(report)
    for label in (
        "\nwinner (merged winner)",
        "\nrouter over specialists (sep-CMA-ES head",
        "\nrouter over specialists + winner (sep-CMA-ES head",
        "\nk-NN over specialists (k=5)",
        "\noracle over specialists + baseline",
    ):
        assert label in text, label


def test_the_oracle_takes_the_preferred_member_among_those_right() -> None:
    correct = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0], [1, 0, 1]], dtype=float)
    preference = np.array([2, 0, 1])
    assert oracle_choices(correct, preference).tolist() == [0, 2, 2, 2]


def test_a_split_without_training_items_is_refused() -> None:
    table, _ = clustered_table(items=30)
    empty_train = (np.array([], dtype=int), np.arange(30))
    with pytest.raises(MergerError, match="split 2 of 2 .* leaves no training items for members maths"):
        check_splits(table, [table.split(0.3, 0), empty_train], 0.99)


def error_line(stderr: str) -> str:
    """The one line the CLI prints for a MergerError (progress lines come before it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("merger: error:")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0])
    return errors[0]


@pytest.fixture
def three_member_pool(tmp_path: Path, tiny_sources: dict[str, Path], tiny_evals: Path) -> Path:
    members = {
        "base": tiny_sources["base"],
        "s1": tiny_sources["specialist1"],
        "s2": tiny_sources["specialist2"],
    }
    return write_pool(tmp_path, members, tiny_evals)


def assert_printed_rows(pool_file: Path, labels: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The printed table over five splits, with a row starting with each label."""
    assert main(["router", "eval", str(pool_file), "--splits", "5"]) == 0
    text = capsys.readouterr().out
    missing = [label for label in labels if f"\n{label}" not in text]
    assert not missing, text
    return text


def test_cli_prints_the_table_over_five_splits(
    three_member_pool: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["router", "eval", str(three_member_pool), "--splits", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["rows"]) == ["base", "s1", "s2", ROUTER_ROW, LOGISTIC_ROW, KNN_ROW, ORACLE_ROW]
    assert [split["held_out_items"] for split in report["splits"]] == [4] * 5
    oracle = report["rows"][ORACLE_ROW]
    for name, row in report["rows"].items():
        assert row["interval"][0] <= row["accuracy"] <= row["interval"][1], name
        assert row["accuracy"] <= oracle["accuracy"], name
        assert row["resident_gib"] > 0 and row["seconds_per_answer"] > 0, name
    # the encoder is the base member's hidden states: every routed row keeps base resident
    assert all("base" in report["rows"][name]["resident"] for name in ROUTED_ROWS)
    assert report["encoder"]["member"] == "base" and report["encoder"]["seconds"] > 0
    assert json.loads((three_member_pool.parent / "work/comparison.json").read_text()) == report

    labels = ["base", "s1", "s2", "router (sep-CMA-ES head", "logistic regression", "k-NN (k=5)", "oracle"]
    text = assert_printed_rows(three_member_pool, labels, capsys)
    assert "gap closed" in text


def test_cli_gives_the_merged_winner_and_the_router_over_the_specialists_rows_of_their_own(
    three_member_pool: Path, tiny_sources: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    runs = three_member_pool.parent / "runs"
    write_finished_run(runs / "skills", tiny_sources)
    text = three_member_pool.read_text()
    three_member_pool.write_text(text.replace("tasks:", "  - {name: winner, run: runs/skills}\ntasks:", 1))
    assert main(["router", "eval", str(three_member_pool), "--splits", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["rows"]
    specialists = ["base", "s1", "s2"]
    assert list(rows) == [
        *specialists,
        "winner",
        *(row_key(row, SPECIALISTS) for row in (ROUTER_ROW, LOGISTIC_ROW, KNN_ROW)),
        *ROUTED_ROWS,
        row_key(ORACLE_ROW, SPECIALISTS),
        ORACLE_ROW,
    ]
    assert rows["winner"]["note"] == "merged winner" and rows["winner"]["resident"] == ["winner"]
    assert rows[ROUTER_ROW]["scope"] == f"{SPECIALISTS} + winner"
    for row in (ROUTER_ROW, LOGISTIC_ROW, KNN_ROW, ORACLE_ROW):
        subset_row = rows[row_key(row, SPECIALISTS)]
        assert subset_row["choosable"] == specialists
        assert "winner" not in subset_row["resident"]
        assert subset_row["interval"][0] <= subset_row["accuracy"] <= subset_row["interval"][1]
        assert subset_row["resident_gib"] > 0 and subset_row["seconds_per_answer"] > 0
    subset_oracle = rows[row_key(ORACLE_ROW, SPECIALISTS)]["per_split"]
    assert all(s <= o for s, o in zip(subset_oracle, rows[ORACLE_ROW]["per_split"], strict=True))
    assert set(report["gap_closed"]) == {*ROUTED_ROWS, *(row_key(row, SPECIALISTS) for row in ROUTED_ROWS)}

    labels = ["winner (merged winner)", "router over specialists (", "router over specialists + winner ("]
    assert_printed_rows(three_member_pool, labels, capsys)


def test_cli_refuses_a_split_that_leaves_no_training_items_in_one_line(
    three_member_pool: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 6 items per task, 95% held out: every item of every task is held out
    assert main(["router", "eval", str(three_member_pool), "--holdout", "0.95"]) == 2
    error = error_line(capsys.readouterr().err)
    assert (
        "split 1 of 5 (held-out fraction 0.95 of 12 items) leaves no training items for members base" in error
    )


def test_a_member_whose_tokenizer_does_not_load_is_named_with_the_task(
    tmp_path: Path, tiny_sources: dict[str, Path], tiny_evals: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sources["specialist1"], broken)
    for tokenizer_file in broken.glob("*token*"):
        tokenizer_file.unlink()
    pool_file = write_pool(tmp_path, {"base": tiny_sources["base"], "broken": broken}, tiny_evals)
    with pytest.raises(MergerError, match="member 'broken' cannot score task 'tiny_mc': its tokenizer"):
        build_outcome_table(load_pool(pool_file))
    assert main(["router", "eval", str(pool_file)]) == 2
    error = error_line(capsys.readouterr().err)
    assert "member 'broken' cannot score task 'tiny_mc'" in error


def write_teacher_forced_task(evals: Path) -> None:
    """tiny_tf: tiny_gen's items as one log-likelihood request each, reporting perplexity and greedy match."""
    write_tasks(evals)
    (evals / "tiny_tf.yaml").write_text(
        f"""task: tiny_tf
dataset_path: json
dataset_kwargs:
  data_files:
    test: {evals / "tiny_gen.jsonl"}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{question}}}}"
doc_to_target: " {{{{answer}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
    )


def test_outcomes_are_read_with_the_named_metric_and_must_be_right_or_wrong(
    tmp_path: Path, tiny_sources: dict[str, Path]
) -> None:
    evals = tmp_path / "evals"
    write_teacher_forced_task(evals)
    pool_file = write_pool(tmp_path, {"base": tiny_sources["base"]}, evals, tasks="[tiny_tf]")
    text = pool_file.read_text()
    pool_file.write_text(text.replace("batch_size: 4}", "batch_size: 4, metric: perplexity}"))
    with pytest.raises(MergerError, match="member 'base' cannot score task 'tiny_tf' as right or wrong"):
        build_outcome_table(load_pool(pool_file))
    pool_file.write_text(text.replace("batch_size: 4}", "batch_size: 4, metric: acc}"))
    table = build_outcome_table(load_pool(pool_file))
    assert table.correct.shape == (6, 1) and set(np.unique(table.correct)) <= {0.0, 1.0}
