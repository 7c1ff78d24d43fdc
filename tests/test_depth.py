"""Workflow depth: plan–execute–verify against one call through the conductor, stored per item, resumed,
and the confident gate learned from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from merger.cli import main
from merger.router.depth import UNKNOWN_ROLE, DepthOutcome, depth_role_targets, load_depth
from merger.router.head import softmax, train_head
from merger.router.pool import ROLES, Role, RouterSettings, load_pool
from tests.test_router_outcomes import write_pool


def outcome(item_id: str, single: float, pev: float) -> DepthOutcome:
    return DepthOutcome(item_id, "t", "train", "m", single, pev, 0.1, 0.4, 3)


def test_role_targets_want_the_pipeline_only_where_it_was_right_and_one_call_wrong() -> None:
    outcomes = {
        "a": outcome("a", single=0.0, pev=1.0),
        "b": outcome("b", single=1.0, pev=1.0),
        "c": outcome("c", single=1.0, pev=0.0),
        "d": outcome("d", single=0.0, pev=0.0),
    }
    targets = depth_role_targets(["a", "b", "c", "d", "e"], outcomes)
    worker, thinker = ROLES.index(Role.WORKER), ROLES.index(Role.THINKER)
    assert targets.tolist() == [thinker, worker, worker, worker, UNKNOWN_ROLE]


def two_clusters(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings in two clusters; the first half is cluster 0."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[:2] * 3
    labels = np.repeat([0, 1], count // 2)
    points = centres[labels] + rng.normal(0, 0.3, (count, 8))
    return points / np.linalg.norm(points, axis=1, keepdims=True), labels


def deep_share(roles: np.ndarray | None, embeddings: np.ndarray, correct: np.ndarray, test: np.ndarray) -> np.ndarray:
    settings = RouterSettings(hidden_size=0, evaluations=1500, role_weight=1.0)
    head = train_head(embeddings, correct, ["m0", "m1"], "test", settings, roles=roles)
    probabilities = softmax(head.forward(test)[1])
    return probabilities[:, ROLES.index(Role.WORKER)] < settings.confidence  # not confident: the pipeline


def test_the_learned_gate_spends_depth_where_it_raised_accuracy_and_turns_off_where_it_never_did() -> None:
    embeddings, labels = two_clusters(60, seed=1)
    held_out, held_labels = two_clusters(40, seed=2)
    correct = np.ones((60, 2))
    ids = [str(i) for i in range(60)]
    helped = {i: outcome(i, single=float(labels[int(i)] == 0), pev=1.0) for i in ids[::2]}  # half measured
    roles = depth_role_targets(ids, helped)
    assert (roles == UNKNOWN_ROLE).sum() == 30
    deep = deep_share(roles, embeddings, correct, held_out)
    assert deep[held_labels == 1].mean() >= 0.9 and deep[held_labels == 0].mean() <= 0.1

    never = {i: outcome(i, single=1.0, pev=float(labels[int(i)] == 1)) for i in ids}
    assert not deep_share(depth_role_targets(ids, never), embeddings, correct, held_out).any()


@pytest.mark.slow  # builds an outcome table, trains heads and generates with two tiny models
def test_router_depth_measures_through_the_conductor_resumes_and_trains_the_gate(
    tmp_path: Path, tiny_sources: dict[str, Path], tiny_evals: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    members = {"base": tiny_sources["base"], "s1": tiny_sources["specialist1"]}
    pool_file = write_pool(tmp_path, members, tiny_evals, extra="server: {max_tokens: 4}\n")
    assert main(["router", "depth", str(pool_file)]) == 2
    assert "run `merger router train POOL.yaml` first" in capsys.readouterr().err

    assert main(["router", "train", str(pool_file)]) == 0
    capsys.readouterr()
    assert main(["router", "depth", str(pool_file), "--per-task", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    pool = load_pool(pool_file)
    stored = load_depth(pool)
    assert len(stored) == 8  # 2 per task (tiny_mc, tiny_gen) from each split
    assert {o.split for o in stored.values()} == {"train", "held_out"}
    assert all(o.member in members and o.pev_calls >= 3 for o in stored.values())
    assert report["tasks"]["all"]["items"] == 4 and report["train_items"] == 4
    assert report["tasks"]["all"]["single"]["calls"] == 1.0
    assert report["tasks"]["all"]["plan_execute_verify"]["calls"] >= 3.0
    assert report["saved_gate_source"] == "member agreement"

    def no_more_generation(*args: object, **kwargs: object) -> None:
        raise AssertionError("a resumed measurement generated again")

    monkeypatch.setattr("merger.conductor.depth.measure_item", no_more_generation)
    assert main(["router", "depth", str(pool_file), "--per-task", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == report["tasks"]

    assert main(["router", "train", str(pool_file)]) == 0
    assert "learns from 4 items' measured workflow depth" in capsys.readouterr().err
    head_meta = json.loads((tmp_path / "work/head/head.json").read_text())
    assert head_meta["gate"] == "learned from measured depth"

    stored_file = tmp_path / "work/depth.json"
    stale = json.loads(stored_file.read_text())
    stored_file.write_text(json.dumps({**stale, "workflow": "an older workflow"}))
    assert main(["router", "train", str(pool_file)]) == 0
    assert "measured with another workflow" in capsys.readouterr().err
    assert json.loads((tmp_path / "work/head/head.json").read_text())["gate"] == "member agreement"


def test_gold_answers_are_the_tasks_targets(tmp_path: Path, tiny_evals: Path) -> None:
    from merger.conductor.depth import gold_answers, is_right

    pool_file = write_pool(tmp_path, {"base": tmp_path}, tiny_evals)
    golds = gold_answers(load_pool(pool_file), ["tiny_gen:0", "tiny_mc:1"])
    rows = [json.loads(line) for line in (tiny_evals / "tiny_gen.jsonl").read_text().splitlines()]
    mc = [json.loads(line) for line in (tiny_evals / "tiny_mc.jsonl").read_text().splitlines()]
    assert golds == {"tiny_gen:0": rows[0]["answer"], "tiny_mc:1": mc[1]["choices"][mc[1]["label"]]}
    assert is_right(f" {rows[0]['answer']}\nmore", golds["tiny_gen:0"]) == 1.0
    assert is_right("", golds["tiny_gen:0"]) == 0.0


def test_router_depth_without_tasks_says_so_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(f"members:\n  - {{name: a, path: {tmp_path}}}\n  - {{name: b, path: {tmp_path}}}\n")
    assert main(["router", "depth", str(pool_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs the pool's tasks" in err and "Traceback" not in err
