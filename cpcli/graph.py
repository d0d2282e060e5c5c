"""DAG checks on a recipe's nodes and edges: cycles, topological order, neighbours."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from cpcli.errors import GraphError

if TYPE_CHECKING:  # recipe.py imports this module; only its types are needed here
    from cpcli.recipe import Edge, Recipe


class EdgeLike(Protocol):
    """Anything with a `source` and a `target` node id, such as `cpcli.recipe.Edge`."""

    @property
    def source(self) -> str: ...

    @property
    def target(self) -> str: ...


EdgeArg = EdgeLike | tuple[str, str]
"""An edge as an object with `source`/`target`, or a plain `(source, target)` pair."""


def _pair(edge: EdgeArg) -> tuple[str, str]:
    if isinstance(edge, tuple):
        return edge
    return edge.source, edge.target


def format_cycle(cycle: list[str]) -> str:
    """A cycle in words: `cycle: a -> b -> a`."""
    return "cycle: " + " -> ".join(cycle)


def find_cycle(node_ids: Iterable[str], edges: Iterable[EdgeArg]) -> list[str] | None:
    """One cycle along the data flow, first node repeated at the end, or None for a DAG.

    A self loop on `a` gives `["a", "a"]`; a cycle is rotated to start at the node that comes
    first in `node_ids`, so the answer does not depend on where the search happened to enter it.
    """
    order = list(dict.fromkeys(node_ids))
    successors: dict[str, list[str]] = {}
    for source, target in map(_pair, edges):
        successors.setdefault(source, []).append(target)
        for node in (source, target):
            if node not in order:
                order.append(node)
    rank = {node: i for i, node in enumerate(order)}
    done: set[str] = set()
    for root in order:
        if root in done:
            continue
        path: list[str] = [root]  # the nodes being visited, root first
        on_path = {root}
        branches = [iter(successors.get(root, []))]
        while branches:
            nxt = next(branches[-1], None)
            if nxt is None:  # every successor of path[-1] is explored and cycle-free
                branches.pop()
                done.add(path[-1])
                on_path.discard(path.pop())
            elif nxt in on_path:
                loop = path[path.index(nxt) :]
                start = min(range(len(loop)), key=lambda i: rank[loop[i]])
                loop = loop[start:] + loop[:start]
                return loop + [loop[0]]
            elif nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                branches.append(iter(successors.get(nxt, [])))
    return None


def _ids(recipe: Recipe) -> list[str]:
    return [spec.id for spec in recipe.nodes]


def topological_order(recipe: Recipe) -> list[str]:
    """Node ids so that every node comes after all of its inputs.

    Sources come first, then each node at its depth (longest path from a source); nodes at the
    same depth keep their file order, so start-up and shutdown order are predictable.

    Raises:
        GraphError: the recipe has a cycle (only possible if it was built without validation).
    """
    ids = _ids(recipe)
    pairs = [_pair(edge) for edge in recipe.edges]
    waiting = {node: 0 for node in ids}  # inputs not yet placed, per node
    for _, target in pairs:
        waiting[target] += 1
    depth = {node: 0 for node in ids}
    ready = [node for node in ids if waiting[node] == 0]
    placed = 0
    while placed < len(ready):  # Kahn's algorithm; `ready` doubles as the queue
        node = ready[placed]
        placed += 1
        for source, target in pairs:
            if source == node:
                depth[target] = max(depth[target], depth[node] + 1)
                waiting[target] -= 1
                if waiting[target] == 0:
                    ready.append(target)
    if placed < len(ids):
        cycle = find_cycle(ids, pairs) or []
        raise GraphError(f"recipe {recipe.name}: {format_cycle(cycle)}", hint="remove one of these inputs")
    position = {node: i for i, node in enumerate(ids)}
    return sorted(ids, key=lambda node: (depth[node], position[node]))


def _check(recipe: Recipe, node_id: str) -> None:
    if node_id not in _ids(recipe):
        raise KeyError(f"recipe {recipe.name} has no node {node_id!r} (nodes: {', '.join(_ids(recipe))})")


def downstream(recipe: Recipe, node_id: str) -> list[Edge]:
    """The edges leaving a node (its subscribers), in recipe order.

    Raises:
        KeyError: the recipe has no such node.
    """
    _check(recipe, node_id)
    return [edge for edge in recipe.edges if edge.source == node_id]


def upstream(recipe: Recipe, node_id: str) -> list[Edge]:
    """The edges entering a node (its subscriptions), in the order of its `inputs:`.

    Raises:
        KeyError: the recipe has no such node.
    """
    _check(recipe, node_id)
    return [edge for edge in recipe.edges if edge.target == node_id]


def sources(recipe: Recipe) -> list[str]:
    """The ids of nodes with no inputs, in file order."""
    targets = {edge.target for edge in recipe.edges}
    return [node for node in _ids(recipe) if node not in targets]
