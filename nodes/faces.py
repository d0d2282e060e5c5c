"""Face detection on a stream of frames with OpenCV's Haar cascade: face_detect."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpcli.lazy import numpy as np
from cpcli.node import Inputs, Node, NodeConfigError, NodeContext, NodeError, Outputs, Sample

if TYPE_CHECKING:  # annotations only: importing this module (`cp worker`) skips numpy
    import numpy.typing as npt

CASCADE_FILE = "haarcascade_frontalface_default.xml"  # OpenCV's frontal-face model, shipped in cv2.data
MAX_SIDE = 7680  # no face is larger than an 8K frame
MAX_FACES = 1000  # a crowd; more is a typo
FRAME_KINDS = "an HxW or HxWx3 uint8 array"
# OpenCV 5 moved Haar cascades out of its Python wheels; 4.x has both the classifier and the model.
OPENCV_HINT = "install OpenCV 4 (pip install 'opencv-python-headless>=4.8,<5')"


def _check_int(what: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise NodeConfigError(f"{what} must be an integer in {low}..{high}, got {value!r}")
    return value


class FaceDetect(Node):
    """Find frontal faces in BGR or gray frames with OpenCV's bundled Haar cascade.

    Per frame, port `faces` gets a table row with fixed columns: `count` (faces found) and
    `x`, `y`, `w`, `h` of the largest face (empty when there is none); port `boxes` gets an
    event with the boxes of up to `max_faces` faces, largest first, as [[x, y, w, h], ...].
    Both keep the frame's capture time. `scale_factor`, `min_neighbors` and `min_size` are
    OpenCV's detectMultiScale settings; `cascade` names another cascade XML file to use.
    `equalize` stretches each frame's histogram first, which helps in dim light but loses faces
    in front of a plain wall (the cascade already normalizes contrast per window): off by default.
    """

    outputs = ("faces", "boxes")
    input_count = 1

    _classifier: Any  # cv2.CascadeClassifier while set up

    def __init__(
        self,
        *,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: int = 30,
        max_faces: int = 10,
        equalize: bool = False,
        cascade: str = "",
    ) -> None:
        ok = isinstance(scale_factor, (int, float)) and not isinstance(scale_factor, bool)
        if not ok or not math.isfinite(scale_factor) or not 1.0 < scale_factor <= 2.0:
            raise NodeConfigError(f"face_detect scale_factor must be a number above 1 and at most 2, got "
                                  f"{scale_factor!r}")
        self.scale_factor = float(scale_factor)
        self.min_neighbors = _check_int("face_detect min_neighbors", min_neighbors, 0, 100)
        self.min_size = _check_int("face_detect min_size (pixels)", min_size, 1, MAX_SIDE)
        self.max_faces = _check_int("face_detect max_faces", max_faces, 1, MAX_FACES)
        if not isinstance(equalize, bool):
            raise NodeConfigError(f"face_detect equalize must be true or false, got {equalize!r}")
        self.equalize = equalize
        if not isinstance(cascade, str):
            raise NodeConfigError(f"face_detect cascade must be the path of a cascade XML file, got {cascade!r}")
        if cascade and not Path(cascade).expanduser().is_file():
            raise NodeConfigError(f"face_detect cascade {cascade!r} is not a file "
                                  f"(looked at {Path(cascade).expanduser().absolute()})")
        self.cascade = str(Path(cascade).expanduser()) if cascade else ""
        self._where = "face_detect"
        self._classifier = None

    def setup(self, ctx: NodeContext) -> None:
        import cv2

        self._where = f"face_detect node {ctx.node_id!r}"
        if not hasattr(cv2, "CascadeClassifier"):
            raise NodeError(f"{self._where} needs OpenCV's Haar cascade classifier, which OpenCV {cv2.__version__} "
                            f"on {ctx.worker} does not have; {OPENCV_HINT}")
        path = self.cascade or os.path.join(getattr(getattr(cv2, "data", None), "haarcascades", ""), CASCADE_FILE)
        if not os.path.isfile(path):
            raise NodeError(f"{self._where} needs {CASCADE_FILE}, which this OpenCV {cv2.__version__} build on "
                            f"{ctx.worker} does not ship (looked at {path}); {OPENCV_HINT}, or set `cascade:` to "
                            f"the path of a cascade XML file")
        unreadable = NodeError(f"{self._where}: OpenCV {cv2.__version__} could not load the cascade {path}; "
                               f"is it an OpenCV cascade XML file?")
        try:
            classifier = cv2.CascadeClassifier(path)
        except (cv2.error, SystemError) as err:  # a malformed XML raises from inside the constructor
            raise unreadable from err
        if classifier.empty():
            raise unreadable
        self._classifier = classifier
        ctx.logger.info("%s: cascade %s", self._where, path)

    def step(self, inputs: Inputs) -> Outputs:
        import cv2

        if len(inputs) != 1:
            raise NodeError(f"{self._where} takes exactly one input, got {len(inputs)}: "
                            f"{', '.join(inputs) or 'none'}")
        sample = next(iter(inputs.values()))
        gray: npt.NDArray[Any] = self._gray(sample.value)
        if self.equalize:
            gray = cv2.equalizeHist(gray)
        found = self._classifier.detectMultiScale(gray, scaleFactor=self.scale_factor,
                                                  minNeighbors=self.min_neighbors,
                                                  minSize=(self.min_size, self.min_size))
        boxes = sorted(([int(v) for v in box] for box in found), key=lambda b: (-b[2] * b[3], b[0], b[1]))
        largest: list[int | None] = list(boxes[0]) if boxes else [None] * 4
        row = {"count": len(boxes), **dict(zip(("x", "y", "w", "h"), largest, strict=True))}
        return {"faces": Sample(row, t_ns=sample.t_ns, rate_hz=sample.rate_hz),
                "boxes": Sample(boxes[: self.max_faces], t_ns=sample.t_ns, rate_hz=sample.rate_hz)}

    def teardown(self) -> None:
        self._classifier = None

    def _gray(self, value: Any) -> npt.NDArray[Any]:
        """The input as a contiguous gray frame, or a NodeError saying what arrived instead."""
        import cv2

        if not isinstance(value, np.ndarray):
            raise NodeError(f"{self._where} expects a video frame ({FRAME_KINDS}), got a {type(value).__name__}")
        if value.dtype != np.uint8 or value.size == 0 or not (
            value.ndim == 2 or (value.ndim == 3 and value.shape[2] == 3)
        ):
            raise NodeError(f"{self._where} expects a video frame ({FRAME_KINDS}), "
                            f"got an array of shape {value.shape} and dtype {value.dtype}")
        if value.ndim == 3:
            gray: npt.NDArray[Any] = cv2.cvtColor(np.ascontiguousarray(value), cv2.COLOR_BGR2GRAY)
            return gray
        return np.ascontiguousarray(value)
