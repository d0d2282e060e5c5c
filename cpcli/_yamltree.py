"""A YAML document kept as PyYAML's node tree, so validation knows every key's line."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml

MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *defaults` keys, resolved like PyYAML does
STR_TAG = "tag:yaml.org,2002:str"
NULL_TAG = "tag:yaml.org,2002:null"
_KINDS = {"MappingNode": "a mapping", "SequenceNode": "a list"}


class YamlProblem(Exception):
    """A YAML text or value that cannot be read, at a 1-based line."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def line_of(node: Any) -> int:
    """The 1-based line where a node starts."""
    return int(node.start_mark.line) + 1


def is_null(node: Any) -> bool:
    """Whether a node is YAML's null (`~`, `null` or nothing after the colon)."""
    return isinstance(node, yaml.ScalarNode) and node.tag == NULL_TAG


def kind_of(node: Any) -> str:
    """A node's shape in words, for messages: `a mapping`, `a list`, `a scalar`."""
    return _KINDS.get(type(node).__name__, "a scalar")


def _syntax_problem(err: yaml.YAMLError, text: str) -> YamlProblem:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    # a ReaderError (e.g. a control character) has no mark, only its character position
    position = int(getattr(err, "position", 0))
    line = int(mark.line) + 1 if mark is not None else text.count("\n", 0, position) + 1
    lines = text.splitlines() or [""]
    line = min(line, len(lines))  # an error at the end of the stream points past the last line
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    message = f"YAML syntax error: {what}" + (f" ({context})" if context else "")
    if "\t" in lines[line - 1]:
        message += "; YAML does not allow tabs for indentation, use spaces"
    else:
        message += "; check the indentation and quoting on this line and the one above"
    return YamlProblem(line, message)


class Tree:
    """A composed YAML document: its root node and the loader that can build values from nodes."""

    def __init__(self, text: str) -> None:
        """Compose `text` into nodes (no values yet).

        Raises:
            YamlProblem: the text is not YAML, or holds several documents.
        """
        try:  # the loader checks for unprintable characters as soon as it is made
            self._loader = yaml.SafeLoader(text)
        except yaml.YAMLError as err:
            raise _syntax_problem(err, text) from err
        try:
            self.root: Any = self._loader.get_single_node()
        except yaml.YAMLError as err:
            self.close()
            raise _syntax_problem(err, text) from err

    def close(self) -> None:
        self._loader.dispose()

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def value(self, node: Any) -> Any:
        """Build the plain Python value of a node (scalars, lists, dicts).

        Raises:
            YamlProblem: the node cannot be built (an unknown tag, an unhashable key).
        """
        try:
            return self._loader.construct_object(node, deep=True)
        except yaml.YAMLError as err:
            # a failed build leaves its node marked as in progress; clear it so later values work
            self._loader.recursive_objects = {}
            mark = getattr(err, "problem_mark", None) or node.start_mark
            problem = getattr(err, "problem", None) or err
            raise YamlProblem(int(mark.line) + 1, f"cannot read value: {problem}") from err


def pairs(mapping: Any) -> list[tuple[Any, Any]]:
    """A mapping's (key, value) nodes with `<<` merges resolved; the first of duplicate keys wins.

    Duplicates are reported separately by `duplicate_keys`; own keys beat merged ones, and earlier
    merges beat later ones, as the YAML merge-key spec says.
    """
    own: list[tuple[Any, Any]] = []
    merged: list[tuple[Any, Any]] = []
    for key, value in mapping.value:
        if key.tag != MERGE_TAG:
            own.append((key, value))
            continue
        sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
        for source in sources:
            if isinstance(source, yaml.MappingNode):
                merged.extend(pairs(source))
    seen: set[str] = set()
    result: list[tuple[Any, Any]] = []
    for key, value in own + merged:
        name = key_text(key)
        if name is not None and name in seen:
            continue
        if name is not None:
            seen.add(name)
        result.append((key, value))
    return result


def key_text(key: Any) -> str | None:
    """A key's text as written, or None if the key is itself a list or mapping."""
    return str(key.value) if isinstance(key, yaml.ScalarNode) else None


def _mappings(root: Any) -> Iterator[Any]:
    """Every mapping node in the tree once, even through aliases and recursive anchors."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            yield node
            for key, value in reversed(node.value):
                stack.extend((value, key))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))


def duplicate_keys(root: Any) -> list[tuple[Any, int, Any]]:
    """Every repeated key: (the repeated key node, the first one's line, the mapping holding both).

    PyYAML silently keeps the last of duplicate keys; a recipe must not lose a node that way.
    """
    found: list[tuple[Any, int, Any]] = []
    for mapping in _mappings(root):
        first_line: dict[str, int] = {}
        for key, _ in mapping.value:
            name = key_text(key)
            if name is None or key.tag == MERGE_TAG:
                continue
            if name in first_line:
                found.append((key, first_line[name], mapping))
            else:
                first_line[name] = line_of(key)
    return found
