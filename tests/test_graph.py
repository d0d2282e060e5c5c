"""Tests for cpcli.graph: cycles, topological order and neighbours on plain ids and built recipes."""

from __future__ import annotations

import pytest

from cpcli.errors import GraphError
from cpcli.graph import downstream, find_cycle, format_cycle, sources, topological_order, upstream
from cpcli.recipe import Edge, NodeSpec, Recipe


def make_recipe(ids: list[str], links: list[tuple[str, str]]) -> Recipe:
    """A recipe built by hand (no validation), with one `out` port per node."""
    nodes = tuple(
        NodeSpec(
            id=node_id,
            type="t",
            params={},
            worker=None,
            record=False,
            inputs=tuple(s for s, t in links if t == node_id),
            sync="latest",
            tolerance_ms=20.0,
            line=i + 3,
        )
        for i, node_id in enumerate(ids)
    )
    edges = tuple(Edge(source=s, port="out", target=t, key=s) for s, t in links)
    return Recipe(name="hand", description="", nodes=nodes, edges=edges)


def test_dag_has_no_cycle() -> None:
    assert find_cycle(["a", "b", "c", "d"], [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]) is None


def test_self_loop_is_a_cycle_of_one() -> None:
    assert find_cycle(["a", "b"], [("a", "b"), ("b", "b")]) == ["b", "b"]


def test_cycle_starts_at_the_first_node_in_id_order() -> None:
    edges = [("x", "c"), ("c", "a"), ("a", "b"), ("b", "c")]
    assert find_cycle(["x", "a", "b", "c"], edges) == ["a", "b", "c", "a"]
    assert find_cycle(["x", "c", "b", "a"], edges) == ["c", "a", "b", "c"]


def test_cycle_follows_data_flow_direction() -> None:
    assert find_cycle(["a", "b", "c"], [("a", "b"), ("b", "c"), ("c", "a")]) == ["a", "b", "c", "a"]


def test_find_cycle_accepts_edge_objects() -> None:
    edges = [Edge("a", "out", "b", "a"), Edge("b", "out", "a", "b")]
    assert find_cycle(["a", "b"], edges) == ["a", "b", "a"]


def test_find_cycle_sees_nodes_only_named_by_edges() -> None:
    assert find_cycle([], [("p", "q"), ("q", "p")]) == ["p", "q", "p"]


def test_long_chain_does_not_hit_the_recursion_limit() -> None:
    ids = [f"n{i}" for i in range(5000)]
    chain = list(zip(ids, ids[1:], strict=False))
    assert find_cycle(ids, chain) is None
    assert find_cycle(ids, [*chain, (ids[-1], ids[0])]) == [*ids, ids[0]]


def test_format_cycle_joins_with_arrows() -> None:
    assert format_cycle(["a", "b", "a"]) == "cycle: a -> b -> a"


def test_topological_order_puts_sources_first_in_file_order() -> None:
    recipe = make_recipe(["gray", "cam", "level", "mic"], [("cam", "gray"), ("mic", "level")])
    assert topological_order(recipe) == ["cam", "mic", "gray", "level"]


def test_topological_order_places_a_node_after_its_deepest_input() -> None:
    recipe = make_recipe(["mix", "a", "b", "c"], [("a", "b"), ("b", "mix"), ("c", "mix")])
    assert topological_order(recipe) == ["a", "c", "b", "mix"]


def test_topological_order_counts_two_ports_between_the_same_nodes() -> None:
    recipe = make_recipe(["cam", "mix"], [("cam", "mix"), ("cam", "mix")])
    assert topological_order(recipe) == ["cam", "mix"]


def test_topological_order_of_a_cycle_raises_graph_error_naming_it() -> None:
    recipe = make_recipe(["src", "a", "b"], [("src", "a"), ("a", "b"), ("b", "a")])
    with pytest.raises(GraphError, match=r"cycle: a -> b -> a"):
        topological_order(recipe)


def test_downstream_and_upstream_list_edges_in_recipe_order() -> None:
    recipe = make_recipe(
        ["cam", "gray", "motion", "mix"],
        [("cam", "gray"), ("cam", "motion"), ("gray", "mix"), ("motion", "mix")],
    )
    assert [e.target for e in downstream(recipe, "cam")] == ["gray", "motion"]
    assert [e.source for e in upstream(recipe, "mix")] == ["gray", "motion"]
    assert downstream(recipe, "mix") == [] and upstream(recipe, "cam") == []


def test_neighbours_of_an_unknown_node_raise_key_error() -> None:
    recipe = make_recipe(["cam"], [])
    with pytest.raises(KeyError, match="no node 'nope'"):
        downstream(recipe, "nope")
    with pytest.raises(KeyError):
        upstream(recipe, "nope")


def test_sources_are_nodes_without_inputs_in_file_order() -> None:
    recipe = make_recipe(["gray", "mic", "cam"], [("cam", "gray")])
    assert sources(recipe) == ["mic", "cam"]
