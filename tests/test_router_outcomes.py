"""Outcome table from real lm-eval runs on tiny models, its per-member cache, embeddings, and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from merger.cli import main
from merger.common.errors import MergerError
from merger.router.embeddings import build_embedder
from merger.router.outcomes import build_outcome_table
from merger.router.pool import load_pool
from tests.tiny_models import write_tasks

ITEMS_PER_TASK = 6


def write_pool(
    tmp_path: Path,
    members: dict[str, Path],
    tiny_evals: Path,
    encoder: str = "hidden_states",
    extra: str = "",
    tasks: str = "[tiny_mc, tiny_gen]",
) -> Path:
    member_lines = "\n".join(f"  - {{name: {name}, path: {path}}}" for name, path in members.items())
    encoder_block = "{kind: hidden_states, member: base}" if encoder == "hidden_states" else "{kind: minilm}"
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(
        f"""members:
{member_lines}
tasks: {{names: {tasks}, include_path: {tiny_evals}, limit: {ITEMS_PER_TASK}, batch_size: 4}}
router: {{encoder: {encoder_block}, hidden_size: 4, evaluations: 200, holdout_fraction: 0.34}}
work_dir: work
{extra}"""
    )
    return pool_file


def test_outcome_table_holds_per_item_lm_eval_results_and_is_reused_until_weights_change(
    tmp_path: Path, tiny_sources: dict[str, Path], tiny_evals: Path
) -> None:
    changing = tmp_path / "changing"
    shutil.copytree(tiny_sources["specialist1"], changing)
    pool = load_pool(write_pool(tmp_path, {"base": tiny_sources["base"], "changing": changing}, tiny_evals))

    messages: list[str] = []
    table = build_outcome_table(pool, messages.append)
    assert table.members == ["base", "changing"]
    assert table.correct.shape == (2 * ITEMS_PER_TASK, 2)
    assert set(np.unique(table.correct)) <= {0.0, 1.0}
    assert (table.latency > 0).all()
    assert sorted(set(table.tasks)) == ["tiny_gen", "tiny_mc"]
    docs = [json.loads(line) for line in (tiny_evals / "tiny_mc.jsonl").read_text().splitlines()]
    assert table.prompts[table.item_ids.index("tiny_mc:0")] == docs[0]["question"]
    assert messages == [
        f"base: {2 * ITEMS_PER_TASK} items (evaluated)",
        f"changing: {2 * ITEMS_PER_TASK} items (evaluated)",
    ]

    messages.clear()
    again = build_outcome_table(pool, messages.append)
    assert all(message.endswith("(cached)") for message in messages)
    np.testing.assert_array_equal(again.correct, table.correct)

    weights_file = changing / "model.safetensors"
    tensors = load_file(weights_file)
    tensors = {name: tensor * 0 if "lm_head" in name else tensor for name, tensor in tensors.items()}
    save_file(tensors, weights_file, metadata={"format": "pt"})
    messages.clear()
    changed = build_outcome_table(pool, messages.append)
    assert messages[0].endswith("(cached)") and messages[1].endswith("(evaluated)")
    np.testing.assert_array_equal(changed.correct[:, 0], table.correct[:, 0])


def test_each_task_is_cached_on_its_own(tmp_path: Path, tiny_sources: dict[str, Path]) -> None:
    evals = tmp_path / "evals"
    write_tasks(evals)
    members = {"base": tiny_sources["base"]}
    messages: list[str] = []
    build_outcome_table(load_pool(write_pool(tmp_path, members, evals, tasks="[tiny_mc]")), messages.append)
    assert messages == [f"base: {ITEMS_PER_TASK} items (evaluated)"]

    both = load_pool(write_pool(tmp_path, members, evals))
    messages.clear()
    table = build_outcome_table(both, messages.append)
    assert messages == [f"base: {2 * ITEMS_PER_TASK} items (1 of 2 tasks cached, tiny_gen evaluated)"]

    data = evals / "tiny_gen.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[0]["answer"] = "Atlantis"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    messages.clear()
    edited = build_outcome_table(both, messages.append)
    assert messages == [f"base: {2 * ITEMS_PER_TASK} items (1 of 2 tasks cached, tiny_gen evaluated)"]
    assert edited.correct[edited.item_ids.index("tiny_gen:0"), 0] == 0.0
    mc_rows = [i for i, task in enumerate(table.tasks) if task == "tiny_mc"]
    np.testing.assert_array_equal(edited.correct[mc_rows], table.correct[mc_rows])


def test_a_failing_task_keeps_the_rows_of_the_tasks_before_it(
    tmp_path: Path, tiny_sources: dict[str, Path]
) -> None:
    evals = tmp_path / "evals"
    write_tasks(evals)
    broken = (evals / "tiny_gen.yaml").read_text().replace("task: tiny_gen", "task: tiny_broken")
    (evals / "tiny_broken.yaml").write_text(broken.replace("tiny_gen.jsonl", "missing.jsonl"))
    members = {"base": tiny_sources["base"]}
    with pytest.raises(MergerError, match="lm-eval failed on task 'tiny_broken' for member 'base'"):
        build_outcome_table(load_pool(write_pool(tmp_path, members, evals, tasks="[tiny_mc, tiny_broken]")))
    messages: list[str] = []
    build_outcome_table(load_pool(write_pool(tmp_path, members, evals, tasks="[tiny_mc]")), messages.append)
    assert messages == [f"base: {ITEMS_PER_TASK} items (cached)"]


def test_task_data_paths_relative_to_the_task_yaml_work_from_any_directory(
    tmp_path: Path, tiny_sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    evals = tmp_path / "evals"
    write_tasks(evals)
    for name in ("tiny_mc", "tiny_gen"):
        task_yaml = evals / f"{name}.yaml"
        task_yaml.write_text(task_yaml.read_text().replace(str(evals / f"{name}.jsonl"), f"{name}.jsonl"))
    pool = load_pool(write_pool(tmp_path, {"base": tiny_sources["base"]}, evals))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    table = build_outcome_table(pool)
    assert table.correct.shape == (2 * ITEMS_PER_TASK, 1)


def test_hidden_state_embeddings_are_cached_on_disk(
    tmp_path: Path, tiny_sources: dict[str, Path], tiny_evals: Path
) -> None:
    pool = load_pool(write_pool(tmp_path, {"base": tiny_sources["base"]}, tiny_evals))
    texts = ["The capital of Peru is", "Q: what is 3 plus 4? A:", "The capital of Peru is"]
    first = build_embedder(pool)(texts)
    assert first.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(first[0], first[2])
    fresh = build_embedder(pool)
    np.testing.assert_array_equal(fresh(texts), first)
    assert fresh._encode is None  # everything came from the cache; the model never loaded


def test_minilm_embeddings_place_related_prompts_closer(
    tmp_path: Path, tiny_sources: dict[str, Path], tiny_evals: Path
) -> None:
    pool = load_pool(write_pool(tmp_path, {"base": tiny_sources["base"]}, tiny_evals, encoder="minilm"))
    vectors = build_embedder(pool)(["What is 12 plus 30?", "Add 7 and 15.", "What is the capital of Kenya?"])
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_cli_trains_and_evaluates_on_a_pool(
    tmp_path: Path, tiny_sources: dict[str, Path], tiny_evals: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    members = {
        "base": tiny_sources["base"],
        "s1": tiny_sources["specialist1"],
        "s2": tiny_sources["specialist2"],
    }
    pool_file = write_pool(tmp_path, members, tiny_evals)
    assert main(["router", "train", str(pool_file)]) == 0
    assert "router head:" in capsys.readouterr().out
    assert (tmp_path / "work/head/head.safetensors").is_file()
    assert main(["router", "eval", str(pool_file), "--saved-head", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["held_out_items"] == 4 and report["train_items"] == 8
    assert report["oracle"] >= max(report["per_member"].values()) >= report["random"]
    assert set(report["baselines"]) == {"logistic_regression", "knn"}
    assert sum(report["calls_per_member"].values()) == 4
    assert json.loads((tmp_path / "work/eval.json").read_text()) == report

    pool_file.write_text(pool_file.read_text().replace("  - {name: s2,", "  - {name: s3,"))
    assert main(["router", "eval", str(pool_file), "--saved-head"]) == 2
    assert "run `merger router train` again" in capsys.readouterr().err


def test_remote_member_outcomes_come_from_lm_eval_chat_completions(
    tmp_path: Path, tiny_evals: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from merger.common.errors import MergerError
    from merger.router.pool import parse_pool
    from tests.test_conductor import REMOTE_KEY, ServerThread, fake_remote

    monkeypatch.setenv("TEST_REMOTE_KEY", REMOTE_KEY)
    app, state = fake_remote("cloud")
    with ServerThread(app) as server:
        remote = {"base_url": server.url + "/v1", "model": "cloud", "api_key_env": "TEST_REMOTE_KEY"}
        data = {
            "members": [{"name": "cloud", "remote": remote}],
            "tasks": {"names": ["tiny_gen"], "include_path": str(tiny_evals), "limit": 3},
            "work_dir": str(tmp_path / "work"),
        }
        table = build_outcome_table(parse_pool(data, tmp_path))
        assert table.correct.shape == (3, 1) and (table.correct == 0).all()  # it always says "cloud answers"
        assert state["calls"] == 3 and state["prompts"][0].startswith("The capital of")

        data["tasks"]["names"] = ["tiny_mc"]
        with pytest.raises(
            MergerError, match="member 'cloud' cannot score task 'tiny_mc': .* multiple_choice"
        ):
            build_outcome_table(parse_pool(data, tmp_path))
