"""Tests for cpcli.recipe: recipes on YAML strings, against a registry of node classes built here."""

from __future__ import annotations

import copy
import pickle
import re
import textwrap
from pathlib import Path
from typing import Any, Literal

import pytest

from cpcli.errors import NodeConfigError, RecipeError
from cpcli.node import Inputs, Node, Outputs
from cpcli.recipe import SYNC_POLICIES, Edge, NodeSpec, Recipe, load_recipe, parse_recipe
from cpcli.registry import Registry, describe


class SyntheticVideo(Node):
    """A source of frames."""

    outputs = ("video",)
    input_count = 0

    def __init__(self, *, width: int = 640, height: int = 480, fps: float = 30.0) -> None:
        if fps <= 0:
            raise NodeConfigError(f"fps must be above 0, got {fps}")
        self.rate_hz = fps

    def step(self, inputs: Inputs) -> Outputs:
        return None


class Camera(Node):
    """A source with two outputs and a required param."""

    outputs = ("video", "audio")
    input_count = 0

    def __init__(self, *, device: int, mode: Literal["rgb", "gray"] = "rgb") -> None:
        self.device = device


class Grayscale(Node):
    """Exactly one input, no params."""

    outputs = ("out",)
    input_count = 1


class Mixer(Node):
    """Any number of inputs; its own check raises a foreign error."""

    outputs = ("out",)

    def __init__(self, *, gain: float = 1.0, labels: list[str] | None = None) -> None:
        if gain > 10:
            raise ValueError("gain above 10 clips")


class Pair(Node):
    """Exactly two inputs."""

    input_count = 2


class Sink(Node):
    """Has no outputs to read."""

    outputs = ()


class Flexible(Node):
    """Takes any keyword: its own params beyond the signature are its business."""

    def __init__(self, *, rate: float = 1.0, **extra: Any) -> None:
        self.extra = extra


@pytest.fixture
def registry() -> Registry:
    classes: dict[str, type[Node]] = {
        "test_video": SyntheticVideo,
        "camera": Camera,
        "grayscale": Grayscale,
        "mixer": Mixer,
        "pair": Pair,
        "sink": Sink,
        "flexible": Flexible,
    }
    return Registry(
        types={name: describe(name, cls) for name, cls in classes.items()},
        broken={"microphone": "OSError: PortAudio library not found"},
    )


def recipe_text(body: str) -> str:
    return textwrap.dedent(body).lstrip("\n")


def problems_of(body: str, registry: Registry, source: str = "demo.yaml") -> list[str]:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(recipe_text(body), registry, source=source)
    assert caught.value.message == f"{source}: {len(caught.value.problems)} problem(s)"
    return caught.value.problems


def only_problem(body: str, registry: Registry) -> str:
    problems = problems_of(body, registry)
    assert len(problems) == 1, problems
    return problems[0]


VALID = """
    name: webcam-and-mic
    description: two streams
    nodes:
      cam:
        type: camera
        worker: lab-02
        params: {device: 0, mode: gray}
        record: true
      video:
        type: test_video
        params:
          width: 320
          fps: 15
      gray:
        type: grayscale
        inputs: [cam.video]
      mix:
        type: mixer
        inputs: [video, cam.audio]
        sync: aligned
        tolerance_ms: 5
"""


# --- a valid recipe ---------------------------------------------------------------------------


def test_valid_recipe_yields_node_specs_in_file_order(registry: Registry) -> None:
    recipe = parse_recipe(recipe_text(VALID), registry, source="demo.yaml")
    assert recipe.name == "webcam-and-mic"
    assert recipe.description == "two streams"
    assert [n.id for n in recipe.nodes] == ["cam", "video", "gray", "mix"]
    assert recipe.node("cam") == NodeSpec(
        id="cam",
        type="camera",
        params={"device": 0, "mode": "gray"},
        worker="lab-02",
        record=True,
        inputs=(),
        sync="latest",
        tolerance_ms=20.0,
        line=4,
    )
    mix = recipe.node("mix")
    assert (mix.inputs, mix.sync, mix.tolerance_ms, mix.line) == (("video", "cam.audio"), "aligned", 5.0, 17)


def test_valid_recipe_yields_edges_with_resolved_ports_and_written_keys(registry: Registry) -> None:
    recipe = parse_recipe(recipe_text(VALID), registry)
    assert recipe.edges == (
        Edge(source="cam", port="video", target="gray", key="cam.video"),
        Edge(source="video", port="video", target="mix", key="video"),
        Edge(source="cam", port="audio", target="mix", key="cam.audio"),
    )


def test_node_defaults_are_latest_sync_no_record_no_worker_no_params(registry: Registry) -> None:
    recipe = parse_recipe("name: r\nnodes:\n  v: {type: test_video}\n", registry)
    spec = recipe.node("v")
    assert (spec.params, spec.worker, spec.record, spec.sync, spec.tolerance_ms) == (
        {},
        None,
        False,
        "latest",
        20.0,
    )
    assert recipe.description == ""
    assert SYNC_POLICIES == ("latest", "all", "aligned")


def test_recipe_keeps_exact_text_and_source(registry: Registry) -> None:
    text = recipe_text(VALID) + "# trailing comment\n"
    recipe = parse_recipe(text, registry, source="studies/demo.yaml")
    assert recipe.text == text
    assert recipe.source == "studies/demo.yaml"
    assert parse_recipe(text, registry).source == "<recipe>"


def test_single_string_input_is_accepted(registry: Registry) -> None:
    recipe = parse_recipe("name: r\nnodes:\n  v: {type: test_video}\n  g: {type: grayscale, inputs: v}\n", registry)
    assert recipe.node("g").inputs == ("v",)
    assert recipe.edges == (Edge("v", "video", "g", "v"),)


def test_empty_params_and_inputs_values_mean_none_given(registry: Registry) -> None:
    recipe = parse_recipe("name: r\nnodes:\n  v:\n    type: test_video\n    params:\n    inputs:\n", registry)
    assert recipe.node("v").params == {}
    assert recipe.node("v").inputs == ()


def test_params_are_read_only_yet_pickle_and_copy(registry: Registry) -> None:
    recipe = parse_recipe(recipe_text(VALID), registry)
    with pytest.raises(TypeError):
        recipe.node("cam").params["device"] = 3  # type: ignore[index]
    assert pickle.loads(pickle.dumps(recipe)) == recipe
    assert copy.deepcopy(recipe) == recipe
    assert dict(pickle.loads(pickle.dumps(recipe.node("cam"))).params) == {"device": 0, "mode": "gray"}


def test_recipe_node_lookup_of_unknown_id_names_the_ids(registry: Registry) -> None:
    recipe = parse_recipe(recipe_text(VALID), registry)
    with pytest.raises(KeyError, match="cam, video, gray, mix"):
        recipe.node("nope")


def test_merge_keys_fill_in_node_fields(registry: Registry) -> None:
    recipe = parse_recipe(
        recipe_text("""
            name: r
            nodes:
              a: &video {type: test_video, params: {fps: 10}, record: true}
              b:
                <<: *video
                params: {fps: 20}
        """),
        registry,
    )
    assert (recipe.node("b").type, recipe.node("b").record, recipe.node("b").params) == (
        "test_video",
        True,
        {"fps": 20},
    )


def test_node_with_extra_keywords_accepts_params_outside_its_signature(registry: Registry) -> None:
    recipe = parse_recipe(
        "name: r\nnodes:\n  f: {type: flexible, params: {anything: 1}, inputs: [f2]}\n  f2: {type: test_video}\n",
        registry,
    )
    assert recipe.node("f").params == {"anything": 1}


# --- every problem at once, each with file:line ----------------------------------------------


def test_several_problems_are_all_listed_in_line_order(registry: Registry) -> None:
    problems = problems_of(
        """
        name: demo
        nodes:
          cam:
            type: test_video
            params: {fpss: 30}
          gray:
            type: grayscal
          mix:
            type: mixer
            inputs: [cma]
            recrod: true
        """,
        registry,
    )
    assert [p.split(": ", 1)[0] for p in problems] == [
        "demo.yaml:5",
        "demo.yaml:7",
        "demo.yaml:10",
        "demo.yaml:11",
    ]
    assert "unknown param 'fpss' for test_video; did you mean 'fps'? (accepts: width, height, fps)" in problems[0]
    assert "unknown node type 'grayscal'; did you mean 'grayscale'?" in problems[1]
    assert "input 'cma': there is no node 'cma'; did you mean 'cam'?" in problems[2]
    assert "unknown key 'recrod'; did you mean 'record'?" in problems[3]


def test_every_problem_starts_with_file_and_line(registry: Registry) -> None:
    problems = problems_of("name: bad name\nnodes:\n  Cam: {type: nope, params: 3}\nother: 1\n", registry)
    assert len(problems) >= 4
    for problem in problems:
        assert re.match(r"demo\.yaml:\d+: \S", problem), problem


# --- YAML and top level ----------------------------------------------------------------------


def test_yaml_syntax_error_is_the_only_problem_and_has_its_line(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  cam:\n    type: [camera\n  bad: key: here\n", registry)
    assert problem.startswith("demo.yaml:5: YAML syntax error")


def test_tab_indentation_gets_a_hint(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n\tcam: {type: test_video}\n", registry)
    assert problem.startswith("demo.yaml:3: YAML syntax error")
    assert "tabs" in problem


def test_several_yaml_documents_are_a_problem(registry: Registry) -> None:
    assert "YAML syntax error" in only_problem("name: a\n---\nname: b\n", registry)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_recipe_is_a_problem(registry: Registry, text: str) -> None:
    assert only_problem(text, registry) == "demo.yaml:1: the recipe is empty; it needs at least name: and nodes:"


def test_top_level_must_be_a_mapping(registry: Registry) -> None:
    assert "a recipe is a mapping with name: and nodes:, got a list" in only_problem("- cam\n- mic\n", registry)


def test_missing_name_and_nodes_are_both_reported(registry: Registry) -> None:
    problems = problems_of("description: nothing\n", registry)
    assert any("missing 'name'" in p for p in problems)
    assert any("missing 'nodes'" in p for p in problems)


@pytest.mark.parametrize("body", ["nodes:\n", "nodes: {}\n"])
def test_empty_nodes_is_a_problem(registry: Registry, body: str) -> None:
    assert only_problem("name: r\n" + body, registry) == (
        "demo.yaml:2: nodes is empty; add at least one node (id: {type: ...})"
    )


def test_nodes_as_a_list_gets_a_hint(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  - cam:\n      type: test_video\n", registry)
    assert problem.startswith("demo.yaml:3: nodes must be a mapping")
    assert "drop the '-'" in problem


def test_unknown_top_level_key_suggests_the_closest(registry: Registry) -> None:
    problems = problems_of("name: r\nnode:\n  a: {type: test_video}\n", registry)
    assert ("demo.yaml:2: unknown key 'node'; did you mean 'nodes'? "
            "(allowed: name, description, on_worker_lost, encrypt_data, nodes)") in problems


@pytest.mark.parametrize("name", ["my study", "../escape", "-dash-first", "a/b"])
def test_name_must_be_safe_in_a_folder_name(registry: Registry, name: str) -> None:
    problem = only_problem(f"name: '{name}'\nnodes:\n  a: {{type: test_video}}\n", registry)
    assert problem.startswith(f"demo.yaml:1: name {name!r} must be")
    assert "session folder name" in problem


def test_name_that_yaml_reads_as_a_number_must_be_quoted(registry: Registry) -> None:
    assert "name must be text, got int 2024; quote it" in only_problem(
        "name: 2024\nnodes:\n  a: {type: test_video}\n", registry
    )


# --- node keys and ids -----------------------------------------------------------------------


def test_unknown_node_key_suggests_the_closest(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  a:\n    type: test_video\n    param: {fps: 3}\n", registry)
    assert problem.startswith("demo.yaml:5: node a: unknown key 'param'; did you mean 'params'?")
    assert "(allowed: type, worker, params, record, inputs, sync, tolerance_ms)" in problem


def test_param_written_beside_type_is_pointed_under_params(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  a:\n    type: test_video\n    fps: 3\n", registry)
    assert problem == "demo.yaml:5: node a: 'fps' is a param; put it under params:"


def test_missing_type_lists_the_installed_types(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  a:\n    record: true\n", registry)
    assert problem.startswith("demo.yaml:3: node a: missing 'type' (installed: test_video, camera,")


def test_node_given_as_a_bare_type_name_gets_a_hint(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  a: test_video\n", registry)
    assert problem.endswith("write `a: {type: test_video}`")


def test_duplicate_node_id_is_detected_with_both_lines(registry: Registry) -> None:
    problem = only_problem(
        """
        name: r
        nodes:
          cam: {type: test_video}
          mic: {type: test_video}
          cam: {type: test_video, params: {fps: 5}}
        """,
        registry,
    )
    assert problem.startswith("demo.yaml:5: duplicate node id 'cam' (first at line 3)")


def test_duplicate_keys_inside_a_node_and_its_params_are_detected(registry: Registry) -> None:
    problems = problems_of(
        """
        name: r
        nodes:
          cam:
            type: test_video
            params:
              fps: 3
              fps: 4
            type: test_video
        """,
        registry,
    )
    assert problems[0].startswith("demo.yaml:7: duplicate key 'fps' (first at line 6)")
    assert problems[1].startswith("demo.yaml:8: duplicate key 'type' (first at line 4)")
    assert len(problems) == 2


def test_duplicate_top_level_key_is_detected(registry: Registry) -> None:
    problem = only_problem("name: a\nname: b\nnodes:\n  x: {type: test_video}\n", registry)
    assert problem.startswith("demo.yaml:2: duplicate key 'name' (first at line 1)")


@pytest.mark.parametrize(
    ("node_id", "reason"),
    [
        ("Cam", "no capitals"),
        ("my-cam", "'_' instead of '-'"),
        ("'a/b'", "no slashes"),
        ("'..'", "no dots"),
        ("cam.video", "no dots"),
        ("1cam", "start with a letter"),
        ("my cam", "no spaces"),
        ("_cam", "start with a letter"),
    ],
)
def test_node_id_must_be_lower_snake_and_says_why(registry: Registry, node_id: str, reason: str) -> None:
    problem = only_problem(f"name: r\nnodes:\n  {node_id}: {{type: test_video}}\n", registry)
    assert problem.startswith("demo.yaml:3: node id ")
    assert "must be lower_snake" in problem and reason in problem and "folder" in problem


def test_node_id_suggestion_is_itself_valid(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  My-Cam 2: {type: test_video}\n", registry)
    assert problem.endswith("try 'my_cam_2'")


# --- node types ------------------------------------------------------------------------------


def test_unknown_type_suggests_the_closest_registered_name(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  a:\n    type: test_vidoe\n", registry)
    assert problem == "demo.yaml:4: node a: unknown node type 'test_vidoe'; did you mean 'test_video'?"


def test_unknown_type_with_nothing_close_lists_what_is_installed(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  a: {type: lidar}\n", registry)
    assert problem.endswith(
        "unknown node type 'lidar' (installed: test_video, camera, grayscale, mixer, pair, sink, flexible)"
    )


def test_type_whose_plugin_failed_to_load_says_why(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  mic: {type: microphone}\n", registry)
    assert "node type 'microphone' is installed but its plugin failed to load" in problem
    assert "OSError: PortAudio library not found" in problem


# --- inputs ----------------------------------------------------------------------------------


def test_unknown_input_suggests_the_closest_node(registry: Registry) -> None:
    problem = only_problem(
        "name: r\nnodes:\n  video: {type: test_video}\n  g: {type: grayscale, inputs: [vidoe]}\n", registry
    )
    assert problem == "demo.yaml:4: node g: input 'vidoe': there is no node 'vidoe'; did you mean 'video'?"


def test_unknown_input_with_nothing_close_lists_the_nodes(registry: Registry) -> None:
    problem = only_problem(
        "name: r\nnodes:\n  video: {type: test_video}\n  g: {type: grayscale, inputs: [zzz]}\n", registry
    )
    assert problem.endswith("there is no node 'zzz' (nodes: video, g)")


def test_unknown_port_lists_the_ports(registry: Registry) -> None:
    problem = only_problem(
        "name: r\nnodes:\n  cam: {type: camera, params: {device: 0}}\n  g: {type: grayscale, inputs: [cam.vidoe]}\n",
        registry,
    )
    assert problem == (
        "demo.yaml:4: node g: input 'cam.vidoe': cam (camera) has no output 'vidoe'; did you mean 'video'? "
        "(outputs: video, audio)"
    )


def test_bare_id_of_a_node_with_several_outputs_asks_to_name_one(registry: Registry) -> None:
    problem = only_problem(
        "name: r\nnodes:\n  cam: {type: camera, params: {device: 0}}\n  g: {type: grayscale, inputs: [cam]}\n",
        registry,
    )
    assert problem.endswith("cam (camera) has several outputs (video, audio); name one, e.g. 'cam.video'")


def test_input_from_a_node_without_outputs_is_a_problem(registry: Registry) -> None:
    text = (
        "name: r\nnodes:\n  v: {type: test_video}\n  s: {type: sink, inputs: [v]}\n  g: {type: grayscale, inputs: s}\n"
    )
    assert only_problem(text, registry).endswith("input 's': s (sink) has no outputs to read")


def test_input_listed_twice_is_a_problem(registry: Registry) -> None:
    problem = only_problem(
        """
        name: r
        nodes:
          v: {type: test_video}
          m:
            type: mixer
            inputs:
              - v
              - v
        """,
        registry,
    )
    assert problem == "demo.yaml:8: node m: input 'v' is listed twice (first at line 7)"


def test_bare_and_dotted_input_of_the_same_port_repeat_each_other(registry: Registry) -> None:
    problem = only_problem(
        "name: r\nnodes:\n  v: {type: test_video}\n  m: {type: mixer, inputs: [v, v.video]}\n", registry
    )
    assert problem.endswith("input 'v.video' repeats 'v': both read v.video")


def test_source_given_inputs_is_a_problem(registry: Registry) -> None:
    problem = only_problem(
        "name: r\nnodes:\n  a: {type: test_video}\n  b:\n    type: test_video\n    inputs: [a]\n", registry
    )
    assert problem == "demo.yaml:6: node b: test_video is a source and takes no inputs; remove inputs:"


@pytest.mark.parametrize(("inputs", "count"), [("[a, b]", 2), ("[]", 0)])
def test_one_input_node_needs_exactly_one(registry: Registry, inputs: str, count: int) -> None:
    text = (
        "name: r\nnodes:\n  a: {type: test_video}\n  b: {type: test_video}\n"
        f"  g: {{type: grayscale, inputs: {inputs}}}\n"
    )
    assert only_problem(text, registry).endswith(f"node g: grayscale takes exactly 1 input, got {count}")


def test_two_input_node_with_one_says_two(registry: Registry) -> None:
    text = "name: r\nnodes:\n  a: {type: test_video}\n  p: {type: pair, inputs: [a]}\n"
    assert only_problem(text, registry).endswith("node p: pair takes exactly 2 inputs, got 1")


def test_node_that_needs_inputs_without_any_is_a_problem(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  m: {type: mixer}\n", registry)
    assert problem == "demo.yaml:3: node m: mixer needs at least one input; add e.g. inputs: [some_node]"


def test_input_that_is_not_a_string_is_a_problem(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  v: {type: test_video}\n  m: {type: mixer, inputs: [v, 3]}\n", registry)
    assert problem.endswith("inputs must be node ids (`cam` or `cam.video`), got int 3")


def test_bad_input_entry_does_not_also_miscount_the_inputs(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  v: {type: test_video}\n  g: {type: grayscale, inputs: [7]}\n", registry)
    assert problem == "demo.yaml:4: node g: inputs must be node ids (`cam` or `cam.video`), got int 7"


def test_inputs_as_a_mapping_is_a_problem(registry: Registry) -> None:
    problem = only_problem(
        "name: r\nnodes:\n  v: {type: test_video}\n  g: {type: grayscale, inputs: {v: 1}}\n", registry
    )
    assert problem == "demo.yaml:4: node g: inputs must be a list of node ids, e.g. inputs: [cam, mic]"


def test_node_id_that_yaml_reads_as_a_bool_must_be_quoted(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  on: {type: test_video}\n", registry)
    assert problem == "demo.yaml:3: node id 'on' reads as a non-string in YAML; quote it or rename it"


def test_self_loop_is_named_as_a_cycle(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  m:\n    type: mixer\n    inputs: [m]\n", registry)
    assert problem.startswith("demo.yaml:5: cycle: m -> m;")


def test_cycle_of_three_is_named_in_data_flow_order(registry: Registry) -> None:
    problem = only_problem(
        """
        name: r
        nodes:
          a: {type: mixer, inputs: [c]}
          b: {type: mixer, inputs: [a]}
          c: {type: mixer, inputs: [b]}
        """,
        registry,
    )
    assert problem.startswith("demo.yaml:3: cycle: a -> b -> c -> a; ")
    assert "node a's input 'c'" in problem


def test_two_separate_cycles_are_both_named(registry: Registry) -> None:
    text = (
        "name: r\nnodes:\n  a: {type: mixer, inputs: [b]}\n  b: {type: mixer, inputs: [a]}\n"
        "  c: {type: mixer, inputs: [c]}\n"
    )
    problems = problems_of(text, registry)
    assert [p.split("; ")[0] for p in problems] == [
        "demo.yaml:3: cycle: a -> b -> a",
        "demo.yaml:5: cycle: c -> c",
    ]


# --- params ----------------------------------------------------------------------------------


def test_unknown_param_suggests_the_closest_and_lists_accepted(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  cam:\n    type: test_video\n    params:\n      hieght: 3\n", registry)
    assert problem == (
        "demo.yaml:6: node cam: unknown param 'hieght' for test_video; did you mean 'height'? "
        "(accepts: width, height, fps)"
    )


def test_param_for_a_node_without_params_says_so(registry: Registry) -> None:
    text = "name: r\nnodes:\n  v: {type: test_video}\n  g: {type: grayscale, inputs: [v], params: {x: 1}}\n"
    assert only_problem(text, registry).endswith("unknown param 'x' for grayscale (it takes no params)")


def test_missing_required_param_is_named_with_its_type(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  cam:\n    type: camera\n    params: {mode: rgb}\n", registry)
    assert problem == "demo.yaml:5: node cam: missing required param 'device' (int) for camera; add it under params:"


def test_missing_required_param_without_params_points_at_the_node(registry: Registry) -> None:
    assert only_problem("name: r\nnodes:\n  cam: {type: camera}\n", registry).startswith(
        "demo.yaml:3: node cam: missing"
    )


@pytest.mark.parametrize(
    ("param", "expected", "given"),
    [
        ("width: '640'", "int", "str '640'"),
        ("width: true", "int", "bool true"),
        ("width: 6.5", "int", "float 6.5"),
        ("fps: thirty", "float", "str 'thirty'"),
    ],
)
def test_wrong_param_type_names_expected_and_given(registry: Registry, param: str, expected: str, given: str) -> None:
    problem = only_problem(f"name: r\nnodes:\n  v:\n    type: test_video\n    params:\n      {param}\n", registry)
    assert problem.startswith("demo.yaml:6: node v: param ")
    assert problem.endswith(f"of test_video must be {expected}, got {given}")


def test_literal_and_list_params_are_checked(registry: Registry) -> None:
    problems = problems_of(
        "name: r\nnodes:\n  cam: {type: camera, params: {device: 0, mode: sepia}}\n"
        "  m: {type: mixer, inputs: [cam.video], params: {labels: [a, 2]}}\n",
        registry,
    )
    assert "param 'mode' of camera must be Literal['rgb', 'gray'], got str 'sepia'" in problems[0]
    assert "param 'labels' of mixer must be list[str] | None, got a list" in problems[1]


def test_int_is_accepted_for_a_float_param(registry: Registry) -> None:
    assert parse_recipe("name: r\nnodes:\n  v: {type: test_video, params: {fps: 25}}\n", registry).node("v").params == {
        "fps": 25
    }


def test_node_config_error_becomes_a_problem(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  v:\n    type: test_video\n    params: {fps: -1}\n", registry)
    assert problem == "demo.yaml:5: node v: fps must be above 0, got -1"


def test_other_constructor_exception_becomes_a_problem(registry: Registry) -> None:
    text = "name: r\nnodes:\n  v: {type: test_video}\n  m: {type: mixer, inputs: [v], params: {gain: 11}}\n"
    assert only_problem(text, registry) == "demo.yaml:4: node m: mixer(...) raised ValueError: gain above 10 clips"


def test_constructor_is_not_run_when_params_do_not_fit(registry: Registry) -> None:
    # fps -1 would raise NodeConfigError, but the unknown param must be the only thing reported
    problem = only_problem("name: r\nnodes:\n  v: {type: test_video, params: {fps: -1, colour: red}}\n", registry)
    assert "unknown param 'colour'" in problem


def test_params_that_are_not_a_mapping_are_a_problem(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  v:\n    type: test_video\n    params: [fps, 3]\n", registry)
    assert problem == "demo.yaml:5: node v: params must be a mapping like {fps: 30}, got a list"


def test_unreadable_param_value_is_a_problem_at_its_line(registry: Registry) -> None:
    problem = only_problem(
        "name: r\nnodes:\n  v:\n    type: test_video\n    params:\n      fps: !!python/name:os.system\n",
        registry,
    )
    assert problem.startswith("demo.yaml:6: node v: cannot read value: could not determine a constructor")


def test_unreadable_type_is_reported_once(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  v: {type: !!python/name:os.system }\n", registry)
    assert problem.startswith("demo.yaml:3: node v: cannot read value")


def test_control_character_is_a_yaml_problem_at_its_line(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  v: {type: test_video}\x00\n", registry)
    assert problem.startswith("demo.yaml:3: YAML syntax error: unacceptable character #x0000")


def test_recursive_alias_in_params_is_a_problem_not_a_crash(registry: Registry) -> None:
    text = (
        "name: r\nnodes:\n  f:\n    type: flexible\n    inputs: [v]\n    params: {a: &x [*x]}\n"
        "  v: {type: test_video}\n"
    )
    assert only_problem(text, registry).startswith("demo.yaml:6: node f: cannot read value")


# --- record, sync, tolerance, worker ---------------------------------------------------------


def test_record_must_be_a_bool(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  v:\n    type: test_video\n    record: 'yes'\n", registry)
    assert problem == "demo.yaml:5: node v: record must be true or false, got str 'yes'"


def test_unknown_sync_suggests_the_closest_policy(registry: Registry) -> None:
    text = "name: r\nnodes:\n  v: {type: test_video}\n  m:\n    type: mixer\n    inputs: [v]\n"
    assert only_problem(text + "    sync: algined\n", registry) == (
        "demo.yaml:7: node m: sync must be one of latest, all, aligned, got str 'algined'; did you mean 'aligned'?"
    )


@pytest.mark.parametrize("value", ["0", "-5", "fast", ".inf", "true"])
def test_tolerance_must_be_a_positive_number(registry: Registry, value: str) -> None:
    text = (
        f"name: r\nnodes:\n  v: {{type: test_video}}\n  m:\n    type: mixer\n    inputs: [v]\n"
        f"    sync: aligned\n    tolerance_ms: {value}\n"
    )
    problem = only_problem(text, registry)
    assert problem.startswith("demo.yaml:8: node m: tolerance_ms must be a positive number of milliseconds, got")


def test_tolerance_without_aligned_sync_is_a_problem(registry: Registry) -> None:
    text = (
        "name: r\nnodes:\n  v: {type: test_video}\n  m:\n    type: mixer\n    inputs: [v]\n    sync: all\n"
        "    tolerance_ms: 10\n"
    )
    assert only_problem(text, registry) == (
        "demo.yaml:8: node m: tolerance_ms only applies with sync: aligned (this node's sync is all); "
        "remove it or set sync: aligned"
    )


def test_worker_must_be_a_string(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  v:\n    type: test_video\n    worker: 2\n", registry)
    assert problem == 'demo.yaml:5: node v: worker must be a worker name, got int 2; quote it: worker: "2"'


def test_worker_must_not_be_empty(registry: Registry) -> None:
    problem = only_problem("name: r\nnodes:\n  v:\n    type: test_video\n    worker: ''\n", registry)
    assert problem == "demo.yaml:5: node v: worker must be a worker name, got str ''"


# --- files -----------------------------------------------------------------------------------


def test_load_recipe_reads_the_file_and_names_it_as_source(registry: Registry, tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(recipe_text(VALID), encoding="utf-8")
    recipe = load_recipe(path, registry)
    assert isinstance(recipe, Recipe)
    assert (recipe.source, recipe.text) == (str(path), recipe_text(VALID))


def test_load_recipe_problems_name_the_file(registry: Registry, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: r\nnodes:\n  v: {type: nope}\n", encoding="utf-8")
    with pytest.raises(RecipeError) as caught:
        load_recipe(str(path), registry)
    assert caught.value.problems[0].startswith(f"{path}:3: node v: unknown node type 'nope'")


def test_missing_file_is_one_problem_with_a_hint(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(tmp_path / "nope.yaml", registry)
    hint = f"check the path (relative paths start at {Path.cwd()})"
    assert caught.value.problems == [f"{tmp_path / 'nope.yaml'}: no such recipe file; {hint}"]


def test_folder_is_not_a_recipe_file(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(tmp_path, registry)
    assert caught.value.problems == [f"{tmp_path}: is a folder; give the recipe's .yaml file"]


def test_file_that_is_not_utf8_names_the_line(registry: Registry, tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: r\nnodes:\n  v: {type: test_video}  # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, registry)
    assert caught.value.problems == [f"{path}:3: not UTF-8 text (byte 0xe9); save the recipe as UTF-8"]


def test_on_worker_lost_is_continue_or_stop(registry: Registry) -> None:
    text = "name: r\non_worker_lost: {}\nnodes:\n  a: {{type: test_video}}\n"
    assert parse_recipe(text.format("stop"), registry).on_worker_lost == "stop"
    assert parse_recipe("name: r\nnodes:\n  a: {type: test_video}\n", registry).on_worker_lost == "continue"
    assert only_problem(text.format("maybe"), registry) == \
        "demo.yaml:2: on_worker_lost must be continue or stop, got str 'maybe'"
