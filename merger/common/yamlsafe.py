"""The one way user YAML is read (recipes, pools, run directories): bounded in size, depth and aliases.

PyYAML's safe loader refuses code but not cost: a deeply nested document ends in a RecursionError,
and a "billion laughs" alias bomb composes into a small graph whose expansion (by pydantic, or by an
error message echoing it) takes minutes and gigabytes. Here the file's size is capped before parsing,
the nesting depth while composing, and the expanded size of the composed graph before anything is
built from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from merger.common.errors import MergerError

MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000  # scalars, lists and mappings once aliases are expanded


class _Refused(Exception):
    pass


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(f"nested deeper than {MAX_YAML_DEPTH} levels (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Node:
        node = super().compose_document()
        _check_expanded_size(node)
        return node


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expanded_size(root: Node) -> None:
    """Size and depth of the document with every alias expanded, without expanding it (iterative)."""
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, expanded depth)
    open_nodes: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            sizes = [measured[id(child)] for child in _children(node)]
            size = 1 + sum(s for s, _ in sizes)
            depth = 1 + max((d for _, d in sizes), default=0)
            if size > MAX_YAML_NODES:
                raise _Refused(f"expands to more than {MAX_YAML_NODES:,} values (aliases expanding too far)")
            if depth > MAX_YAML_DEPTH:
                raise _Refused(f"nested deeper than {MAX_YAML_DEPTH} levels once aliases are expanded")
            measured[key] = (size, depth)
        elif key not in measured:
            if key in open_nodes:
                raise _Refused(f"has a recursive alias (line {node.start_mark.line + 1})")
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node) if id(child) not in measured)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def parse_yaml(text: str, origin: str) -> Any:
    """Parse one YAML document from `text`; every problem is one MergerError line naming `origin`."""
    if len(text) > MAX_YAML_BYTES:
        raise MergerError(f"{origin}: {len(text):,} characters is too large (at most {MAX_YAML_BYTES:,})")
    loader = _BoundedLoader(text)
    loader.name = origin  # marks in PyYAML's messages name the file, not "<unicode string>"
    try:
        return loader.get_single_data()
    except _Refused as refused:
        raise MergerError(f"{origin}: refused: the YAML {refused}") from None
    except yaml.YAMLError as error:
        raise MergerError(f"{origin}: not valid YAML: {_one_line(str(error))}") from None
    finally:
        loader.dispose()


def read_yaml_file(path: Path, what: str = "file") -> Any:
    """Read and parse a YAML file, refusing one over MAX_YAML_BYTES before reading it all."""
    if not path.is_file():
        raise MergerError(f"{what} not found: {path}")
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_YAML_BYTES + 1)
    except OSError as error:
        raise MergerError(f"{path}: cannot read: {error.strerror}") from None
    if len(raw) > MAX_YAML_BYTES:
        raise MergerError(f"{path}: too large for a {what} (at most {MAX_YAML_BYTES:,} bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MergerError(f"{path}: not UTF-8 text (byte {error.start})") from None
    return parse_yaml(text, str(path))
