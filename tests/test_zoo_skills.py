"""The multi-skill zoo: its generated splits, its lm-eval tasks, its specialists and its bundled recipe."""

from __future__ import annotations

import argparse
import datetime
import itertools
from pathlib import Path

import pytest
import torch

from merger.common.errors import MergerError
from merger.zoo import build, data, skills

REPO_ROOT = Path(__file__).resolve().parents[1]
SPLITS_PER_SKILL = ("train", *skills.EVAL_SPLITS)


def _keys(skill: str, rows: list[dict]) -> set:
    return {skills.SKILL_TABLE[skill].held_out_key(row) for row in rows}


def test_the_four_skills_are_the_ones_chosen() -> None:
    assert skills.SKILLS == ("add", "sort", "rev", "date")


@pytest.mark.parametrize("skill", skills.SKILLS)
def test_splits_are_pairwise_disjoint_and_large_enough(skill: str) -> None:
    splits = skills.skill_splits(skill)
    assert set(splits) == set(SPLITS_PER_SKILL)
    for split in skills.EVAL_SPLITS:
        assert len(splits[split]) >= 200
    assert len(splits["train"]) >= 1000
    for first, second in itertools.combinations(SPLITS_PER_SKILL, 2):
        assert not _keys(skill, splits[first]) & _keys(skill, splits[second]), (first, second)
        questions = {row["question"] for row in splits[first]}
        assert not questions & {row["question"] for row in splits[second]}, (first, second)


def test_an_overlap_between_splits_is_refused() -> None:
    splits = skills.skill_splits("add")
    splits["test"] = [*splits["test"], splits["fit"][0]]
    with pytest.raises(MergerError, match="'add': fit and test share 1 items"):
        skills.check_disjoint("add", splits)


def test_commuted_sums_and_permuted_sorts_stay_in_one_split() -> None:
    add = skills.SKILL_TABLE["add"].held_out_key
    sort = skills.SKILL_TABLE["sort"].held_out_key
    rev = skills.SKILL_TABLE["rev"].held_out_key
    assert add({"a": 47, "b": 38}) == add({"a": 38, "b": 47})
    assert sort({"numbers": [42, 7, 19, 3]}) == sort({"numbers": [3, 7, 19, 42]})
    assert rev({"numbers": [42, 7, 19, 3]}) != rev({"numbers": [3, 19, 7, 42]})


def test_answers_are_the_known_texts() -> None:
    rows = skills.generate()
    for row in rows["add_test"]:
        a, b = (int(part) for part in row["question"].removesuffix(" =").split(" + "))
        assert row["answer"] == str(a + b) and 10 <= a <= 99 and 10 <= b <= 99
    for row in rows["sort_test"]:
        numbers = [int(n) for n in row["question"].removeprefix("sort ").split()]
        assert len(numbers) == 4 and all(0 <= n <= 99 for n in numbers)
        assert row["answer"] == " ".join(str(n) for n in sorted(numbers))
    for row in rows["rev_test"]:
        numbers = row["question"].removeprefix("reverse ").split()
        assert len(numbers) == 4 and row["answer"] == " ".join(reversed(numbers))
    for row in rows["date_test"]:
        date = datetime.date.fromisoformat(row["question"].removeprefix("date "))
        assert datetime.datetime.strptime(row["answer"], "%d/%m/%Y").date() == date
        assert len(row["answer"]) == 10


def test_the_brief_examples_render_as_asked() -> None:
    add = {"question": "47 + 38 =", "answer": "85"}
    assert data.prompt_text(add) == "Q: 47 + 38 =\nA:" and data.completion_text(add) == " 85\n"
    rows = skills.generate()
    assert all(row["question"].startswith("sort ") for row in rows["sort_fit"])
    assert all(row["question"].startswith("reverse ") for row in rows["rev_fit"])
    assert all(row["question"].startswith("date ") for row in rows["date_fit"])


def test_items_are_seeded_and_the_streams_do_not_run_dry() -> None:
    assert skills.generate() == skills.generate()
    assert skills.generate(seed=1) != skills.generate()
    dates = list(itertools.islice(skills.item_stream("date"), 20_000))
    assert len({row["date"] for row in dates}) == 20_000
    with pytest.raises(MergerError, match="'add' ran out of distinct items"):
        list(skills.item_stream("add"))  # 4,095 unordered two-digit pairs in all


def test_mixed_tasks_hold_an_equal_share_of_each_skill() -> None:
    rows = skills.generate()
    for split in skills.EVAL_SPLITS:
        mix = rows[f"mix_{split}"]
        assert len(mix) == len(skills.SKILLS) * skills.EVAL_ROWS
        for prefix in (4, 40, 200, len(mix)):
            shares = [row["skill"] for row in mix[:prefix]]
            assert all(shares.count(skill) == prefix // 4 for skill in skills.SKILLS), (split, prefix)
        for skill in skills.SKILLS:
            assert [row for row in mix if row["skill"] == skill] == rows[f"{skill}_{split}"]


def test_committed_eval_data_matches_the_generator(tmp_path: Path) -> None:
    from merger.commands.zoo import data_command

    data_command(argparse.Namespace(evals_dir=tmp_path, zoo="skills"))
    written = sorted((tmp_path / "skills").rglob("*.*"))
    committed = sorted((REPO_ROOT / "evals" / "skills").rglob("*.*"))
    assert [p.relative_to(tmp_path) for p in written] == [
        p.relative_to(REPO_ROOT / "evals") for p in committed
    ]
    for path, expected in zip(written, committed, strict=True):
        assert path.read_text() == expected.read_text(), path.name
    names = skills.task_names()
    assert {path.stem for path in written if path.suffix == ".yaml"} == {*names, *data.teacher_forced_names(names)}


def test_tasks_load_in_lm_eval_and_match_the_training_prompt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from merger.scoring.lm_eval_bridge import load_tasks

    # the YAML's data_files (evals/skills/data/...) are anchored at the bundle root, not cwd-relative
    monkeypatch.chdir(tmp_path)
    names = skills.task_names()
    assert len(names) == 15 and "skills_mix_fit" in names and "skills_date_test" in names
    tasks = load_tasks(names, (str(REPO_ROOT / "evals" / "skills"),))["tasks"]
    assert set(tasks) == set(names)
    generated = skills.generate()
    for name, task in tasks.items():
        docs = list(task.test_docs())
        expected = generated[name.removeprefix(skills.TASK_PREFIX)]
        assert len(docs) == len(expected) >= skills.EVAL_ROWS
        assert task.doc_to_text(docs[0]) == data.prompt_text(expected[0])
        assert task.doc_to_target(docs[-1]) == expected[-1]["answer"]


def test_the_quickstart_zoo_cache_key_is_unchanged() -> None:
    # db5b51c4bac8bd90 is what `build.recipe_key(ZooRecipe(), <digest of each training_rows(skill)>,
    # "base-digest")` returned on h-skills before the multi-skill zoo existed (commit 2e04892).
    recipe = build.QUICKSTART_ZOO.default_recipe()
    assert recipe == build.ZooRecipe()
    digests = {skill: data.rows_digest(build.QUICKSTART_ZOO.training_rows(skill)) for skill in recipe.skills}
    assert build.recipe_key(recipe, digests, "base-digest") == "db5b51c4bac8bd90"


def test_zoo_references_name_a_zoo_and_a_skill() -> None:
    assert build.zoo_member("zoo:base") == (build.QUICKSTART_ZOO, "base")
    assert build.zoo_member("zoo:add") == (build.QUICKSTART_ZOO, "add")
    assert build.zoo_member("zoo:skills/add") == (build.SKILLS_ZOO, "add")
    assert build.zoo_member("zoo:skills/date") == (build.SKILLS_ZOO, "date")


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        (
            "zoo:skills/nope",
            "the skills zoo has skills/add, skills/sort, skills/rev, skills/date, not 'skills/nope'",
        ),
        ("zoo:skills/base", "not 'skills/base'"),
        ("zoo:sort", "the zoo has base, add, cap, not 'sort'"),
        ("zoo:poems/add", "no zoo 'poems'"),
    ],
)
def test_unknown_zoo_names_are_refused_in_one_line_before_building(reference: str, expected: str) -> None:
    from merger.sources.resolve import resolve_path

    with pytest.raises(MergerError) as refused:
        resolve_path(reference)
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_a_recipe_skill_outside_the_zoo_is_refused(tiny_sources: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MergerError, match="the skills zoo has skills add, sort, rev, date, not cap"):
        build.build_zoo(tmp_path, recipe=build.ZooRecipe(skills=("add", "cap")), zoo=build.SKILLS_ZOO)
    assert not any(tmp_path.iterdir())


TINY_RECIPE = build.ZooRecipe(skills=skills.SKILLS, steps=2, batch_size=2, save_every=1, warmup_steps=1)


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _build(cache: Path, base: Path) -> dict[str, Path]:
    return build.build_zoo(cache, progress=False, recipe=TINY_RECIPE, base_dir=base, zoo=build.SKILLS_ZOO)


@pytest.mark.slow  # fine-tunes a tiny zoo
def test_tiny_skills_zoo_builds_caches_and_resumes(
    tiny_sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tiny_sources["base"]
    straight = _build(tmp_path / "straight", base)
    assert list(straight) == ["base", *skills.SKILLS]
    assert straight["add"].parent.name.startswith("skills-")
    for skill in skills.SKILLS:
        assert not torch.equal(_weights(straight[skill])["lm_head.weight"], _weights(base)["lm_head.weight"])
        assert f"`train_{skill}` items of `merger.zoo.skills`" in (straight[skill] / "README.md").read_text()
    assert not torch.equal(
        _weights(straight["sort"])["lm_head.weight"], _weights(straight["rev"])["lm_head.weight"]
    )

    trained = {skill: (straight[skill] / "model.safetensors").stat().st_mtime_ns for skill in skills.SKILLS}
    assert _build(tmp_path / "straight", base) == straight
    assert {
        skill: (straight[skill] / "model.safetensors").stat().st_mtime_ns for skill in skills.SKILLS
    } == trained

    real_collate = build.collate
    calls: list[int] = []

    def collate_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # both steps of add, then the second step of sort
            raise KeyboardInterrupt
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(build, "collate", collate_then_die)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "killed", base)
    calls_after_kill: list[int] = []
    monkeypatch.setattr(build, "collate", lambda *a, **k: calls_after_kill.append(1) or real_collate(*a, **k))
    resumed = _build(tmp_path / "killed", base)
    assert len(calls_after_kill) == 1 + 2 * TINY_RECIPE.steps  # the last step of sort, then rev and date
    for skill in skills.SKILLS:
        expected, actual = _weights(straight[skill]), _weights(resumed[skill])
        for name, tensor in expected.items():
            torch.testing.assert_close(actual[name], tensor, msg=f"{skill}: {name}")


def test_bundled_recipe_merges_the_four_specialists_with_twelve_genes() -> None:
    from merger.recipe import load_recipe
    from merger.space.parameters import Genome

    for name in ("skills", "quickstart"):  # the quickstart is this testbed with fewer items
        recipe = load_recipe(REPO_ROOT / "recipes" / f"{name}.yaml")
        assert [source.path for source in recipe.sources] == [
            "zoo:base",
            *(f"zoo:skills/{s}" for s in skills.SKILLS),
        ]
        for source in recipe.sources:
            build.zoo_member(source.path)  # every source names a zoo checkpoint
        genome = Genome(recipe, {source.name: Path(source.name) for source in recipe.sources}, num_layers=30)
        assert recipe.genome.method == "task_arithmetic" and genome.dimension == 12
        assert [(task.name, task.metric) for task in recipe.fitness.tasks] == [("skills_mix_fit_tf", "acc")]
        assert [task.name for task in recipe.validation.tasks] == [f"skills_{s}_sel" for s in skills.SKILLS]
        assert recipe.engine.scoring_precision == "auto"
        assert recipe.fitness.limit % len(skills.SKILLS) == 0 and recipe.validation.limit % len(skills.SKILLS) == 0
    assert {task.name for task in recipe.test.tasks} == {f"skills_{s}_test" for s in skills.SKILLS}
    recipe = load_recipe(REPO_ROOT / "recipes" / "skills.yaml")
    assert {task.name for task in recipe.test.tasks} == {f"skills_{s}_test" for s in (*skills.SKILLS, "mix")}
    assert recipe.fitness.limit % len(skills.SKILLS) == 0 and recipe.fitness.limit >= 200
