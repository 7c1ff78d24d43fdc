"""Checking local task data before any model loads: every JSON data file reads as rows of objects.

lm-eval loads a task's data only when the run scores its first candidate, after the run directory
and ledger exist; a broken file then ends in a long `datasets` traceback. Here each local file is
streamed once, line by line (never more than one bounded line in memory), and the first problem is
one line naming the task, the file and the line. The rules follow what `datasets`' json builder
accepts: JSON Lines (blank lines and a UTF-8 BOM allowed), or one JSON document (a list of objects).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from merger.common.errors import MergerError, shown

MAX_LINE_BYTES = 16 << 20
MAX_DOCUMENT_BYTES = 64 << 20  # a single-document JSON file is only parsed whole up to this size
UTF8_BOM = b"\xef\xbb\xbf"
GLOB_CHARACTERS = frozenset("*?[")


def check_task_data(configs: Iterable[Any]) -> None:
    """Raise MergerError on the first unreadable local JSON data file of these lm-eval task configs.

    `configs` are what `lm_eval_bridge.anchored_task_configs` gives lm-eval: dicts for local tasks (checked),
    names for built-in tasks (skipped).
    """
    checked: set[Path] = set()
    for config in configs:
        if not isinstance(config, dict) or config.get("dataset_path") != "json":
            continue
        kwargs = config.get("dataset_kwargs") or {}
        for path in data_file_paths(kwargs.get("data_files")):
            if path.resolve() not in checked:
                checked.add(path.resolve())
                _DataFile(str(config.get("task")), path).check(whole_document="field" in kwargs)


def data_file_paths(files: Any) -> list[Path]:
    """The local files `data_files` names (a path, a list, or a split -> path(s) mapping); globs expanded."""
    if isinstance(files, dict):
        names = [name for value in files.values() for name in (value if isinstance(value, list) else [value])]
    else:
        names = files if isinstance(files, list) else [files]
    paths: list[Path] = []
    for name in names:
        if not isinstance(name, str) or "://" in name:
            continue  # remote files are `datasets`' business
        matches = sorted(glob.glob(name)) if GLOB_CHARACTERS & set(name) else []
        paths += [Path(match) for match in matches] or [Path(name)]
    return paths


def _kind(value: object) -> str:
    kinds = {list: "a JSON array", str: "a JSON string", bool: "a JSON boolean", type(None): "JSON null"}
    return kinds.get(type(value), "a JSON number")


class _DataFile:
    def __init__(self, task: str, path: Path) -> None:
        self.task = task
        self.path = path

    def fail(self, problem: str) -> MergerError:
        return MergerError(f"task {shown(self.task)}: data file {self.path} {problem}")

    def check(self, whole_document: bool) -> None:
        if not self.path.is_file():
            raise self.fail("does not exist" if not self.path.exists() else "is not a file")
        if self.path.stat().st_size == 0:
            raise self.fail("is empty")
        if whole_document:
            self._check_document()
            return
        rows = 0
        with self.path.open("rb") as handle:
            for number, text in self._lines(handle):
                if not text.strip():
                    continue
                if rows == 0 and text.lstrip().startswith("["):
                    self._check_document()
                    return
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as error:
                    if rows == 0 and self._is_one_document():
                        return  # a pretty-printed single JSON document, which `datasets` also reads
                    raise self.fail(
                        f"line {number} is not valid JSON ({error.msg}: column {error.colno})"
                    ) from None
                if not isinstance(row, dict):
                    raise self.fail(f"line {number} is {_kind(row)}, not a JSON object")
                rows += 1
        if rows == 0:
            raise self.fail("has no rows (only blank lines)")

    def _lines(self, handle: BinaryIO) -> Iterator[tuple[int, str]]:
        number = 0
        while raw := handle.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise self.fail(f"line {number} is longer than {MAX_LINE_BYTES >> 20} MiB")
            if number == 1:
                raw = raw.removeprefix(UTF8_BOM)
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise self.fail(
                    f"line {number} is not UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1})"
                ) from None

    def _is_one_document(self) -> bool:
        if self.path.stat().st_size > MAX_DOCUMENT_BYTES:
            return False
        try:
            return isinstance(json.loads(self.path.read_bytes().removeprefix(UTF8_BOM)), (dict, list))
        except ValueError:  # not JSON, or not UTF-8
            return False

    def _check_document(self) -> None:
        """A whole-file JSON document: a list of objects (or an object); parsed only when not too large."""
        if self.path.stat().st_size > MAX_DOCUMENT_BYTES:
            return
        try:
            document = json.loads(self.path.read_bytes().removeprefix(UTF8_BOM))
        except UnicodeDecodeError as error:
            raise self.fail(f"is not UTF-8 (byte {error.start + 1})") from None
        except json.JSONDecodeError as error:
            raise self.fail(
                f"line {error.lineno} is not valid JSON ({error.msg}: column {error.colno})"
            ) from None
        items = document if isinstance(document, list) else [document]
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise self.fail(f"item {index} is {_kind(item)}, not a JSON object")
        if not items:
            raise self.fail("has no rows (an empty JSON array)")
