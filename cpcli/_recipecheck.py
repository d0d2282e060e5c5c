"""Reading a recipe's YAML tree into node drafts and edges, recording every problem with its line."""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

from cpcli._nodecheck import Draft, check_params, check_wiring, did_you_mean, show
from cpcli._yamltree import (
    STR_TAG,
    Tree,
    YamlProblem,
    duplicate_keys,
    is_null,
    key_text,
    kind_of,
    line_of,
    pairs,
)
from cpcli.registry import Registry

SYNC_POLICIES = ("latest", "all", "aligned")
DEFAULT_TOLERANCE_MS = 20.0  # one frame period at 50 fps: samples this close show the same moment
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # the name is part of the session folder name
ID_PATTERN = re.compile(r"[a-z][a-z0-9_]*")  # ids become archive folder names and `<id>/<port>` topics
TOP_KEYS = ("name", "description", "on_worker_lost", "encrypt_data", "nodes")
ON_WORKER_LOST = ("continue", "stop")  # a cluster session whose worker is lost: go on without it, or end
NODE_KEYS = ("type", "worker", "params", "record", "inputs", "sync", "tolerance_ms")
_BAD: Any = object()  # a value that could not be read; its problem is already recorded


def _id_problem(node_id: str) -> str | None:
    """Why a node id cannot be a folder name and topic, or None if it can."""
    if ID_PATTERN.fullmatch(node_id):
        return None
    reasons = []
    if "/" in node_id or "\\" in node_id:
        reasons.append("no slashes")
    if "." in node_id:
        reasons.append("no dots: '.' separates a node from its port, as in cam.video")
    if any(c.isspace() for c in node_id):
        reasons.append("no spaces")
    if any(c.isupper() for c in node_id):
        reasons.append("no capitals")
    if "-" in node_id:
        reasons.append("'_' instead of '-'")
    if not node_id[:1].isascii() or not node_id[:1].isalpha():
        reasons.append("start with a letter")
    if not reasons:
        reasons.append("only a-z, 0-9 and _")
    fixed = re.sub(r"[^a-z0-9]+", "_", node_id.lower()).strip("_")
    fixed = fixed if ID_PATTERN.fullmatch(fixed) else f"node_{fixed}".rstrip("_")
    return (
        f"node id {node_id!r} must be lower_snake ({'; '.join(reasons)}), because ids become "
        f"folder and topic names; try {fixed!r}"
    )


class Checker:
    """Reads a recipe's node tree, recording every problem instead of stopping at the first."""

    def __init__(self, tree: Tree, registry: Registry) -> None:
        self.tree = tree
        self.registry = registry
        self.problems: list[tuple[int, str]] = []
        self.name = ""
        self.description = ""
        self.on_worker_lost = "continue"
        self.encrypt_data = True  # node data between machines encrypted unless the recipe opts out
        self.drafts: list[Draft] = []
        self.edges: list[tuple[str, str, str, str]] = []  # (source, port, target, key)

    def add(self, line: int, message: str) -> None:
        self.problems.append((line, message))

    def value(self, node: Any, where: str = "") -> Any:
        """A node's value, or _BAD after recording why it cannot be read."""
        try:
            return self.tree.value(node)
        except YamlProblem as problem:
            self.add(problem.line, where + problem.message)
            return _BAD

    def unknown_key(self, key: Any, where: str, allowed: tuple[str, ...]) -> None:
        word = key_text(key) or ""
        self.add(
            line_of(key),
            f"{where}unknown key {word!r}{did_you_mean(word, list(allowed))} (allowed: {', '.join(allowed)})",
        )

    def check(self, root: Any) -> None:
        if root is None:
            self.add(1, "the recipe is empty; it needs at least name: and nodes:")
            return
        if not isinstance(root, yaml.MappingNode):
            self.add(line_of(root), f"a recipe is a mapping with name: and nodes:, got {kind_of(root)}")
            return
        given: dict[str | None, tuple[Any, Any]] = {}
        for key, value in pairs(root):
            given[key_text(key)] = (key, value)
            if key_text(key) not in TOP_KEYS:
                self.unknown_key(key, "", TOP_KEYS)
        self.check_name(given.get("name"))
        if "on_worker_lost" in given:
            policy = self.value(given["on_worker_lost"][1])
            if policy in ON_WORKER_LOST:
                self.on_worker_lost = str(policy)
            elif policy is not _BAD:
                self.add(line_of(given["on_worker_lost"][1]),
                         f"on_worker_lost must be {' or '.join(ON_WORKER_LOST)}, got {show(policy)}")
        if "encrypt_data" in given:
            encrypt = self.value(given["encrypt_data"][1])
            if isinstance(encrypt, bool):
                self.encrypt_data = encrypt
            elif encrypt is not _BAD:
                self.add(line_of(given["encrypt_data"][1]), f"encrypt_data must be true or false, got {show(encrypt)}")
        if "description" in given:
            description = self.value(given["description"][1])
            if isinstance(description, str) or description is None:
                self.description = description or ""
            elif description is not _BAD:
                self.add(line_of(given["description"][1]), f"description must be text, got {show(description)}")
        nodes = given["nodes"][1] if "nodes" in given else None
        for key, first_line, mapping in duplicate_keys(root):
            what = "node id" if mapping is nodes else "key"
            self.add(
                line_of(key),
                f"duplicate {what} {key_text(key)!r} (first at line {first_line}); "
                f"YAML would silently keep only the last one, so rename or remove one",
            )
        self.check_nodes(given.get("nodes"))

    def check_name(self, entry: tuple[Any, Any] | None) -> None:
        if entry is None:
            self.add(1, "missing 'name'; add a line like `name: my-study` at the top")
            return
        name = self.value(entry[1])
        if name is _BAD:
            return
        if not isinstance(name, str):
            self.add(line_of(entry[1]), f'name must be text, got {show(name)}; quote it: name: "{name}"')
        elif not NAME_PATTERN.fullmatch(name):
            fixed = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-._") or "my-study"
            self.add(
                line_of(entry[1]),
                f"name {name!r} must be letters, digits, '_', '.' or '-' and start with a letter or digit, "
                f"because it becomes part of the session folder name; try {fixed!r}",
            )
        else:
            self.name = name

    def check_nodes(self, entry: tuple[Any, Any] | None) -> None:
        if entry is None:
            self.add(1, "missing 'nodes'; add `nodes:` with at least one node (id: {type: ...})")
            return
        key, nodes = entry
        if isinstance(nodes, yaml.SequenceNode):
            self.add(
                line_of(nodes),
                "nodes must be a mapping of node id to node, got a list; drop the '-' before each id",
            )
        elif not isinstance(nodes, yaml.MappingNode):
            if not is_null(nodes):
                self.add(line_of(nodes), f"nodes must be a mapping of node id to node, got {kind_of(nodes)}")
            else:
                self.add(line_of(key), "nodes is empty; add at least one node (id: {type: ...})")
        elif not nodes.value:
            self.add(line_of(key), "nodes is empty; add at least one node (id: {type: ...})")
        else:
            for id_key, body in pairs(nodes):
                self.check_node(id_key, body)
            self.edges = check_wiring(self.drafts, self.problems)

    def check_node(self, id_key: Any, body: Any) -> None:
        node_id = key_text(id_key)
        if node_id is None:
            self.add(line_of(id_key), f"node ids must be plain names, got {kind_of(id_key)}")
            return
        problem = _id_problem(node_id)
        if problem:
            self.add(line_of(id_key), problem)
        elif id_key.tag != STR_TAG:
            self.add(line_of(id_key), f"node id {node_id!r} reads as a non-string in YAML; quote it or rename it")
        draft = Draft(node_id, line_of(id_key), params_line=line_of(id_key), tolerance_ms=DEFAULT_TOLERANCE_MS)
        self.drafts.append(draft)
        where = draft.where
        if not isinstance(body, yaml.MappingNode):
            got = self.value(body, where) if isinstance(body, yaml.ScalarNode) else None
            hint = f"; write `{node_id}: {{type: {got}}}`" if isinstance(got, str) else ""
            shown = show(got) if isinstance(body, yaml.ScalarNode) else kind_of(body)
            self.add(line_of(body), f"{where}expected a mapping with at least type:, got {shown}{hint}")
            return
        given: dict[str, tuple[Any, Any]] = {}
        unknown = []
        for key, value in pairs(body):
            if key_text(key) in NODE_KEYS:
                given[str(key_text(key))] = (key, value)
            else:
                unknown.append(key)
        self.check_type(draft, given.get("type"))
        param_names = [p.name for p in draft.node_type.params] if draft.node_type else []
        for key in unknown:
            if key_text(key) in param_names:
                self.add(line_of(key), f"{where}{key_text(key)!r} is a param; put it under params:")
            else:
                self.unknown_key(key, where, NODE_KEYS)
        self.check_fields(draft, given)
        if "inputs" in given:
            self.read_inputs(draft, *given["inputs"])
        self.read_params(draft, given.get("params"))
        check_params(draft, self.problems)

    def check_type(self, draft: Draft, entry: tuple[Any, Any] | None) -> None:
        where = draft.where
        installed = ", ".join(self.registry.types) or "none; is cpcli installed with its nodes?"
        if entry is None:
            self.add(draft.line, f"{where}missing 'type' (installed: {installed})")
            return
        name = self.value(entry[1], where)
        line = line_of(entry[1])
        if name is _BAD:
            return
        if not isinstance(name, str) or not name:
            self.add(line, f"{where}type must be a node type name, got {show(name)} (installed: {installed})")
            return
        draft.type = name
        draft.node_type = self.registry.get(name)
        if draft.node_type is not None:
            return
        if name in self.registry.broken:
            self.add(
                line,
                f"{where}node type {name!r} is installed but its plugin failed to load "
                f"({self.registry.broken[name]}); fix or reinstall that plugin",
            )
            return
        hint = did_you_mean(name, [*self.registry.types, *self.registry.broken])
        self.add(line, f"{where}unknown node type {name!r}{hint or f' (installed: {installed})'}")

    def check_fields(self, draft: Draft, given: dict[str, tuple[Any, Any]]) -> None:
        where = draft.where
        scalars = ("worker", "record", "sync", "tolerance_ms")
        values = {
            name: (line_of(given[name][1]), self.value(given[name][1], where)) for name in scalars if name in given
        }
        line, worker = values.get("worker", (0, None))
        if isinstance(worker, str) and worker:
            draft.worker = worker
        elif worker is not None and worker is not _BAD:
            hint = f'; quote it: worker: "{worker}"' if isinstance(worker, (int, float)) else ""
            self.add(line, f"{where}worker must be a worker name, got {show(worker)}{hint}")
        line, record = values.get("record", (0, None))
        if isinstance(record, bool):
            draft.record = record
        elif record is not None and record is not _BAD:
            self.add(line, f"{where}record must be true or false, got {show(record)}")
        line, sync = values.get("sync", (0, None))
        if sync in SYNC_POLICIES:
            draft.sync = sync
        elif sync is not None and sync is not _BAD:
            hint = did_you_mean(sync, list(SYNC_POLICIES)) if isinstance(sync, str) else ""
            self.add(line, f"{where}sync must be one of {', '.join(SYNC_POLICIES)}, got {show(sync)}{hint}")
        line, tolerance = values.get("tolerance_ms", (0, None))
        number = isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool)
        if number and math.isfinite(tolerance) and tolerance > 0:
            draft.tolerance_ms = float(tolerance)
            if draft.sync != "aligned" and (sync in SYNC_POLICIES or sync is None):
                why = f"only applies with sync: aligned (this node's sync is {draft.sync})"
                self.add(line, f"{where}tolerance_ms {why}; remove it or set sync: aligned")
        elif tolerance is not None and tolerance is not _BAD:
            self.add(line, f"{where}tolerance_ms must be a positive number of milliseconds, got {show(tolerance)}")

    def read_inputs(self, draft: Draft, key: Any, node: Any) -> None:
        where = draft.where
        draft.inputs_line = line_of(key)
        if isinstance(node, yaml.MappingNode):
            self.add(line_of(node), f"{where}inputs must be a list of node ids, e.g. inputs: [cam, mic]")
            draft.inputs_ok = False
            return
        for item in node.value if isinstance(node, yaml.SequenceNode) else [node]:
            text = self.value(item, where)
            if isinstance(text, str):
                draft.inputs.append((text, line_of(item)))
            elif not (text is None and item is node):  # `inputs:` with nothing after it is no inputs
                draft.inputs_ok = False
                if text is not _BAD:
                    got = f"got {show(text)}"
                    self.add(line_of(item), f"{where}inputs must be node ids (`cam` or `cam.video`), {got}")

    def read_params(self, draft: Draft, entry: tuple[Any, Any] | None) -> None:
        if entry is None or is_null(entry[1]):
            return
        draft.params_line = line_of(entry[0])
        if not isinstance(entry[1], yaml.MappingNode):
            got = f"got {kind_of(entry[1])}"
            self.add(line_of(entry[1]), f"{draft.where}params must be a mapping like {{fps: 30}}, {got}")
            draft.params_ok = False
            return
        for key, value in pairs(entry[1]):
            name, got = key_text(key), self.value(value, draft.where)
            if name is None:
                self.add(line_of(key), f"{draft.where}param names must be plain words")
            if name is None or got is _BAD:
                draft.params_ok = False
            else:
                draft.params[name], draft.param_lines[name] = got, line_of(key)
