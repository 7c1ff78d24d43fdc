"""The local registry: publish/list/show/export/verify/rm/push, crashes, concurrency, lineage, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import merger.cli
from merger.common.errors import MergerError
from merger.registry import (
    Parent,
    Registry,
    default_root,
    parse_reference,
    validate_name,
    weights_digest,
)
from merger.registry import index as registry_index
from merger.rundir.render import model_card
from merger.rundir.summary import parse_summary
from merger.sources.resolve import resolve_path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCORES = {
    "winner": {
        "validation": {"tiny_mc": 0.75, "tiny_gen": 0.5},
        "test": {"tiny_mc": 0.7, "tiny_gen": 0.4},
        "genotype": [0.25, -0.5, 1.0],
        "fitness": 0.625,
    },
    "sources": {
        "base": {"validation": {"tiny_mc": 0.5, "tiny_gen": 0.0}, "test": {"tiny_mc": 0.5, "tiny_gen": 0.0}},
        "specialist1": {
            "validation": {"tiny_mc": 0.6, "tiny_gen": 0.25},
            "test": {"tiny_mc": 0.55, "tiny_gen": 0.2},
        },
    },
}


def make_run(
    run_dir: Path,
    final_from: Path,
    sources: dict[str, str],
    lineage: dict[str, dict[str, Any]] | None = None,
    publish: str | None = "tiny-merge",
) -> Path:
    """A run directory as the search loop writes it; `final/` is a copy of `final_from`."""
    run_dir.mkdir(parents=True)
    shutil.copytree(final_from, run_dir / "final")
    names = list(sources)
    recipe = {
        "sources": [{"name": name, "path": path} for name, path in sources.items()],
        "base_model": names[0],
        "genome": {"method": "ties", "parameters": {"weight": {"min": 0.0, "max": 1.0}}},
        "fitness": {"tasks": ["tiny_mc"]},
    }
    if publish:
        recipe["output"] = {"publish": publish}
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    best = {
        "merge_method": "ties",
        "base_model": sources[names[0]],
        "models": [
            {"model": sources[name], "parameters": {"weight": 0.5, "density": 0.5}} for name in names[1:]
        ],
        "dtype": "float32",
    }
    (run_dir / "best.yaml").write_text(yaml.safe_dump(best, sort_keys=False))
    if lineage is None:
        lineage = {
            name: {"path": path, "registry": None, "sha256": weights_digest(Path(path))}
            for name, path in sources.items()
        }
    summary = {
        **SCORES,
        "evaluations": 24,
        "seed": 7,
        "method": "ties",
        "budget": {"evaluations": 24, "seconds": 60},
        "lineage": lineage,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    card = model_card(parse_summary(summary, "summary"), (run_dir / "best.yaml").read_text())
    (run_dir / "final" / "README.md").write_text(card)  # as the end of a run writes it
    return run_dir


@pytest.fixture
def run_dir(tmp_path: Path, tiny_sources: dict[str, Path]) -> Path:
    sources = {"base": str(tiny_sources["base"]), "specialist1": str(tiny_sources["specialist1"])}
    return make_run(tmp_path / "run", tiny_sources["specialist1"], sources)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """The real `merger` entry point, with only this area's commands registered."""
    monkeypatch.setattr(merger.cli, "COMMAND_MODULES", ("registry",))
    return merger.cli.main(argv)


def assert_index_consistent(root: Path) -> None:
    connection = sqlite3.connect(root / "index.sqlite")
    try:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert connection.execute("PRAGMA foreign_key_check").fetchall() == []
        for table in ("files", "parents", "scores"):
            orphans = connection.execute(
                f"SELECT COUNT(*) FROM {table} t LEFT JOIN entries e "
                "ON e.name = t.name AND e.version = t.version WHERE e.name IS NULL"
            ).fetchone()[0]
            assert orphans == 0, table
        for name, version in connection.execute("SELECT name, version FROM entries"):
            assert (root / "entries" / name / str(version)).is_dir()
            last = connection.execute("SELECT last_version FROM names WHERE name = ?", (name,)).fetchone()
            assert last[0] >= version
    finally:
        connection.close()


def visible_version_dirs(root: Path, name: str) -> list[str]:
    name_dir = root / "entries" / name
    return sorted(path.name for path in name_dir.iterdir()) if name_dir.is_dir() else []


# --------------------------------------------------------------------------- round trip


def test_publish_list_show_export_verify_round_trip(
    registry: Registry, run_dir: Path, tiny_sources: dict[str, Path], tmp_path: Path
) -> None:
    first = registry.publish(run_dir, "tiny-merge")
    second = registry.publish(run_dir, "tiny-merge")
    assert (first.version, second.version) == (1, 2)
    assert [str(entry.ref) for entry in registry.entries()] == ["tiny-merge@1", "tiny-merge@2"]

    entry = registry.show("tiny-merge")  # latest
    assert entry.version == 2 and entry.path == registry.root / "entries" / "tiny-merge" / "2"
    assert entry.method == "ties" and entry.fitness == pytest.approx(0.625)
    assert entry.scores == {
        "validation": {"tiny_gen": 0.5, "tiny_mc": 0.75},
        "test": {"tiny_gen": 0.4, "tiny_mc": 0.7},
    }
    assert entry.parents == [
        Parent("base", "path", str(tiny_sources["base"]), weights_digest(tiny_sources["base"])),
        Parent(
            "specialist1",
            "path",
            str(tiny_sources["specialist1"]),
            weights_digest(tiny_sources["specialist1"]),
        ),
    ]
    expected_files = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "mergekit_config.yml",
        "recipe.yaml",
        "summary.json",
    }
    assert set(entry.files) == expected_files
    source_weights = (tiny_sources["specialist1"] / "model.safetensors").read_bytes()
    assert entry.files["model.safetensors"].sha256 == hashlib.sha256(source_weights).hexdigest()
    assert entry.files["model.safetensors"].size == len(source_weights)
    assert (entry.path / "mergekit_config.yml").read_text() == (run_dir / "best.yaml").read_text()
    assert (entry.path / "recipe.yaml").read_text() == (run_dir / "recipe.yaml").read_text()

    assert all(result.ok for result in registry.verify())
    assert registry.resolve("registry:tiny-merge@1") == first.path
    assert resolve_path("registry:tiny-merge", registry_root=registry.root) == second.path

    exported = registry.export("tiny-merge@1", tmp_path / "exported")
    assert sorted(path.name for path in exported.iterdir()) == sorted(expected_files)
    assert (exported / "model.safetensors").read_bytes() == (first.path / "model.safetensors").read_bytes()
    with pytest.raises(MergerError, match="already exists"):
        registry.export("tiny-merge@1", tmp_path / "exported")


def test_entry_loads_with_from_pretrained(
    registry: Registry, run_dir: Path, tiny_sources: dict[str, Path]
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = registry.resolve(str(registry.publish(run_dir, "tiny-merge")))
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = AutoModelForCausalLM.from_pretrained(tiny_sources["specialist1"])
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert tokenizer("Q: what is 2 plus 3? A:")["input_ids"]


def test_model_card_front_matter_and_content(
    registry: Registry, run_dir: Path, tiny_sources: dict[str, Path]
) -> None:
    from huggingface_hub import ModelCard

    ref = registry.publish(run_dir, "tiny-merge")
    card = ModelCard.load(ref.path / "README.md")
    assert card.data.base_model == ["base", "specialist1"]
    assert {"merge", "mergekit", "evolutionary-merge", "ties"} <= set(card.data.tags)
    assert card.data.to_dict()["merge_method"] == "ties"
    assert card.data.library_name == "transformers"
    text = card.text
    assert (
        weights_digest(tiny_sources["base"]) in text and weights_digest(tiny_sources["specialist1"]) in text
    )
    assert "[0.25, -0.5, 1.0]" in text
    assert "0.750" in text and "0.400" in text  # winner validation tiny_mc, test tiny_gen
    assert "evaluations used: 24" in text and "budget seconds: 60" in text
    assert (ref.path / "README.md").read_bytes() == (run_dir / "final" / "README.md").read_bytes()


def test_a_run_without_a_card_gets_one_from_its_summary(registry: Registry, run_dir: Path) -> None:
    """A run finished before its card was published unchanged: the same renderer writes it from summary.json."""
    written = (run_dir / "final" / "README.md").read_text()
    (run_dir / "final" / "README.md").unlink()
    ref = registry.publish(run_dir, "tiny-merge")
    assert (ref.path / "README.md").read_text() == written


def test_default_root_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import platformdirs

    monkeypatch.delenv("MERGER_REGISTRY", raising=False)
    assert default_root() == Path(platformdirs.user_data_dir("merger")) / "registry"
    monkeypatch.setenv("MERGER_REGISTRY", str(tmp_path / "from-env"))
    assert Registry().root == (tmp_path / "from-env").resolve()
    assert (tmp_path / "from-env" / "index.sqlite").is_file()


def test_unusable_roots_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(MergerError, match="cannot open the registry"):
        Registry(tmp_path / "a-file")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "index.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(MergerError, match="cannot open the registry.*not a database"):
        Registry(tmp_path / "broken")
    newer = Registry(tmp_path / "newer")
    connection = sqlite3.connect(newer.root / "index.sqlite")
    connection.execute("PRAGMA user_version = 99")
    connection.close()
    with pytest.raises(MergerError, match="newer merger"):
        Registry(tmp_path / "newer")


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name",
    ["", "..", "../escape", "a/b", "a\\b", "a..b", ".hidden", "-dash", "x" * 65, "with space", "é", "a@b"],
)
def test_bad_names_are_refused(registry: Registry, run_dir: Path, name: str) -> None:
    with pytest.raises(MergerError, match="invalid registry name"):
        registry.publish(run_dir, name)
    assert registry.entries() == []
    assert not (registry.root / "entries").exists() or not any((registry.root / "entries").iterdir())


@pytest.mark.parametrize("name", ["a", "Model-2.1_b", "x" * 64, "9lives"])
def test_good_names_are_accepted(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("reference", ["x@0", "x@v1", "x@-1", "x@", "registry:", "registry:a/b@1"])
def test_bad_references_are_refused(reference: str) -> None:
    with pytest.raises(MergerError, match="invalid"):
        parse_reference(reference)


def test_unknown_entries_are_clear_errors(registry: Registry, run_dir: Path) -> None:
    with pytest.raises(MergerError, match="unknown registry entry 'nothing'.*empty"):
        registry.resolve("nothing")
    registry.publish(run_dir, "tiny-merge")
    with pytest.raises(MergerError, match=r"tiny-merge@5 not found \(versions of tiny-merge: 1\)"):
        registry.resolve("registry:tiny-merge@5")
    with pytest.raises(MergerError, match="known: tiny-merge"):
        registry.show("other")


def test_bad_run_directories_are_clear_errors(registry: Registry, run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(MergerError, match="run directory not found"):
        registry.publish(tmp_path / "missing", "tiny-merge")
    (run_dir / "summary.json").write_text("{not json")
    with pytest.raises(MergerError, match="summary.json is not valid JSON"):
        registry.publish(run_dir, "tiny-merge")
    (run_dir / "summary.json").write_text("{}")
    (run_dir / "final" / "model.safetensors").unlink()
    with pytest.raises(MergerError, match="'winner'"):
        registry.publish(run_dir, "tiny-merge")
    (run_dir / "summary.json").write_text(json.dumps(SCORES))
    with pytest.raises(MergerError, match="no weight files"):
        registry.publish(run_dir, "tiny-merge")
    assert registry.entries() == []


# --------------------------------------------------------------------------- crashes


def test_exception_mid_publish_leaves_nothing_visible(
    registry: Registry, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original_insert = registry_index.insert_entry

    def insert_then_fail(connection: sqlite3.Connection, row: registry_index.EntryRow) -> None:
        original_insert(connection, row)  # every row written, then the transaction must roll back
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(registry_index, "insert_entry", insert_then_fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        registry.publish(run_dir, "tiny-merge")
    assert registry.entries() == []
    assert visible_version_dirs(registry.root, "tiny-merge") == []
    assert list((registry.root / ".staging").iterdir()) == []
    assert_index_consistent(registry.root)

    monkeypatch.setattr(registry_index, "insert_entry", original_insert)
    assert registry.publish(run_dir, "tiny-merge").version == 1
    assert all(result.ok for result in registry.verify())


CRASHING_PUBLISHER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from merger.registry import Registry, publishing, index

    root, run_dir, point = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    copies = []
    original_copy, original_insert = publishing.copy_durably, index.insert_entry

    def copy_then_die(source, destination):
        copies.append(source)
        if len(copies) == 2:
            die()
        return original_copy(source, destination)

    def insert_then_die(connection, row):
        original_insert(connection, row)
        die()

    if point == "staging":
        publishing.copy_durably = copy_then_die
    elif point == "card":
        publishing.write_hashed = lambda *args: die()
    elif point == "after-rename":
        index.insert_entry = lambda connection, row: die()
    elif point == "before-commit":
        index.insert_entry = insert_then_die
    Registry(root).publish(run_dir, "tiny-merge")
    """
)


@pytest.mark.slow  # a publisher subprocess per crash point
@pytest.mark.parametrize("point", ["staging", "card", "after-rename", "before-commit"])
def test_sigkill_mid_publish_leaves_nothing_visible(registry: Registry, run_dir: Path, point: str) -> None:
    registry.publish(run_dir, "tiny-merge")  # version 1 exists before the crash
    process = subprocess.run(
        [sys.executable, "-c", CRASHING_PUBLISHER, str(registry.root), str(run_dir), point],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == -9, process.stderr

    after_crash = Registry(registry.root)
    assert [str(entry.ref) for entry in after_crash.entries()] == ["tiny-merge@1"]
    assert after_crash.resolve("tiny-merge") == registry.root / "entries" / "tiny-merge" / "1"
    assert all(result.ok for result in after_crash.verify())
    assert_index_consistent(registry.root)

    removed = after_crash.collect_garbage()
    assert removed, "the crashed writer left something to clean"
    assert visible_version_dirs(registry.root, "tiny-merge") == ["1"]
    assert list((registry.root / ".staging").iterdir()) == []
    assert after_crash.publish(run_dir, "tiny-merge").version == 2
    assert_index_consistent(registry.root)


@pytest.mark.slow  # a publisher subprocess, SIGKILLed
def test_publish_cleans_leftovers_of_a_crashed_writer(registry: Registry, run_dir: Path) -> None:
    process = subprocess.run(
        [sys.executable, "-c", CRASHING_PUBLISHER, str(registry.root), str(run_dir), "before-commit"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == -9, process.stderr
    assert visible_version_dirs(registry.root, "tiny-merge") == ["1"]  # on disk, not in the index
    assert registry.entries() == []
    assert registry.publish(run_dir, "tiny-merge").version == 1
    assert all(result.ok for result in registry.verify())
    assert_index_consistent(registry.root)


# --------------------------------------------------------------------------- concurrency


CONCURRENT_PUBLISHER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from merger.registry import Registry

    root, run_dir, barrier, worker = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    registry = Registry(root)
    (barrier / f"ready-{worker}").touch()
    deadline = time.monotonic() + 60
    while not (barrier / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    for _ in range(2):
        print(registry.publish(run_dir, "tiny-merge").version, flush=True)
    """
)


@pytest.mark.slow  # publisher subprocesses
def test_concurrent_publishers_get_distinct_versions(
    registry: Registry, run_dir: Path, tmp_path: Path
) -> None:
    workers = 4
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CONCURRENT_PUBLISHER,
                str(registry.root),
                str(run_dir),
                str(barrier),
                str(worker),
            ],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for worker in range(workers)
    ]
    deadline = time.monotonic() + 120
    while len(list(barrier.glob("ready-*"))) < workers and time.monotonic() < deadline:
        time.sleep(0.01)
    (barrier / "go").touch()
    versions = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        versions += [int(line) for line in stdout.split()]
    assert sorted(versions) == list(range(1, 2 * workers + 1))
    assert [entry.version for entry in registry.entries("tiny-merge")] == list(range(1, 2 * workers + 1))
    assert all(result.ok for result in registry.verify())
    assert visible_version_dirs(registry.root, "tiny-merge") == sorted(
        str(v) for v in range(1, 2 * workers + 1)
    )
    assert list((registry.root / ".staging").iterdir()) == []
    assert_index_consistent(registry.root)


# --------------------------------------------------------------------------- corruption


def test_corrupt_weights_are_caught_by_verify_resolve_and_export(
    registry: Registry, run_dir: Path, tmp_path: Path
) -> None:
    good = registry.publish(run_dir, "tiny-merge")
    bad = registry.publish(run_dir, "tiny-merge")
    weights = bad.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    weights.write_bytes(bytes(data))
    (bad.path / "tokenizer.json").unlink()

    results = {str(result.ref): result for result in registry.verify()}
    assert results["tiny-merge@1"].ok
    assert results["tiny-merge@2"].corrupt == ["model.safetensors"]
    assert results["tiny-merge@2"].missing == ["tokenizer.json"]

    for attempt in (
        lambda: registry.resolve("tiny-merge"),
        lambda: resolve_path("registry:tiny-merge@2", registry_root=registry.root),
        lambda: registry.export("tiny-merge@2", tmp_path / "out"),
    ):
        with pytest.raises(MergerError, match="tiny-merge@2") as error:
            attempt()
        assert "model.safetensors" in str(error.value) or "tokenizer.json" in str(error.value)
    with pytest.raises(MergerError, match="corrupt file model.safetensors.*|missing file tokenizer.json"):
        registry.resolve("tiny-merge@2")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.partial*"))
    assert registry.resolve("tiny-merge@1") == good.path


def test_unexpected_file_is_reported(registry: Registry, run_dir: Path) -> None:
    ref = registry.publish(run_dir, "tiny-merge")
    (ref.path / "adapter_model.safetensors").write_bytes(b"sneaky")
    with pytest.raises(MergerError, match="unexpected file adapter_model.safetensors"):
        registry.resolve("tiny-merge@1")


# --------------------------------------------------------------------------- lineage


def test_registry_entry_as_source_records_lineage(
    registry: Registry, run_dir: Path, tiny_sources: dict[str, Path], tmp_path: Path
) -> None:
    from mergekit.config import MergeConfiguration

    from merger.engine.reference import export_merge

    parent = registry.publish(run_dir, "parent")
    registry.publish(run_dir, "parent")  # a newer version exists; the run below used @1

    merged_source = resolve_path("registry:parent@1", registry_root=registry.root)
    assert merged_source == parent.path
    child_final = tmp_path / "child-final"
    config = MergeConfiguration.model_validate(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(merged_source), "parameters": {"weight": 0.5}},
                {"model": str(tiny_sources["specialist2"]), "parameters": {"weight": 0.5}},
            ],
            "dtype": "float32",
        }
    )
    export_merge(config, child_final)
    sources = {"merged": "registry:parent@1", "specialist2": str(tiny_sources["specialist2"])}
    lineage = {  # as the search loop writes it: resolved paths, no hashes
        "merged": {"path": str(merged_source), "registry": "parent", "reference": "registry:parent"},
        "specialist2": {"path": str(tiny_sources["specialist2"]), "registry": None},
    }
    child_run = make_run(tmp_path / "child-run", child_final, sources, lineage=lineage)
    child = registry.publish(child_run, "child")

    entry = registry.show(str(child))
    assert entry.parents == [
        Parent("merged", "registry", "parent@1", weights_digest(parent.path)),
        Parent(
            "specialist2",
            "path",
            str(tiny_sources["specialist2"]),
            weights_digest(tiny_sources["specialist2"]),
        ),
    ]
    assert registry.show("parent@1").children == ["child@1"]
    assert registry.show("parent@2").children == []
    from huggingface_hub import ModelCard

    assert "parent@1" in ModelCard.load(child.path / "README.md").data.base_model


# --------------------------------------------------------------------------- remove


def test_remove_never_reuses_a_version(registry: Registry, run_dir: Path) -> None:
    first = registry.publish(run_dir, "tiny-merge")
    registry.publish(run_dir, "tiny-merge")
    with pytest.raises(MergerError, match="explicit version"):
        registry.remove("tiny-merge")
    assert registry.remove("tiny-merge@2").version == 2
    assert not (registry.root / "entries" / "tiny-merge" / "2").exists()
    with pytest.raises(MergerError, match="not found"):
        registry.remove("tiny-merge@2")
    assert registry.publish(run_dir, "tiny-merge").version == 3
    assert [entry.version for entry in registry.entries()] == [1, 3]
    assert first.path.is_dir()
    assert_index_consistent(registry.root)


# --------------------------------------------------------------------------- push


class RecordingHub:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from huggingface_hub import HfApi

        def create_repo(api: HfApi, repo_id: str, **kwargs: Any) -> str:
            self.calls.append(("create_repo", (repo_id,), {**kwargs, "token": api.token}))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api: HfApi, **kwargs: Any) -> None:
            self.calls.append(
                ("upload_folder", (), {**kwargs, "files": sorted(os.listdir(kwargs["folder_path"]))})
            )

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_push_makes_the_expected_hub_calls(
    registry: Registry, run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = registry.publish(run_dir, "tiny-merge")
    hub = RecordingHub()
    hub.install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    code = cli(
        [
            "registry",
            "push",
            "tiny-merge@1",
            "someone/tiny-merge",
            "--private",
            "--registry",
            str(registry.root),
        ],
        monkeypatch,
    )
    assert code == 0, capsys.readouterr().err
    assert "https://huggingface.co/someone/tiny-merge" in capsys.readouterr().out
    (create_name, create_args, create_kwargs), (upload_name, _, upload_kwargs) = hub.calls
    assert create_name == "create_repo" and create_args == ("someone/tiny-merge",)
    assert create_kwargs == {
        "repo_type": "model",
        "private": True,
        "exist_ok": True,
        "token": "hf_test_token",
    }
    assert upload_name == "upload_folder"
    assert upload_kwargs["repo_id"] == "someone/tiny-merge" and upload_kwargs["repo_type"] == "model"
    assert Path(upload_kwargs["folder_path"]) == ref.path
    assert "README.md" in upload_kwargs["files"] and "model.safetensors" in upload_kwargs["files"]


def test_push_refusals(
    registry: Registry,
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref = registry.publish(run_dir, "tiny-merge")
    hub = RecordingHub()
    hub.install(monkeypatch)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token either
    root = ["--registry", str(registry.root)]
    assert cli(["registry", "push", "tiny-merge", "someone/x", *root], monkeypatch) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert cli(["registry", "push", "tiny-merge", "not/a/valid/id", *root], monkeypatch) == 2
    assert "invalid Hugging Face repo id" in capsys.readouterr().err
    (ref.path / "config.json").write_text("{}")
    assert cli(["registry", "push", "tiny-merge", "someone/x", *root], monkeypatch) == 2
    assert "corrupt file config.json" in capsys.readouterr().err
    assert hub.calls == []


def test_push_without_network_is_a_clear_error(
    registry: Registry, run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from huggingface_hub import constants

    registry.publish(run_dir, "tiny-merge")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the real client, refusing to touch the network
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    code = cli(["registry", "push", "tiny-merge", "someone/x", "--registry", str(registry.root)], monkeypatch)
    assert code == 2
    error = capsys.readouterr().err
    assert "pushing tiny-merge@1 to someone/x failed" in error and "offline" in error


# --------------------------------------------------------------------------- CLI


def test_cli_round_trip_and_exit_codes(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MERGER_REGISTRY", str(tmp_path / "env-registry"))
    assert cli(["publish", str(run_dir)], monkeypatch) == 0  # name from the recipe's output.publish
    assert "published tiny-merge@1" in capsys.readouterr().out
    flag_root = tmp_path / "flag-registry"
    root = ["--registry", str(flag_root)]
    assert cli(["publish", str(run_dir), "--name", "other", *root], monkeypatch) == 0
    assert "published other@1" in capsys.readouterr().out
    assert [str(entry.ref) for entry in Registry(flag_root).entries()] == ["other@1"]
    for argv in (["registry", "--registry", str(flag_root), "list"], ["registry", "list", *root]):
        assert cli(argv, monkeypatch) == 0
        listed = capsys.readouterr().out
        assert "other@1" in listed and "tiny-merge" not in listed

    assert cli(["registry", "list"], monkeypatch) == 0
    listing = capsys.readouterr().out
    assert "tiny-merge@1" in listing and "ties" in listing and "tiny_mc=0.750" in listing
    assert cli(["registry", "show", "tiny-merge", "--json"], monkeypatch) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 1 and shown["genotype"] == [0.25, -0.5, 1.0]
    assert cli(["registry", "show", "tiny-merge@1"], monkeypatch) == 0
    assert "base: path" in capsys.readouterr().out
    assert cli(["registry", "export", "tiny-merge@1", str(tmp_path / "exported")], monkeypatch) == 0
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    capsys.readouterr()
    assert cli(["registry", "verify"], monkeypatch) == 0
    assert "ok tiny-merge@1" in capsys.readouterr().out

    (tmp_path / "env-registry" / "entries" / "tiny-merge" / "1" / "model.safetensors").write_bytes(b"garbage")
    assert cli(["registry", "verify", "tiny-merge"], monkeypatch) == 1
    assert "DAMAGED tiny-merge@1: corrupt file model.safetensors" in capsys.readouterr().out

    for argv, message in [
        (["publish", str(run_dir), "--name", "../evil"], "invalid registry name '../evil'"),
        (["publish", str(tmp_path / "nope"), "--name", "x"], "run directory not found"),
        (["registry", "show", "missing"], "unknown registry entry 'missing'"),
        (["registry", "rm", "tiny-merge"], "explicit version"),
        (["registry", "verify", "missing"], "unknown registry entry 'missing'"),
        (["registry", "show", "tiny-merge@x"], "invalid version 'x'"),
    ]:
        assert cli(argv, monkeypatch) == 2, argv
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error

    assert cli(["registry", "rm", "tiny-merge@1"], monkeypatch) == 0
    assert "removed tiny-merge@1" in capsys.readouterr().out
    assert cli(["registry", "list"], monkeypatch) == 0
    assert "the registry is empty" in capsys.readouterr().out


def test_publish_without_a_name_is_a_clear_error(
    tmp_path: Path,
    tiny_sources: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sources = {"base": str(tiny_sources["base"]), "specialist1": str(tiny_sources["specialist1"])}
    run = make_run(tmp_path / "run", tiny_sources["base"], sources, publish=None)
    assert cli(["publish", str(run), "--registry", str(tmp_path / "r")], monkeypatch) == 2
    assert "pass --name NAME" in capsys.readouterr().err


@pytest.mark.slow
def test_recipe_with_a_registry_source_publishes_with_lineage(
    registry: Registry,
    run_dir: Path,
    tiny_sources: dict[str, Path],
    tiny_evals: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The real search loop: `registry:parent@1` as a source and `output.publish` at the end."""
    from tests.recipes import tiny_recipe, write_recipe

    parent = registry.publish(run_dir, "parent")
    registry.publish(run_dir, "parent")  # the latest is @2; the recipe pins @1
    sources = {
        "base": tiny_sources["base"],
        "merged": "registry:parent@1",
        "specialist2": tiny_sources["specialist2"],
    }
    recipe = tiny_recipe(
        sources,
        tiny_evals,
        tmp_path / "child-run",
        optimizer={"popsize": 4, "max_evaluations": 4, "seed": 3},
        output={"publish": "child", "registry": str(registry.root)},
        validation=None,
    )
    recipe_path = write_recipe(tmp_path / "recipe.yaml", recipe)
    monkeypatch.setattr(merger.cli, "COMMAND_MODULES", ("run", "registry"))
    assert merger.cli.main(["run", str(recipe_path), "--no-progress"]) == 0

    child = registry.show("child")
    assert child.version == 1
    assert [(parent.source, parent.kind, parent.reference) for parent in child.parents] == [
        ("base", "path", str(tiny_sources["base"])),
        ("merged", "registry", "parent@1"),
        ("specialist2", "path", str(tiny_sources["specialist2"])),
    ]
    assert child.parents[1].sha256 == weights_digest(parent.path)
    assert registry.show("parent@1").children == ["child@1"]
    assert child.fitness is not None and set(child.scores["test"]) == {"tiny_mc"}
    assert all(result.ok for result in registry.verify("child"))

    # The same command on the finished run re-scores nothing and publishes nothing new.
    summary = tmp_path / "child-run" / "summary.json"
    written = summary.stat().st_mtime_ns
    capsys.readouterr()
    assert merger.cli.main(["run", str(recipe_path), "--no-progress"]) == 0
    assert "already published as child@1" in capsys.readouterr().out
    assert [entry.version for entry in registry.entries("child")] == [1]
    assert summary.stat().st_mtime_ns == written
