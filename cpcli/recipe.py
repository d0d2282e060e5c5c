"""Recipes: YAML text to frozen Recipe/NodeSpec/Edge, validated completely with file:line problems."""

from __future__ import annotations

import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cpcli._recipecheck import (
    DEFAULT_TOLERANCE_MS,
    ID_PATTERN,
    NAME_PATTERN,
    NODE_KEYS,
    SYNC_POLICIES,
    TOP_KEYS,
    Checker,
)
from cpcli._yamltree import Tree, YamlProblem
from cpcli.errors import RecipeError
from cpcli.registry import Registry

__all__ = [
    "DEFAULT_TOLERANCE_MS",
    "ID_PATTERN",
    "NAME_PATTERN",
    "NODE_KEYS",
    "SYNC_POLICIES",
    "TOP_KEYS",
    "Edge",
    "NodeSpec",
    "Recipe",
    "load_recipe",
    "parse_recipe",
]


@dataclass(frozen=True)
class Edge:
    """One subscription: `target` reads `source`'s output `port` under the input name `key`."""

    source: str
    port: str
    target: str
    key: str  # the input as written ("cam" or "cam.video"): the key in the target's step() inputs


@dataclass(frozen=True)
class NodeSpec:
    """One node of a recipe, validated; `params` is a read-only mapping of plain YAML data."""

    id: str
    type: str
    params: Mapping[str, Any]
    worker: str | None
    record: bool
    inputs: tuple[str, ...]
    sync: str
    tolerance_ms: float
    line: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", types.MappingProxyType(dict(self.params)))

    def __reduce__(self) -> tuple[Any, ...]:
        # a mappingproxy cannot be pickled, and node specs travel to spawned processes
        values = [dict(self.params) if f.name == "params" else getattr(self, f.name) for f in fields(self)]
        return (NodeSpec, tuple(values))


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: its nodes in file order and the edges between them."""

    name: str
    description: str
    nodes: tuple[NodeSpec, ...]
    edges: tuple[Edge, ...]
    source: str = "<recipe>"
    text: str = ""
    on_worker_lost: str = "continue"  # a cluster session whose worker is lost: "continue" or "stop"
    encrypt_data: bool = True  # node data between machines: Curve-encrypted, or (False) members only, in the clear

    def node(self, node_id: str) -> NodeSpec:
        """The node with this id.

        Raises:
            KeyError: the recipe has no such node.
        """
        for spec in self.nodes:
            if spec.id == node_id:
                return spec
        ids = ", ".join(spec.id for spec in self.nodes)
        raise KeyError(f"recipe {self.name} has no node {node_id!r} (nodes: {ids})")


def _recipe(checker: Checker, text: str, source: str) -> Recipe:
    """The frozen recipe from a checker that found no problems."""
    specs = tuple(
        NodeSpec(
            id=d.id,
            type=d.type,
            params=d.params,
            worker=d.worker,
            record=d.record,
            inputs=tuple(text for text, _ in d.inputs),
            sync=d.sync,
            tolerance_ms=d.tolerance_ms,
            line=d.line,
        )
        for d in checker.drafts
    )
    edges = tuple(Edge(*edge) for edge in checker.edges)
    return Recipe(checker.name, checker.description, specs, edges, source, text, checker.on_worker_lost,
                  checker.encrypt_data)


def parse_recipe(text: str, registry: Registry, source: str = "<recipe>") -> Recipe:
    """Read and validate a recipe completely.

    Raises:
        RecipeError: with `problems`, every problem found, each `source:line: what; hint`.
    """
    try:
        tree = Tree(text)
    except YamlProblem as problem:  # nothing else can be checked in text that is not YAML
        raise RecipeError(f"{source}: 1 problem(s)", problems=[f"{source}:{problem.line}: {problem.message}"]) from None
    with tree:
        checker = Checker(tree, registry)
        checker.check(tree.root)
    if checker.problems:
        lines = [f"{source}:{line}: {message}" for line, message in sorted(checker.problems, key=lambda p: p[0])]
        raise RecipeError(f"{source}: {len(lines)} problem(s)", problems=lines)
    return _recipe(checker, text, source)


def load_recipe(path: str | Path, registry: Registry) -> Recipe:
    """Read a recipe file and validate it completely.

    Raises:
        RecipeError: the file cannot be read as UTF-8 text, or the recipe has problems.
    """
    where = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        problem = f"{where}: no such recipe file; check the path (relative paths start at {os.getcwd()})"
    except IsADirectoryError:
        problem = f"{where}: is a folder; give the recipe's .yaml file"
    except PermissionError:
        problem = f"{where}: cannot be read (permission denied); check the file's permissions"
    except OSError as err:
        problem = f"{where}: cannot be read ({err.strerror or err}); check the path"
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            problem = f"{where}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the recipe as UTF-8"
        else:
            return parse_recipe(text, registry, source=where)
    raise RecipeError(f"{where}: 1 problem(s)", problems=[problem])
