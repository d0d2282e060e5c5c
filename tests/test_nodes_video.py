"""Tests of the video transforms grayscale, resize and motion, stepped directly on real frames."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cpcli.node import Clock, Node, NodeConfigError, NodeContext, NodeError, Sample
from nodes import synthetic
from nodes.video import Grayscale, Motion, Resize

T_NS = 1_234_567_890


def started(node: Node) -> Node:
    node.setup(NodeContext(node_id="x", clock=Clock()))
    return node


def run(node: Node, value: Any, t_ns: int = T_NS, rate_hz: float | None = 30.0) -> Any:
    """Step a one-input node with `value` as input `cam` and return what it produced."""
    return node.step({"cam": Sample(value, t_ns=t_ns, rate_hz=rate_hz)})


def video_frames(count: int, width: int = 160, height: int = 120) -> list[np.ndarray]:
    source = started(synthetic.TestVideo(width=width, height=height))
    frames = []
    for _ in range(count):
        out = source.step({})
        assert isinstance(out, Sample)
        frames.append(out.value)
    source.teardown()
    return frames


BAD_FRAMES = [
    np.zeros((48, 64, 4), np.uint8),  # BGRA
    np.zeros((48, 64, 1, 1), np.uint8),
    np.zeros(64, np.uint8),
    np.zeros((48, 64, 3), np.float32),
    np.zeros((48, 64), np.uint16),
    np.zeros((0, 64, 3), np.uint8),
    {"motion": 0.5},
    "frame",
]


# --- grayscale ----------------------------------------------------------------------------------


def test_grayscale_turns_bgr_into_one_channel_with_the_usual_weights() -> None:
    node = started(Grayscale())
    frame = np.zeros((48, 64, 3), np.uint8)
    frame[:, :32] = (255, 0, 0)  # blue
    frame[:, 32:] = (0, 0, 255)  # red
    out = run(node, frame)
    assert isinstance(out, Sample)
    assert out.value.shape == (48, 64) and out.value.dtype == np.uint8
    assert out.value[0, 0] == 29 and out.value[0, 63] == 76  # 0.114 * 255, 0.299 * 255
    node.teardown()
    node.teardown()


def test_grayscale_keeps_capture_time_and_rate() -> None:
    node = started(Grayscale())
    out = run(node, video_frames(1)[0], t_ns=42, rate_hz=25.0)
    assert (out.t_ns, out.rate_hz) == (42, 25.0)


def test_grayscale_passes_gray_frames_through() -> None:
    node = started(Grayscale())
    frame = np.arange(48 * 64, dtype=np.uint32).reshape(48, 64).astype(np.uint8)
    out = run(node, frame)
    assert np.array_equal(out.value, frame) and out.t_ns == T_NS


def test_grayscale_accepts_a_non_contiguous_view() -> None:
    node = started(Grayscale())
    frame = video_frames(1)[0][:, ::2]
    assert run(node, frame).value.shape == (120, 80)


@pytest.mark.parametrize("value", BAD_FRAMES, ids=repr)
def test_grayscale_rejects_what_is_not_a_video_frame(value: Any) -> None:
    node = started(Grayscale())
    with pytest.raises(NodeError, match="grayscale node 'x' expects a video frame"):
        run(node, value)


def test_grayscale_error_names_the_shape_and_dtype_received() -> None:
    node = started(Grayscale())
    with pytest.raises(NodeError, match=r"shape \(48, 64, 4\) and dtype uint8"):
        run(node, np.zeros((48, 64, 4), np.uint8))


# --- resize -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(80, 60), (320, 240), (200, 50), (1, 1)])
def test_resize_scales_bgr_and_gray_frames(size: tuple[int, int]) -> None:
    width, height = size
    node = started(Resize(width=width, height=height))
    frame = video_frames(1)[0]
    out = run(node, frame)
    assert out.value.shape == (height, width, 3) and out.value.dtype == np.uint8
    assert (out.t_ns, out.rate_hz) == (T_NS, 30.0)
    gray = run(node, frame[:, :, 1]).value
    assert gray.shape == (height, width)
    node.teardown()


def test_resize_averages_when_shrinking() -> None:
    frame = np.zeros((4, 4), np.uint8)
    frame[::2, ::2] = 255  # one lit pixel in every 2x2 block
    out = run(started(Resize(width=2, height=2)), frame)
    assert np.array_equal(out.value, np.full((2, 2), 64, np.uint8))  # area mean, not a sample


def test_resize_passes_a_frame_of_the_right_size_through() -> None:
    frame = video_frames(1)[0]
    out = run(started(Resize(width=160, height=120)), frame)
    assert np.array_equal(out.value, frame)


@pytest.mark.parametrize("value", BAD_FRAMES, ids=repr)
def test_resize_rejects_what_is_not_a_video_frame(value: Any) -> None:
    with pytest.raises(NodeError, match="resize node 'x' expects a video frame"):
        run(started(Resize(width=32, height=32)), value)


@pytest.mark.parametrize(
    "params",
    [
        {"width": 0, "height": 10},
        {"width": 10, "height": 0},
        {"width": 7681, "height": 10},
        {"width": 10, "height": 4321},
        {"width": 10.0, "height": 10},
        {"width": 10, "height": "10"},
        {"width": False, "height": 10},
    ],
)
def test_resize_rejects_bad_params(params: dict[str, Any]) -> None:
    with pytest.raises(NodeConfigError, match="resize"):
        Resize(**params)


def test_resize_requires_width_and_height() -> None:
    with pytest.raises(TypeError):
        Resize(width=10)  # type: ignore[call-arg]


# --- motion -------------------------------------------------------------------------------------


def test_motion_first_frame_yields_nothing() -> None:
    node = started(Motion())
    assert run(node, video_frames(1)[0]) is None
    node.teardown()
    node.teardown()


def test_motion_is_zero_for_identical_frames() -> None:
    node = started(Motion())
    frame = video_frames(1)[0]
    run(node, frame)
    out = run(node, frame.copy(), t_ns=99)
    assert out.value == {"motion": 0.0}
    assert (out.t_ns, out.rate_hz) == (99, 30.0)


def test_motion_is_positive_for_a_moving_pattern() -> None:
    node = started(Motion())
    frames = video_frames(5)
    assert run(node, frames[0]) is None
    values = [run(node, frame).value["motion"] for frame in frames[1:]]
    assert all(0.0 < v < 1.0 for v in values)


def test_motion_scales_from_zero_to_one() -> None:
    node = started(Motion())
    black, white = np.zeros((8, 8), np.uint8), np.full((8, 8), 255, np.uint8)
    half = black.copy()
    half[:4] = 255
    run(node, black)
    assert run(node, white).value["motion"] == 1.0
    assert run(node, half).value["motion"] == 0.5
    assert run(node, half).value["motion"] == 0.0


def test_motion_keeps_its_own_copy_of_the_previous_frame() -> None:
    node = started(Motion())
    frame = np.zeros((8, 8), np.uint8)
    run(node, frame)
    frame[:] = 255  # the runtime may reuse an input buffer after step() returned
    assert run(node, frame).value["motion"] == 1.0


def test_motion_restarts_when_the_frame_shape_changes() -> None:
    node = started(Motion())
    bgr = video_frames(2)
    run(node, bgr[0])
    assert run(node, bgr[1][:, :, 0]) is None  # gray now: nothing to compare with
    assert run(node, bgr[1][:, :, 0]).value == {"motion": 0.0}
    assert run(node, np.zeros((10, 10), np.uint8)) is None


def test_motion_threshold_adds_an_active_column_to_every_row() -> None:
    node = started(Motion(threshold=0.25))
    black, white = np.zeros((8, 8), np.uint8), np.full((8, 8), 255, np.uint8)
    run(node, black)
    rows = [run(node, frame).value for frame in (black, white, white)]
    assert rows == [
        {"motion": 0.0, "active": False},
        {"motion": 1.0, "active": True},
        {"motion": 0.0, "active": False},
    ]
    assert all(type(row["active"]) is bool for row in rows)


def test_motion_without_threshold_has_only_the_motion_column() -> None:
    node = started(Motion())
    frames = video_frames(3)
    run(node, frames[0])
    assert [list(run(node, f).value) for f in frames[1:]] == [["motion"], ["motion"]]


@pytest.mark.parametrize("value", BAD_FRAMES, ids=repr)
def test_motion_rejects_what_is_not_a_video_frame(value: Any) -> None:
    with pytest.raises(NodeError, match="motion node 'x' expects a video frame"):
        run(started(Motion()), value)


@pytest.mark.parametrize("threshold", [-0.1, 1.1, float("nan"), "0.5", True])
def test_motion_rejects_bad_threshold(threshold: Any) -> None:
    with pytest.raises(NodeConfigError, match="motion threshold"):
        Motion(threshold=threshold)


def test_transforms_reject_a_wrong_number_of_inputs() -> None:
    frame = np.zeros((8, 8), np.uint8)
    for node in (started(Grayscale()), started(Resize(width=4, height=4)), started(Motion())):
        with pytest.raises(NodeError, match="exactly one input"):
            node.step({"a": Sample(frame), "b": Sample(frame)})
        with pytest.raises(NodeError, match="exactly one input, got 0"):
            node.step({})


def test_transforms_declare_one_input_and_a_port() -> None:
    assert (Grayscale.outputs, Resize.outputs, Motion.outputs) == (("video",), ("video",), ("motion",))
    assert Grayscale.input_count == Resize.input_count == Motion.input_count == 1


@pytest.mark.parametrize("node_type", [Grayscale, Motion, lambda: Resize(width=32, height=24)])
def test_per_pixel_nodes_keep_opencv_on_their_own_thread(node_type: Any) -> None:
    import cv2

    cv2.setNumThreads(4)
    try:
        node = node_type()
        node.setup(NodeContext(node_id="x", clock=Clock()))
        assert cv2.getNumThreads() == 1  # no pool to wake for each frame
    finally:
        cv2.setNumThreads(-1)  # OpenCV's default again, for the tests after this one
