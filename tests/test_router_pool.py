"""Pool YAML validation: every mistake is a MergerError naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from merger.cli import main
from merger.common.errors import MergerError
from merger.router.pool import Pool, Role, load_pool, parse_pool


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
        ({"members": [{"name": "a"}]}, "needs exactly one of registry, path, zoo, remote, run (got none)"),
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
        ({"members": [{"name": "oracle", "path": "x"}]}, "member names ['oracle'] are rows of the router's table"),
        ({"members": [{"name": "router", "path": "x"}]}, "member names ['router'] are rows"),
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
    pool = parse_pool(
        {"members": [{"name": "adder", "zoo": "add"}, {"name": "x", "zoo": "poetry"}]}, tmp_path
    )
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


def write_finished_run(run: Path, sources: dict[str, Path]) -> None:
    """A finished run directory: the winner's export, two baselines' mergekit YAML and their scores."""
    import shutil

    import yaml

    from merger.rundir.layout import RunDir
    from merger.rundir.summary import Baseline, Summary, Winner

    layout = RunDir(run)
    shutil.copytree(sources["specialist2"], layout.final)
    layout.baselines.mkdir(parents=True)
    for name, weight in (("linear", 0.5), ("lopsided", 0.9)):
        config = {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [
                {"model": str(sources["base"]), "parameters": {"weight": 1 - weight}},
                {"model": str(sources["specialist1"]), "parameters": {"weight": weight}},
            ],
        }
        layout.baseline_config(name).write_text(yaml.safe_dump(config))
    baselines = {
        "linear": Baseline(method="linear", validation={"tiny_mc": 0.4, "tiny_gen": 0.2}),
        "lopsided": Baseline(method="linear", validation={"tiny_mc": 0.6, "tiny_gen": 0.3}),
    }
    layout.write_summary(Summary(winner=Winner(), baselines=baselines, seed=0))


def test_run_members_name_a_finished_runs_winner_and_its_best_baseline(
    tmp_path: Path, tiny_sources: dict[str, Path]
) -> None:
    from safetensors.torch import load_file

    from merger.router.members import member_checkpoint

    write_finished_run(tmp_path / "runs/skills", tiny_sources)
    pool = parse_pool(
        {
            "members": [
                {"name": "winner", "run": "runs/skills"},
                {"name": "baseline", "run": "runs/skills", "run_model": "best-baseline"},
                {"name": "plain", "run": "runs/skills", "run_model": "baseline:linear"},
                {"name": "missing", "run": "runs/skills", "run_model": "baseline:nope"},
            ],
            "work_dir": "work",
        },
        tmp_path,
    )
    winner, best, plain, missing = pool.members
    assert member_checkpoint(winner, None, pool.exports_dir) == tmp_path / "runs/skills/final"
    exported = member_checkpoint(best, None, pool.exports_dir)
    assert exported.parent == pool.exports_dir  # the best on validation is `lopsided`: 0.9 of specialist1
    merged, base, specialist = (
        load_file(path / "model.safetensors")
        for path in (exported, tiny_sources["base"], tiny_sources["specialist1"])
    )
    name = next(key for key in merged if key.endswith("q_proj.weight"))
    expected = 0.1 * base[name].float() + 0.9 * specialist[name].float()
    assert (merged[name].float() - expected).abs().max() < 1e-5
    assert member_checkpoint(best, None, pool.exports_dir) == exported  # kept, not exported again
    assert member_checkpoint(plain, None, pool.exports_dir) != exported
    with pytest.raises(MergerError, match="the run has no baseline 'nope' \\(it has linear, lopsided\\)"):
        member_checkpoint(missing, None, pool.exports_dir)


def test_run_model_needs_a_run_and_an_unfinished_run_is_named(tmp_path: Path) -> None:
    from merger.router.members import member_checkpoint

    with pytest.raises(MergerError, match="run_model names a model of a run; it needs `run:`"):
        _parse({"members": [{"name": "m", "path": "/x", "run_model": "winner"}]})
    pool = parse_pool({"members": [{"name": "m", "run": "runs/unfinished"}]}, tmp_path)
    with pytest.raises(MergerError, match="is not a finished run \\(no summary.json\\)"):
        member_checkpoint(pool.members[0], None, pool.exports_dir)


def test_run_members_are_merged_models_and_merged_marks_any_other() -> None:
    pool = _parse(
        {
            "members": [
                {"name": "winner", "run": "runs/skills"},
                {"name": "published", "registry": "skills-winner", "merged": True},
                {"name": "base", "zoo": "base"},
                {"name": "unmerged", "run": "runs/skills", "run_model": "baseline:linear", "merged": False},
            ]
        }
    )
    assert isinstance(pool, Pool)
    assert [member.is_merged for member in pool.members] == [True, True, False, False]
