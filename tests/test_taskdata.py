"""Malformed task data is refused in validation, before any model loads: one line naming task, file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from merger.common.errors import MergerError
from merger.recipe import load_recipe
from merger.scoring.fitness import check_tasks
from merger.scoring.taskdata import MAX_LINE_BYTES
from tests.cli import assert_one_line_error, run_merger
from tests.recipes import tiny_recipe, write_recipe
from tests.tiny_models import write_tasks


@pytest.fixture
def evals(tmp_path: Path) -> dict[str, Path]:
    """Fresh tiny_mc/tiny_gen tasks whose data files each test may break."""
    return write_tasks(tmp_path / "evals")


def _recipe(tmp_path: Path, tiny_sources: dict[str, Path], evals: dict[str, Path]) -> Path:
    recipe = tiny_recipe(tiny_sources, evals["tiny_mc"].parent, tmp_path / "run")
    return write_recipe(tmp_path / "recipe.yaml", recipe)


def _replace_line(path: Path, number: int, content: bytes) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[number - 1] = content + b"\n"
    path.write_bytes(b"".join(lines))


@pytest.mark.slow  # subprocesses
def test_broken_line_is_refused_before_the_run_directory_exists(
    tmp_path: Path, tiny_sources: dict[str, Path], evals: dict[str, Path]
) -> None:
    data = evals["tiny_gen"]
    _replace_line(data, 7, b'{"question": "The capital of France is", "answer": ')
    process = run_merger("run", str(_recipe(tmp_path, tiny_sources, evals)), "--no-progress")
    assert_one_line_error(process, "task 'tiny_gen'", str(data), "line 7 is not valid JSON")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # subprocesses
def test_missing_data_file_is_one_line(
    tmp_path: Path, tiny_sources: dict[str, Path], evals: dict[str, Path]
) -> None:
    evals["tiny_mc"].unlink()
    process = run_merger("run", str(_recipe(tmp_path, tiny_sources, evals)), "--no-progress")
    assert_one_line_error(process, "task 'tiny_mc'", str(evals["tiny_mc"]), "does not exist")
    assert not (tmp_path / "run").exists()


HUGE_LINE = b'{"question": "' + b"x" * MAX_LINE_BYTES + b'"}'


@pytest.mark.parametrize(
    ("line", "content", "expected"),
    [
        (3, b"[1, 2, 3]", "line 3 is a JSON array, not a JSON object"),
        (5, b'"just a string"', "line 5 is a JSON string, not a JSON object"),
        (
            2,
            b'{"question": "caf\xe9", "choices": ["1", "2"], "label": 0}',
            "line 2 is not UTF-8 (byte 0xe9 at column 18)",
        ),
        (4, HUGE_LINE, f"line 4 is longer than {MAX_LINE_BYTES >> 20} MiB"),
        (
            6,
            b'{"question": "' + b"y" * (1 << 20) + b'", ',
            "line 6 is not valid JSON (Expecting property name",
        ),
    ],
)
def test_each_kind_of_bad_line_names_task_file_and_line(
    tmp_path: Path,
    tiny_sources: dict[str, Path],
    evals: dict[str, Path],
    line: int,
    content: bytes,
    expected: str,
) -> None:
    _replace_line(evals["tiny_mc"], line, content)
    with pytest.raises(MergerError) as raised:
        check_tasks(load_recipe(_recipe(tmp_path, tiny_sources, evals)))
    message = str(raised.value)
    assert message.startswith(f"task 'tiny_mc': data file {evals['tiny_mc']} {expected}"), message
    assert "\n" not in message and len(message) < 400  # a huge line is never echoed


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty"),
        (b"\n  \n\n", "has no rows"),
        (b"[]", "has no rows"),
        (b'[{"a": 1},\n 2]', "item 1 is a JSON number"),
    ],
)
def test_empty_and_bad_whole_files(
    tmp_path: Path, tiny_sources: dict[str, Path], evals: dict[str, Path], content: bytes, expected: str
) -> None:
    evals["tiny_mc"].write_bytes(content)
    with pytest.raises(MergerError, match=expected):
        check_tasks(load_recipe(_recipe(tmp_path, tiny_sources, evals)))


def test_what_datasets_reads_is_accepted(
    tmp_path: Path, tiny_sources: dict[str, Path], evals: dict[str, Path]
) -> None:
    """What `datasets` reads: blank lines, a BOM, a JSON array of rows, one pretty-printed row."""
    rows = [json.loads(line) for line in evals["tiny_mc"].read_text().splitlines()]
    recipe = load_recipe(_recipe(tmp_path, tiny_sources, evals))
    for content in (
        b"\xef\xbb\xbf" + b"\n\n".join(json.dumps(row).encode() for row in rows) + b"\n\n",
        json.dumps(rows).encode(),
        json.dumps(rows, indent=2).encode(),
        json.dumps(rows[0], indent=2).encode(),
    ):
        evals["tiny_mc"].write_bytes(content)
        check_tasks(recipe)
