"""A full disk, on a real small tmpfs: one clear line, nothing half-written, everything usable afterwards."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from merger.common.errors import MergerError
from merger.registry import Registry
from tests.cli import assert_one_line_error, run_merger
from tests.recipes import tiny_recipe, write_recipe
from tests.test_registry import assert_index_consistent, make_run, visible_version_dirs

TMPFS_BYTES = 4 << 20
PAGE = 4096


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 4 MiB tmpfs; skipped where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


def free_bytes(mount_point: Path) -> int:
    status = os.statvfs(mount_point)
    return status.f_bavail * status.f_frsize


def fill(mount_point: Path, leave: int = 0) -> Path:
    """Allocate a filler file so that exactly `leave` bytes (whole pages) stay free."""
    filler = mount_point / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        os.posix_fallocate(descriptor, 0, free_bytes(mount_point) - leave)
    finally:
        os.close(descriptor)
    assert free_bytes(mount_point) == leave
    return filler


def assert_registry_clean(root: Path, name: str) -> None:
    """The index is consistent, no staging leftovers, and every version on disk has its row."""
    assert_index_consistent(root)
    assert list((root / ".staging").iterdir()) == []
    recorded = (
        [str(entry.version) for entry in Registry(root).entries(name)] if (root / "entries").exists() else []
    )
    assert visible_version_dirs(root, name) == recorded


@pytest.fixture
def run_dir(tmp_path: Path, tiny_sources: dict[str, Path]) -> Path:
    sources = {"base": str(tiny_sources["base"]), "specialist1": str(tiny_sources["specialist1"])}
    return make_run(tmp_path / "run", tiny_sources["specialist1"], sources)


def test_publish_fails_cleanly_at_every_moment_the_disk_fills(tmpfs: Path, run_dir: Path) -> None:
    """Leave 0, 4 KiB, 8 KiB... free until a publish fits: copying, the card, the index rows and the COMMIT
    each run out in turn, and every failure leaves the registry as it was."""
    root = tmpfs / "registry"
    registry = Registry(root)
    first = registry.publish(run_dir, "merged")
    causes: set[type] = set()
    for leave in range(0, TMPFS_BYTES // 2, PAGE):
        filler = fill(tmpfs, leave)
        try:
            published = registry.publish(run_dir, "merged")
        except MergerError as error:
            assert str(error).startswith("no space left on device"), error
            assert f"publishing {run_dir} as merged in the registry at {root}" in str(error)
            causes.add(type(error.__cause__))
            published = None
        filler.unlink()
        assert_registry_clean(root, "merged")
        assert [entry.ref for entry in registry.entries()] == [first] + ([published] if published else [])
        if published:
            break
    assert published is not None and published.version == 2
    assert causes == {OSError, sqlite3.OperationalError}  # both the files and the index ran out
    assert all(result.ok for result in registry.verify())


@pytest.mark.slow  # a dozen `merger` subprocesses
def test_cli_publish_export_and_rm_on_a_full_disk_are_one_line(tmpfs: Path, run_dir: Path) -> None:
    root = tmpfs / "registry"
    assert run_merger("publish", str(run_dir), "--registry", str(root)).returncode == 0
    filler = fill(tmpfs)

    line = assert_one_line_error(run_merger("publish", str(run_dir), "--registry", str(root)))
    assert line.startswith("merger: error: no space left on device while publishing")
    destination = tmpfs / "exported"
    line = assert_one_line_error(
        run_merger("registry", "--registry", str(root), "export", "tiny-merge@1", str(destination))
    )
    assert line.startswith("merger: error: no space left on device while exporting tiny-merge@1")
    assert sorted(path.name for path in tmpfs.iterdir()) == ["filler", "registry"]  # no partial copy
    line = assert_one_line_error(run_merger("registry", "--registry", str(root), "rm", "tiny-merge@1"))
    assert "database or disk is full" in line and "removing tiny-merge@1" in line

    # Still usable while full: reading needs no space.
    listing = run_merger("registry", "--registry", str(root), "list")
    assert (
        listing.returncode == 0 and "tiny-merge@1" in listing.stdout and "tiny-merge@2" not in listing.stdout
    )
    assert run_merger("registry", "--registry", str(root), "show", "tiny-merge@1").returncode == 0
    verified = run_merger("registry", "--registry", str(root), "verify")
    assert verified.returncode == 0 and "1 checked, 0 damaged" in verified.stdout
    assert_registry_clean(root, "tiny-merge")

    filler.unlink()
    published = run_merger("publish", str(run_dir), "--registry", str(root))
    assert published.returncode == 0 and "tiny-merge@2" in published.stdout
    exported = run_merger("registry", "--registry", str(root), "export", "tiny-merge@2", str(destination))
    assert exported.returncode == 0, exported.stderr
    assert run_merger("registry", "--registry", str(root), "rm", "tiny-merge@1").returncode == 0
    verified = run_merger("registry", "--registry", str(root), "verify")
    assert verified.returncode == 0 and "1 checked, 0 damaged" in verified.stdout
    assert_registry_clean(root, "tiny-merge")


def _summary_of(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    return {key: summary[key] for key in ("winner", "sources", "evaluations", "generations")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_sources: dict[str, Path], tiny_evals: Path):
    """The recipe, and the summary of its run on a disk with space."""
    root = tmp_path_factory.mktemp("uninterrupted")
    recipe = write_recipe(root / "recipe.yaml", tiny_recipe(tiny_sources, tiny_evals, root / "run"))
    process = run_merger("run", str(recipe), "--no-progress")
    assert process.returncode == 0, process.stderr[-2000:]
    return recipe, _summary_of(root / "run")


@pytest.mark.slow  # `merger run` subprocesses
@pytest.mark.parametrize("leave", [8 * 1024, 300 * 1024, 500 * 1024])
def test_run_on_a_full_disk_is_one_line_and_resumes(
    tmpfs: Path, uninterrupted: tuple[Path, dict], leave: int
) -> None:
    """Out of space in the ledger, the weights or the tokenizer of the export (depending on `leave`): one line, then the
    same command with space back finishes as the uninterrupted run did."""
    recipe, expected = uninterrupted
    run = tmpfs / "run"
    filler = fill(tmpfs, leave)
    process = run_merger("run", str(recipe), "--run-dir", str(run), "--no-progress")
    # The run's own status line ("starting run in ...") may come first; then only the error.
    lines = process.stderr.splitlines(keepends=True)
    process.stderr = "".join(line for line in lines if not line.startswith("starting run in "))
    assert_one_line_error(process, "no space left on device", f"in {run}", "free some space and run it again")
    assert not (run / "summary.json").exists()

    filler.unlink()
    resumed = run_merger("run", str(recipe), "--run-dir", str(run), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming run" in resumed.stderr
    assert _summary_of(run) == expected
    assert [path.name for path in run.iterdir() if path.name.endswith((".tmp", ".partial"))] == []
