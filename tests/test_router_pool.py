"""Pool YAML validation: every mistake is a MergerError naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from merger.cli import main
from merger.common.errors import MergerError
from merger.router.pool import Role, load_pool, parse_pool


def _parse(data: object) -> object:
    return parse_pool(data, Path("/pools"))


def test_members_of_every_kind_parse_and_relative_paths_follow_the_yaml(tmp_path: Path) -> None:
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(
        """
members:
  - {name: base, path: models/base, roles: [worker], chat_template: false}
  - {name: winner, registry: winner@2}
  - name: cloud
    remote: {base_url: "http://127.0.0.1:9/v1/", model: m, api_key_env: CLOUD_KEY}
    cost_per_call: 0.5
tasks: {names: [tiny_mc], include_path: evals}
server: {api_key_env: MERGER_KEY}
"""
    )
    pool = load_pool(pool_file)
    assert pool.names == ["base", "winner", "cloud"]
    assert pool.members[0].path == tmp_path / "models/base"
    assert pool.members[0].roles == [Role.WORKER]
    assert pool.members[0].chat_template is False and pool.members[1].chat_template is True
    assert pool.members[1].roles == [Role.THINKER, Role.WORKER, Role.VERIFIER]
    assert pool.members[2].remote is not None and pool.members[2].remote.base_url == "http://127.0.0.1:9/v1"
    assert pool.tasks is not None and pool.tasks.include_path == tmp_path / "evals"
    assert pool.work_dir == tmp_path / ".merger-router"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"members": []}, "members: List should have at least 1 item"),
        ({"members": [{"name": "a"}]}, "needs exactly one of registry, path, zoo, remote (got none)"),
        ({"members": [{"name": "a", "path": "x", "registry": "y"}]}, "got ['registry', 'path']"),
        ({"members": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "repeated: ['a']"),
        ({"members": [{"name": "bad name", "path": "x"}]}, "members.0.name"),
        (
            {"members": [{"name": "a", "remote": {"base_url": "ftp://x", "model": "m"}}]},
            "must start with http://",
        ),
        ({"members": [{"name": "a", "path": "x", "roles": ["boss"]}]}, "members.0.roles.0"),
        ({"members": [{"name": "a", "path": "x"}], "router": {"hidden_size": -1}}, "router.hidden_size"),
        (
            {"members": [{"name": "a", "path": "x"}], "router": {"encoder": {"kind": "hidden_states"}}},
            "needs `member`",
        ),
        (
            {
                "members": [{"name": "a", "remote": {"base_url": "http://h", "model": "m"}}],
                "router": {"encoder": {"kind": "hidden_states", "member": "a"}},
            },
            "is not a local member",
        ),
        (
            {"members": [{"name": "a", "path": "x"}], "surprise": 1},
            "surprise: Extra inputs are not permitted",
        ),
        ({"members": [{"name": "merger", "path": "x"}]}, "collides with a member name"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_invalid_pools_name_the_problem(data: object, expected: str) -> None:
    with pytest.raises(MergerError) as raised:
        _parse(data)
    assert expected in str(raised.value)


def test_cli_reports_a_missing_pool_file_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["router", "train", str(tmp_path / "absent.yaml")]) == 2
    assert "pool file not found" in capsys.readouterr().err


def test_cli_reports_invalid_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "pool.yaml"
    broken.write_text("members: [\n")
    assert main(["router", "eval", str(broken)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_registry_member_resolves_through_the_registry(tmp_path: Path) -> None:
    from merger.router.members import member_checkpoint

    pool = parse_pool(
        {"members": [{"name": "winner", "registry": "registry:nothing-here@1"}], "registry_root": "reg"},
        tmp_path,
    )
    assert pool.registry_root == tmp_path / "reg"
    with pytest.raises(MergerError, match="nothing-here"):
        member_checkpoint(pool.members[0], pool.registry_root)


def test_zoo_member_names_a_zoo_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from merger.router.members import member_checkpoint
    from merger.zoo import build

    built: dict[str, Path] = {"base": tmp_path / "base", "add": tmp_path / "add", "cap": tmp_path / "cap"}
    monkeypatch.setattr(build, "build_zoo", lambda **_: built)  # building the real zoo takes minutes
    pool = parse_pool({"members": [{"name": "adder", "zoo": "add"}, {"name": "x", "zoo": "poetry"}]}, tmp_path)
    assert member_checkpoint(pool.members[0]) == built["add"]
    with pytest.raises(MergerError, match="the zoo has base, add, cap, not 'poetry'"):
        member_checkpoint(pool.members[1])


@pytest.mark.parametrize(
    "pool_file", sorted((Path(__file__).parent.parent / "recipes").glob("pool*.yaml")), ids=str
)
def test_shipped_pool_examples_name_tasks_that_lm_eval_finds_with_readable_data(pool_file: Path) -> None:
    """The example's task set, with its include_path taken relative to the YAML, is what `router train`
    will evaluate: every task is found there (no built-in needed) and its local data reads."""
    from merger.scoring.lm_eval_bridge import anchored_task_configs, task_manager_for
    from merger.scoring.taskdata import check_task_data

    tasks = load_pool(pool_file).tasks
    assert tasks is not None and tasks.include_path is not None and tasks.include_path.is_dir()
    manager = task_manager_for(tasks.names, (str(tasks.include_path),))
    missing = [name for name in tasks.names if name not in manager.all_tasks]
    assert not missing, f"{pool_file.name} names tasks not under {tasks.include_path}: {missing}"
    configs = anchored_task_configs(manager, tasks.names)
    assert all(isinstance(config, dict) for config in configs)  # local tasks, not lm-eval built-ins
    check_task_data(configs)
