"""Video transforms on one stream of frames: grayscale, resize and motion."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from cpcli.lazy import numpy as np
from cpcli.node import Inputs, Node, NodeConfigError, NodeContext, NodeError, Outputs, Sample

MAX_WIDTH, MAX_HEIGHT = 7680, 4320  # 8K UHD: the largest frame any camera we target produces
FRAME_KINDS = "an HxW or HxWx3 uint8 array"

if TYPE_CHECKING:  # annotations only: importing this module (`cp worker`) skips numpy
    import numpy.typing as npt

    Frame = npt.NDArray[np.uint8]


def _load_cv2_single_threaded() -> None:
    """Import OpenCV now (not in the first step) and keep its per-pixel work on this thread.

    A conversion of one frame is memory-bound and short: waking OpenCV's thread pool for it costs
    more CPU than it saves, and a field laptop runs a dozen node processes on two cores (measured
    with benchmarks/fanout.py: the pool's threads took 0.1 ms of CPU per 640x480 frame)."""
    import cv2

    cv2.setNumThreads(1)  # this process is this node alone: nothing else is affected


def _check_int(what: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise NodeConfigError(f"{what} must be an integer in {low}..{high}, got {value!r}")
    return value


def _single(inputs: Inputs, where: str) -> Sample:
    if len(inputs) != 1:
        raise NodeError(f"{where} takes exactly one input, got {len(inputs)}: {', '.join(inputs) or 'none'}")
    return next(iter(inputs.values()))


def _frame(value: Any, where: str) -> Frame:
    """The value as a C-contiguous video frame, or a NodeError saying what arrived instead."""
    if not isinstance(value, np.ndarray):
        raise NodeError(f"{where} expects a video frame ({FRAME_KINDS}), got a {type(value).__name__}")
    shape_ok = value.ndim == 2 or (value.ndim == 3 and value.shape[2] == 3)
    if value.dtype != np.uint8 or not shape_ok or value.size == 0:
        raise NodeError(
            f"{where} expects a video frame ({FRAME_KINDS}), "
            f"got an array of shape {value.shape} and dtype {value.dtype}"
        )
    return np.ascontiguousarray(value)  # OpenCV needs contiguous rows; a no-op for camera frames


class Grayscale(Node):
    """Convert BGR video frames to single-channel grayscale (HxW frames pass through)."""

    outputs = ("video",)
    input_count = 1

    _where: str
    _ctx: NodeContext

    def __init__(self) -> None:
        self._where = "grayscale"

    def setup(self, ctx: NodeContext) -> None:
        self._where = f"grayscale node {ctx.node_id!r}"
        self._ctx = ctx
        _load_cv2_single_threaded()

    def step(self, inputs: Inputs) -> Outputs:
        sample = _single(inputs, self._where)
        frame: npt.NDArray[Any] = _frame(sample.value, self._where)
        if frame.ndim == 3:
            import cv2

            gray = self._ctx.output_buffer("video", frame.shape[:2])  # converted in place: no copy to send it
            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY, dst=gray)
        return Sample(frame, t_ns=sample.t_ns, rate_hz=sample.rate_hz)


class Resize(Node):
    """Scale video frames to width x height (area averaging when shrinking, bilinear when growing)."""

    outputs = ("video",)
    input_count = 1

    _ctx: NodeContext

    def __init__(self, *, width: int, height: int) -> None:
        self.width = _check_int("resize width", width, 1, MAX_WIDTH)
        self.height = _check_int("resize height", height, 1, MAX_HEIGHT)
        self._where = "resize"

    def setup(self, ctx: NodeContext) -> None:
        self._where = f"resize node {ctx.node_id!r}"
        self._ctx = ctx
        _load_cv2_single_threaded()

    def step(self, inputs: Inputs) -> Outputs:
        sample = _single(inputs, self._where)
        frame: npt.NDArray[Any] = _frame(sample.value, self._where)
        height, width = frame.shape[:2]
        if (width, height) != (self.width, self.height):
            import cv2

            shrinking = self.width <= width and self.height <= height
            interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
            shape = (self.height, self.width, *frame.shape[2:])
            resized = self._ctx.output_buffer("video", shape)  # scaled in place: no copy to send it
            frame = cv2.resize(frame, (self.width, self.height), dst=resized, interpolation=interpolation)
        return Sample(frame, t_ns=sample.t_ns, rate_hz=sample.rate_hz)


class Motion(Node):
    """Motion between consecutive frames: mean absolute difference, 0 (still) .. 1, as a table row.

    Each row is {"motion": value}, plus "active": motion > threshold when threshold > 0.
    The first frame, and a frame whose shape differs from the one before, yield no row.
    """

    outputs = ("motion",)
    input_count = 1

    _previous: Frame | None

    def __init__(self, *, threshold: float = 0.0) -> None:
        ok = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
        if not ok or not math.isfinite(threshold) or not 0.0 <= threshold <= 1.0:
            raise NodeConfigError(f"motion threshold must be a number in 0..1, got {threshold!r}")
        self.threshold = float(threshold)
        self._where = "motion"
        self._previous = None

    def setup(self, ctx: NodeContext) -> None:
        self._where = f"motion node {ctx.node_id!r}"
        _load_cv2_single_threaded()
        self._previous = None

    def step(self, inputs: Inputs) -> Outputs:
        sample = _single(inputs, self._where)
        frame = _frame(sample.value, self._where)
        previous = self._previous
        # A copy: the runtime may reuse an input's buffer once step() has returned.
        self._previous = frame.copy()
        if previous is None or previous.shape != frame.shape:
            return None
        import cv2

        motion = float(cv2.absdiff(previous, frame).mean()) / 255.0
        row: dict[str, float | bool] = {"motion": motion}
        if self.threshold > 0:
            row["active"] = motion > self.threshold
        return Sample(row, t_ns=sample.t_ns, rate_hz=sample.rate_hz)

    def teardown(self) -> None:
        self._previous = None
