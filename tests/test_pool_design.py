"""`merger pool design`: the partition chosen from the pairwise measurement, groups of one kept as their
specialist, each merged group a resumable run, the pool file served as is; bad designs are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import merger.commands.run as run_command
from merger.cli import main
from merger.common.stopping import request_stop
from merger.design import plan
from merger.design.partitions import partitions, predict, ranked
from merger.engine.weights import checkpoint_digest, parameter_names
from merger.registry import Registry, weights_digest
from merger.router.pool import load_pool
from tests.cli import assert_one_line_error, run_merger
from tests.test_conductor import ask
from tests.test_conductor_run_pool import serve, tiny_tf_router
from tests.test_router_comparison import write_teacher_forced_task
from tests.tiny_models import build_model, build_sources, build_tokenizer, write_mc_task

# skill -> partner -> the skill's loss merged with the partner: add and rev merge well, sort conflicts
LOSS = {
    "add": {"sort": 0.40, "rev": 0.02, "date": 0.10},
    "sort": {"add": 0.50, "rev": 0.45, "date": 0.40},
    "rev": {"add": 0.03, "sort": 0.30, "date": 0.05},
    "date": {"add": 0.08, "sort": 0.35, "rev": 0.04},
}
ALONE = {"add": 0.8, "sort": 0.7, "rev": 0.9, "date": 0.95}


def test_partitions_into_at_most_k_groups():
    names = ["a", "b", "c", "d"]
    assert [len(list(partitions(names, k))) for k in (1, 2, 3, 4)] == [1, 8, 14, 15]  # Stirling numbers summed
    assert all(sorted(s for group in p for s in group) == names for p in partitions(names, 4))


def test_the_partition_is_chosen_from_a_known_interference_table():
    best = ranked(ALONE, LOSS, 2)[0]
    assert best.partition == (("add", "rev", "date"), ("sort",))  # sort kept apart, the others merged
    assert best.skills["sort"] == 0.7 and best.skills["add"] == pytest.approx(0.8 - 0.02 - 0.10)
    assert ranked(ALONE, LOSS, 4)[0].partition == (("add",), ("sort",), ("rev",), ("date",))  # nothing lost
    one = ranked(ALONE, LOSS, 1)
    assert len(one) == 1 and one[0].skills["sort"] == pytest.approx(0.7 - 0.50 - 0.45 - 0.40 + 0.65)  # capped at 0
    worst = ranked(ALONE, LOSS, 2)[-1]
    assert predict(worst.partition, ALONE, LOSS).accuracy == worst.accuracy < best.accuracy


SKILLS = ["s1", "s2", "s3", "s4"]


@pytest.fixture(scope="module")
def design_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four tiny specialists over a base, each skill with its own fitness/validation/test/measure tasks,
    a recipe and a pool template (teacher-forced outcomes), and the design file over them."""
    root = tmp_path_factory.mktemp("design")
    sources = build_sources(root / "sources", num_specialists=4)
    evals = root / "evals"
    write_teacher_forced_task(evals)
    skills = {}
    for index, (name, source) in enumerate(zip(SKILLS, list(sources)[1:], strict=True)):
        tasks = {}
        for offset, kind in enumerate(("fitness", "validation", "test", "measure")):
            task = f"{name}_{kind}"
            write_mc_task(evals, task, "plus" if index % 2 else "minus", seed=100 * index + offset, num_items=8)
            tasks[kind] = task
        skills[name] = {"source": source, **tasks}
    recipe = {
        "sources": [{"name": "base", "path": str(sources["base"])}]
        + [{"name": name, "path": str(sources[skill["source"]])} for name, skill in skills.items()],
        "base_model": "base",
        "genome": {"method": "task_arithmetic", "parameters": {"weight": {"min": 0.0, "max": 1.0}}, "layer_granularity": 2},
        "optimizer": {"popsize": 4, "max_evaluations": 5, "seed": 1},
        "fitness": {"tasks": [{"name": "s1_fitness", "metric": "acc"}]},
        "validation": {"tasks": [{"name": "s1_validation", "metric": "acc"}]},
        "test": {"tasks": [{"name": "s1_test", "metric": "acc"}]},
        "selection": {"top_k": 2, "block": None},
        "task_paths": [str(evals)],
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (root / "pool.yaml").write_text(
        f"""members:
  - {{name: base, path: {sources["base"]}, chat_template: false}}
{tiny_tf_router(evals)}
server: {{max_tokens: 4}}
"""
    )
    design = {
        "recipe": "recipe.yaml",
        "pool": "pool.yaml",
        "members": 2,
        "skills": {name: {k: v for k, v in skill.items() if k != "source"} for name, skill in skills.items()},
        "limits": {"fitness": 8, "validation": 8, "test": 8, "measure": 8},
        "work_dir": "work",
        "publish": "tiny-design",  # each merged member published with its lineage
        "registry": "registry",
    }
    (root / "design.yaml").write_text(yaml.safe_dump(design))
    return root


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"members": 5}, "members: 5 is more than the 4 specialists"),
        ({"members": None, "memory_gib": 1e-9}, "memory_gib: 1e-09 GiB is smaller than one member"),
        ({"members": 1, "skills": {"nope": {"fitness": "a", "validation": "b", "test": "c", "measure": "d"}}},
         "skills.nope: no source of"),
        ({"members": 1, "skills": {"base": {"fitness": "a", "validation": "b", "test": "c", "measure": "d"}}},
         "skills.base: the base model is not a specialist"),
        ({"members": 1, "publish": "bad name"}, "publish: invalid registry name 'bad name-s1-s2-s3-s4'"),
    ],
)
def test_a_bad_design_is_one_line_before_any_weights_load(design_root, tmp_path, change, expected):
    data = yaml.safe_load((design_root / "design.yaml").read_text())
    data.update(change)
    data = {k: v for k, v in data.items() if v is not None}
    data.update({name: str(design_root / data[name]) for name in ("recipe", "pool", "registry")})
    data["work_dir"] = str(tmp_path / "work")
    path = tmp_path / "design.yaml"
    path.write_text(yaml.safe_dump(data))
    assert_one_line_error(run_merger("pool", "design", str(path)), expected)
    assert not (tmp_path / "work").exists()


def test_a_specialist_of_another_architecture_is_one_line_before_any_weights_load(design_root, tmp_path):
    deeper = tmp_path / "deeper"
    build_model(deeper, build_tokenizer(tmp_path / "tokenizer"), seed=5, num_layers=6)
    recipe = yaml.safe_load((design_root / "recipe.yaml").read_text())
    recipe["sources"][2]["path"] = str(deeper)  # the sort specialist
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    design = yaml.safe_load((design_root / "design.yaml").read_text())
    design.update(recipe=str(tmp_path / "recipe.yaml"), pool=str(design_root / "pool.yaml"), work_dir=str(tmp_path / "work"))
    design.pop("registry")
    (tmp_path / "design.yaml").write_text(yaml.safe_dump(design))
    assert_one_line_error(run_merger("pool", "design", str(tmp_path / "design.yaml")), "cannot be merged: num_hidden_layers is")
    assert not (tmp_path / "work").exists()


def test_members_below_one_is_refused(design_root):
    process = run_merger("pool", "design", str(design_root / "design.yaml"), "--members", "0")
    assert process.returncode == 2 and "--members: must be at least 1, got 0" in process.stderr


@pytest.mark.slow  # pairs exported and measured, two group searches, a router trained, then served
def test_a_designed_pool_is_built_resumed_and_served(design_root, capsys, monkeypatch):
    design_file = str(design_root / "design.yaml")
    work = design_root / "work"
    real_execute = run_command.execute
    calls: list[Path] = []

    def killed_after_the_first_group(recipe, run_dir, *args, **kwargs):
        calls.append(run_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between the groups
        return real_execute(recipe, run_dir, *args, **kwargs)

    measurement_pool = plan.measurement_pool

    def stopped_while_measuring(*args, **kwargs):
        request_stop()  # as SIGTERM does: the measurement's next lm-eval batch stops the design
        return measurement_pool(*args, **kwargs)

    monkeypatch.setattr(plan, "measurement_pool", stopped_while_measuring)
    assert main(["pool", "design", design_file, "--no-progress"]) == 0
    assert "stopped (the pair exports" in capsys.readouterr().out and not (work / "design.json").exists()
    monkeypatch.setattr(plan, "measurement_pool", measurement_pool)

    monkeypatch.setattr(run_command, "execute", killed_after_the_first_group)
    assert main(["pool", "design", design_file, "--partition", "s1,s2/s3,s4", "--no-progress"]) == 130
    first = work / "groups" / "s1-s2"
    summary = first / "summary.json"
    finished_at = summary.stat().st_mtime_ns
    monkeypatch.setattr(run_command, "execute", real_execute)
    assert main(["pool", "design", design_file, "--partition", "s1,s2/s3,s4", "--no-progress"]) == 0
    assert summary.stat().st_mtime_ns == finished_at  # the finished group was not searched again
    out = capsys.readouterr().out
    assert "pairwise measurement (8 items a skill)" in out and "<- built" in out
    registry = Registry(design_root / "registry")
    assert [e.ref.version for e in registry.entries("tiny-design-s1-s2")] == [1]  # published once, resumed or not
    built = load_pool(work / "pool.yaml")
    assert [m.registry for m in built.members] == ["tiny-design-s1-s2@1", "tiny-design-s3-s4@1"]
    entry = registry.show("tiny-design-s1-s2")
    recipe = yaml.safe_load((design_root / "recipe.yaml").read_text())
    paths = {s["name"]: Path(s["path"]).resolve() for s in recipe["sources"]}
    assert {p.source: Path(p.reference).resolve() for p in entry.parents} == {  # its lineage: the group's sources
        name: paths[name] for name in ("base", "s1", "s2")
    }
    assert weights_digest(entry.path) == weights_digest(first / "final")  # what the group's run exported

    # the best predicted partition, with a group of one: that member is the specialist's own checkpoint
    monkeypatch.setattr(run_command, "execute", real_execute)
    assert main(["pool", "design", design_file, "--partition", "s1,s2,s3/s4", "--no-progress"]) == 0
    pool = load_pool(work / "pool.yaml")
    assert pool.names == ["s1-s2-s3", "s4"]
    specialist = Path(next(s["path"] for s in recipe["sources"] if s["name"] == "s4"))
    member = pool.member("s4")
    assert member is not None and member.path is not None and member.path.resolve() == specialist.resolve()
    names = parameter_names(specialist)
    assert checkpoint_digest(member.path, names) == checkpoint_digest(specialist, names)
    assert (work / "router").is_dir()  # the head was trained

    thread, client = serve(work / "pool.yaml")
    try:
        _, merger, header = ask(client, "Q: what is 2 plus 3?\nA:", model="merger")
        assert sorted(merger["ranking"]) == ["s1-s2-s3", "s4"] and header in merger["ranking"]
    finally:
        thread.__exit__(None, None, None)


def test_the_bundled_design_reads_and_each_group_recipe_checks():
    from merger.design.plan import group_recipe
    from merger.design.spec import load_design
    from merger.recipe import load_recipe

    repo = Path(__file__).resolve().parent.parent
    design = load_design(repo / "recipes" / "design-skills.yaml")
    recipe = load_recipe(design.recipe)
    assert design.members == 2 and list(design.skills) == ["add", "sort", "rev", "date"]
    for group in partitions(list(design.skills), 2):
        for skills in group:
            if len(skills) > 1:
                checked = group_recipe(design, recipe, skills)
                assert checked.source_names == ["base", *skills]
                assert [t.name for t in checked.validation.tasks] == [f"skills_{s}_sel" for s in skills]


def test_partitions_are_compared_paired_on_the_same_items():
    """A known table: the routed accuracies, the paired difference from the best predicted at the same K
    (exactly the difference of the means), and the rank correlation of predicted with routed."""
    import numpy as np

    from merger.design.compare import (
        PartitionRows,
        compare_partitions,
        format_partition_comparison,
        partition_label,
    )
    from merger.design.partitions import Predicted
    from merger.router.outcomes import OutcomeTable

    items = 40
    table = OutcomeTable(
        item_ids=[str(i) for i in range(items)], tasks=["t1", "t2"] * (items // 2), prompts=[""] * items,
        members=["a-b", "a", "b"], correct=np.zeros((items, 3)), latency=np.zeros((items, 3)),
    )
    together, apart = (("a", "b"),), (("a",), ("b",))
    held = [np.arange(items)]
    first, second = np.ones(items), np.ones(items)
    first[:10], second[:4] = 0, 0  # merged: 30 of 40 right; routed apart: 36 of 40
    labels = (partition_label(together), partition_label(apart))
    seconds = {labels[0]: [0.1], labels[1]: [0.12]}
    encoder = {"id": "synthetic", "seconds": 0.01, "gib": 0.1}
    rows = PartitionRows(table, held, {labels[0]: [first], labels[1]: [second]}, seconds, encoder)
    predictions = [Predicted(apart, 0.9, {}), Predicted(together, 0.7, {})]
    report = compare_partitions(rows, predictions, {"a-b": 0.5, "a": 0.5, "b": 0.5})
    by_label = {row["partition"]: row for row in report["partitions"]}
    merged, routed = by_label["a,b"], by_label["a / b"]
    assert (merged["routed"], routed["routed"]) == (0.75, 0.9)
    assert merged["tasks"] == {"t1": 0.75, "t2": 0.75} and (merged["resident_gib"], routed["resident_gib"]) == (0.5, 1.0)
    assert routed["minus_best_predicted"] == [0.0, 0.0, 0.0]  # the best predicted with two groups is itself
    assert merged["best_predicted"] == "a,b" and merged["groups"] == 1
    low, high = routed["interval"]
    assert low < 0.9 < high
    assert report["spearman"]["all"] is None  # two partitions: no rank correlation
    assert (merged["seconds_per_answer"], routed["seconds_per_answer"]) == (0.1, 0.12)
    assert report["encoder"] == encoder and "0.0100 s to embed one prompt" in format_partition_comparison(report)


@pytest.mark.slow  # the pairs measured, every group's untuned merge exported and scored, 15 partitions routed
def test_every_partition_is_routed_on_the_same_held_out_items(design_root, tmp_path, capsys):
    """Routed on the skills' multiple-choice test items (32), where the tiny models' scores differ; a stop
    while routing exits 0 and the same command finishes."""
    import json
    import os
    import signal

    from merger.design import compare

    evals = design_root / "evals"
    pool = yaml.safe_load((design_root / "pool.yaml").read_text())
    pool["tasks"] = {"names": [f"{skill}_test" for skill in SKILLS], "include_path": str(evals), "metric": "acc"}
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump(pool))
    design = yaml.safe_load((design_root / "design.yaml").read_text())
    design.update(recipe=str(design_root / "recipe.yaml"), pool=str(tmp_path / "pool.yaml"), work_dir=str(tmp_path / "work"))
    (tmp_path / "design.yaml").write_text(yaml.safe_dump(design))
    real_split = compare.run_split

    def stopped_after_a_split(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the comparison stops once this split is routed
        return real_split(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compare, "run_split", stopped_after_a_split)
        assert main(["pool", "compare", str(tmp_path / "design.yaml"), "--splits", "2"]) == 0
    assert "stopped (the exports and every outcome" in capsys.readouterr().out
    assert not (tmp_path / "work" / "compare" / "comparison.json").exists()
    assert main(["pool", "compare", str(tmp_path / "design.yaml"), "--splits", "2"]) == 0  # resumed
    out = capsys.readouterr().out
    assert "every partition routed on the same held-out items (2 splits" in out and "rank correlation" in out
    report = json.loads((tmp_path / "work" / "compare" / "comparison.json").read_text())
    assert report["items"] == 32 and len({row["routed"] for row in report["partitions"]}) > 1
    assert isinstance(report["spearman"]["all"], float)
    rows = report["partitions"]
    assert len(rows) == 15 and sorted({row["groups"] for row in rows}) == [1, 2, 3, 4]  # Bell(4) partitions
    assert [row["predicted"] for row in rows] == sorted((row["predicted"] for row in rows), reverse=True)
    for row in rows:
        assert 0.0 <= row["interval"][0] <= row["routed"] <= row["interval"][1] <= 1.0
        difference, low, high = row["minus_best_predicted"]
        assert low <= difference <= high
    assert len({row["resident_gib"] / row["groups"] for row in rows}) == 1  # every member weighs the same
    embed = report["encoder"]["seconds"]
    for row in rows:  # a routed partition adds embedding the prompt and choosing to its member's answer
        assert row["seconds_per_answer"] > (embed if row["groups"] > 1 else 0.0), row["partition"]
    assert "s/answer" in out
    members = tmp_path / "work" / "compare" / "members"
    assert sorted(path.name for path in members.iterdir() if path.is_dir()) == sorted(
        "-".join(g) for g in {tuple(g) for row in rows for g in (group.split(",") for group in row["partition"].split(" / "))}
        if len(g) > 1
    )
