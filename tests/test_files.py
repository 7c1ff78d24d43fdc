"""The one atomic writer: whole files or none, no leftovers, directories published whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from merger.common.files import atomic_path, publish_directory, staging_dir, write_atomic


def test_write_atomic_replaces_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_atomic(target, b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as partial:
        partial.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_publish_directory_renames_a_whole_tree(tmp_path: Path) -> None:
    final = tmp_path / "final"
    staging = staging_dir(final)
    (staging / "sub").mkdir(parents=True)
    (staging / "sub" / "a.bin").write_bytes(b"a")
    publish_directory(staging, final)
    assert (final / "sub" / "a.bin").read_bytes() == b"a"
    assert not staging.exists()


def test_publish_directory_keeps_a_concurrent_winner_only_when_asked(tmp_path: Path) -> None:
    final = tmp_path / "model"
    (final).mkdir()
    (final / "theirs").write_text("kept")
    ours = tmp_path / "ours"
    (ours / "x").mkdir(parents=True)
    (ours / "x" / "file").write_text("ours")
    with pytest.raises(OSError):
        publish_directory(ours, final)
    assert publish_directory(ours, final, keep_existing=True) == final
    assert (final / "theirs").read_text() == "kept" and not ours.exists()
