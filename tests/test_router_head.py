"""The sep-CMA-ES head on synthetic outcome tables where the right member is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from merger.common.errors import MergerError
from merger.router.evaluation import evaluate, knn_choices, logistic_regression_choices
from merger.router.head import RouterHead, parameter_count, role_targets, train_head
from merger.router.outcomes import OutcomeTable
from merger.router.pool import ROLES, Role, RouterSettings

MEMBERS = ["maths", "geography", "generalist"]


def clustered_table(items: int = 150, dim: int = 64, seed: int = 0) -> tuple[OutcomeTable, np.ndarray]:
    """Three topics; the maths member is right exactly on topic 0, geography on topic 1, the generalist is
    right on 40% of every topic. Best single member ≈ 0.6, oracle ≈ 1.0."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim))
    topic = rng.integers(0, 3, items)
    embeddings = centres[topic] + 0.8 * rng.normal(size=(items, dim))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    correct = np.zeros((items, 3))
    correct[topic == 0, 0] = 1
    correct[topic == 1, 1] = 1
    correct[:, 2] = rng.random(items) < 0.4
    correct[topic == 2, 2] = 1
    table = OutcomeTable(
        item_ids=[f"t{t}:{i}" for i, t in enumerate(topic)],
        tasks=[f"topic{t}" for t in topic],
        prompts=[f"prompt {i}" for i in range(items)],
        members=MEMBERS,
        correct=correct,
        latency=np.ones((items, 3)),
    )
    return table, embeddings.astype(np.float32)


SETTINGS = RouterSettings(hidden_size=8, evaluations=1500, seed=0)


def test_head_learns_the_known_right_member_and_beats_every_baseline_of_chance() -> None:
    table, embeddings = clustered_table()
    train, held_out = table.split(0.3, seed=0)
    head = train_head(embeddings[train], table.correct[train], MEMBERS, "synthetic", SETTINGS)
    report = evaluate(head, table, embeddings, train, held_out, SETTINGS)
    assert head.num_parameters < 20_000
    assert report["oracle"] == 1.0
    assert report["router"] >= 0.9
    assert report["router"] > report["best_single"]["accuracy"] + 0.2
    assert report["gap_closed"] >= 0.75
    assert sum(report["calls_per_member"].values()) == len(held_out)
    assert min(report["calls_per_member"].values()) > 0
    assert report["baselines"]["knn"]["accuracy"] >= 0.9
    assert report["baselines"]["logistic_regression"]["accuracy"] >= 0.9


def test_cost_penalty_steers_to_the_cheaper_of_two_equally_good_members() -> None:
    table, embeddings = clustered_table(items=60, seed=1)
    correct = np.ones((60, 2))
    cost = np.tile([1.0, 0.1], (60, 1))
    cheap = RouterSettings(hidden_size=0, evaluations=600, cost_penalty=1.0)
    head = train_head(embeddings, correct, ["dear", "cheap"], "synthetic", cheap, cost=cost)
    assert (head.choose(embeddings) == 1).all()
    dear = train_head(embeddings, correct, ["dear", "cheap"], "synthetic", cheap, cost=cost[:, ::-1].copy())
    assert (dear.choose(embeddings) == 0).all()


def test_head_round_trips_through_safetensors(tmp_path: Path) -> None:
    table, embeddings = clustered_table(items=40)
    head = train_head(
        embeddings, table.correct, MEMBERS, "synthetic", RouterSettings(hidden_size=4, evaluations=100)
    )
    head.save(tmp_path / "head")
    loaded = RouterHead.load(tmp_path / "head")
    assert loaded.members == MEMBERS and loaded.encoder_id == "synthetic"
    for original, restored in zip(head.forward(embeddings), loaded.forward(embeddings), strict=True):
        np.testing.assert_allclose(original, restored, rtol=1e-6)
    assert loaded.meta["optimizer"].startswith("sep-CMA-ES")


def test_missing_head_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(MergerError, match="run `merger router train"):
        RouterHead.load(tmp_path)


def test_parameter_budget_is_enforced() -> None:
    assert parameter_count(384, 16, 5) < 20_000
    embeddings = np.random.default_rng(0).normal(size=(10, 384)).astype(np.float32)
    with pytest.raises(MergerError, match="lower router.hidden_size"):
        train_head(
            embeddings, np.ones((10, 2)), ["a", "b"], "x", RouterSettings(hidden_size=64, evaluations=10)
        )


def test_role_targets_follow_how_many_members_are_right() -> None:
    correct = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 1]])
    assert [ROLES[i] for i in role_targets(correct)] == [Role.THINKER, Role.VERIFIER, Role.WORKER]


def test_head_learns_roles_from_the_outcome_table() -> None:
    table, embeddings = clustered_table(items=120, seed=2)
    correct = table.correct.copy()
    topics = np.array([int(t[-1]) for t in table.tasks])
    correct[topics == 0] = 1.0  # everyone is right: a Worker suffices
    correct[topics == 1] = 0.0  # nobody is right: needs a Thinker
    settings = RouterSettings(hidden_size=4, evaluations=1500, role_weight=1.0)
    head = train_head(embeddings, correct, MEMBERS, "synthetic", settings)
    roles = head.forward(embeddings)[1].argmax(axis=1)
    assert (roles[topics == 0] == ROLES.index(Role.WORKER)).mean() >= 0.9
    assert (roles[topics == 1] == ROLES.index(Role.THINKER)).mean() >= 0.9


def test_knn_and_logistic_regression_pick_the_right_member() -> None:
    table, embeddings = clustered_table(items=120, seed=3)
    train, held_out = table.split(0.3, seed=0)
    for choose in (knn_choices, logistic_regression_choices):
        choices = choose(embeddings[train], table.correct[train], embeddings[held_out])
        assert table.correct[held_out][np.arange(len(held_out)), choices].mean() >= 0.9
