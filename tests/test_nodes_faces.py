"""Tests of face_detect on a real face photo and on frames without faces, directly and in a session."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from cpcli.node import Clock, NodeConfigError, NodeContext, NodeError, Sample
from cpcli.recipe import load_recipe
from cpcli.registry import Registry
from cpcli.runtime.session import RunOptions, StopControl, run_session
from cpcli.runtime.timing import Timing
from nodes.faces import CASCADE_FILE, FaceDetect
from tests.conftest import write_recipe
from tests.media import face_image, numbered_frame

T_NS = 1_234_567_890
FAST = Timing(stats_interval_s=0.2, drain_timeout_s=1.0, exit_timeout_s=2.0, ready_timeout_s=20.0)
# OpenCV 5 dropped cv2.CascadeClassifier and the cascades from its wheels; 4.x has both.
HAAR = hasattr(cv2, "CascadeClassifier") and os.path.isfile(
    os.path.join(getattr(getattr(cv2, "data", None), "haarcascades", ""), CASCADE_FILE))
needs_haar = pytest.mark.skipif(not HAAR, reason=f"OpenCV {cv2.__version__} ships no Haar face cascade")
COLUMNS = ["count", "x", "y", "w", "h"]


def started(node: FaceDetect) -> FaceDetect:
    node.setup(NodeContext(node_id="faces", clock=Clock()))
    return node


def detect(node: FaceDetect, frame: Any, t_ns: int = T_NS, rate_hz: float | None = 30.0) -> tuple[Sample, Sample]:
    out = node.step({"cam": Sample(frame, t_ns=t_ns, rate_hz=rate_hz)})
    assert isinstance(out, dict) and set(out) == {"faces", "boxes"}
    return out["faces"], out["boxes"]


def scene(*faces: tuple[int, int, int], width: int = 400, height: int = 240, bgr: bool = False,
          flat: bool = False) -> npt.NDArray[np.uint8]:
    """A noisy (or flat gray) frame with the face photo pasted at (x, y) scaled to `side`, per (x, y, side)."""
    noise = np.random.default_rng(7).integers(60, 200, (height, width), dtype=np.uint8)
    frame = np.full((height, width), 128, np.uint8) if flat else noise
    for x, y, side in faces:
        frame[y:y + side, x:x + side] = cv2.resize(face_image(), (side, side), interpolation=cv2.INTER_LINEAR)
    return np.asarray(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR), np.uint8) if bgr else frame


def inside(box: list[int], x: int, y: int, side: int) -> bool:
    bx, by, bw, bh = box
    return x <= bx and y <= by and bx + bw <= x + side and by + bh <= y + side and bw >= side // 3


# --- detection on a real face ---------------------------------------------------------------------


@needs_haar
@pytest.mark.parametrize("bgr", [False, True], ids=["gray", "bgr"])
def test_face_detect_finds_the_face_in_a_photo(bgr: bool) -> None:
    node = started(FaceDetect())
    faces, boxes = detect(node, scene((150, 60, 128), bgr=bgr))
    assert list(faces.value) == COLUMNS and faces.value["count"] == 1
    box = [faces.value[k] for k in ("x", "y", "w", "h")]
    assert inside(box, 150, 60, 128)
    assert boxes.value == [box]
    assert all(type(v) is int for v in faces.value.values())  # plain ints: CSV and msgpack take them
    node.teardown()
    node.teardown()


@needs_haar
@pytest.mark.parametrize("flat", [False, True], ids=["noisy", "plain"])
def test_face_detect_finds_faces_with_and_without_equalizing(flat: bool) -> None:
    frame = scene((150, 60, 128), flat=flat)
    assert detect(started(FaceDetect()), frame)[0].value["count"] == 1
    if not flat:  # on a plain background equalizing turns the face into black and white: why it is off
        assert detect(started(FaceDetect(equalize=True)), frame)[0].value["count"] == 1


@needs_haar
def test_face_detect_lists_every_face_largest_first_and_caps_the_list() -> None:
    frame = scene((20, 20, 96), (230, 60, 128))
    faces, boxes = detect(started(FaceDetect()), frame)
    assert faces.value["count"] == 2 and len(boxes.value) == 2
    assert inside(boxes.value[0], 230, 60, 128) and inside(boxes.value[1], 20, 20, 96)
    assert [faces.value[k] for k in ("x", "y", "w", "h")] == boxes.value[0]  # the row holds the largest
    faces, boxes = detect(started(FaceDetect(max_faces=1)), frame)
    assert faces.value["count"] == 2 and boxes.value == [[faces.value[k] for k in ("x", "y", "w", "h")]]


@needs_haar
def test_face_detect_min_size_ignores_smaller_faces() -> None:
    frame = scene((20, 20, 80), (200, 40, 160))  # boxes of about 53 and 95 pixels
    assert detect(started(FaceDetect()), frame)[0].value["count"] == 2
    faces, boxes = detect(started(FaceDetect(min_size=75)), frame)
    assert faces.value["count"] == 1 and inside(boxes.value[0], 200, 40, 160)


@needs_haar
def test_face_detect_finds_no_face_where_there_is_none() -> None:
    node = started(FaceDetect())
    for frame in (numbered_frame(7), np.zeros((240, 320), np.uint8), np.full((48, 64, 3), 200, np.uint8),
                  np.zeros((8, 8), np.uint8)):  # smaller than any face
        faces, boxes = detect(node, frame)
        assert faces.value == {"count": 0, "x": None, "y": None, "w": None, "h": None}
        assert boxes.value == []


@needs_haar
def test_face_detect_keeps_capture_time_and_rate() -> None:
    faces, boxes = detect(started(FaceDetect()), scene((150, 60, 128)), t_ns=42, rate_hz=25.0)
    assert (faces.t_ns, faces.rate_hz, boxes.t_ns, boxes.rate_hz) == (42, 25.0, 42, 25.0)


@needs_haar
def test_face_detect_accepts_a_non_contiguous_view() -> None:
    frame = scene((150, 60, 128), bgr=True)
    faces, _ = detect(started(FaceDetect()), frame[:, :, ::-1])  # RGB as a strided view of BGR
    assert faces.value["count"] == 1


@needs_haar
@pytest.mark.parametrize("value", [np.zeros((48, 64, 4), np.uint8), np.zeros((48, 64), np.float32),
                                   np.zeros((0, 64), np.uint8), np.zeros(64, np.uint8), "frame",
                                   {"count": 1}], ids=repr)
def test_face_detect_rejects_what_is_not_a_video_frame(value: Any) -> None:
    with pytest.raises(NodeError, match="face_detect node 'faces' expects a video frame"):
        detect(started(FaceDetect()), value)


@needs_haar
def test_face_detect_takes_exactly_one_input() -> None:
    node = started(FaceDetect())
    frame = Sample(np.zeros((8, 8), np.uint8))
    with pytest.raises(NodeError, match="exactly one input, got 2"):
        node.step({"a": frame, "b": frame})


@needs_haar
def test_face_detect_loads_a_cascade_given_by_path(tmp_path: Path) -> None:
    path = os.path.join(cv2.data.haarcascades, CASCADE_FILE)  # type: ignore[attr-defined]
    faces, _ = detect(started(FaceDetect(cascade=path)), scene((150, 60, 128)))
    assert faces.value["count"] == 1
    not_xml = tmp_path / "cascade.xml"
    not_xml.write_text("<nothing/>")
    with pytest.raises(NodeError, match="could not load the cascade"):
        started(FaceDetect(cascade=str(not_xml)))


# --- without a cascade (OpenCV 5) ---------------------------------------------------------------


@pytest.mark.skipif(HAAR, reason="this OpenCV has the Haar cascade")
def test_face_detect_without_a_cascade_fails_setup_saying_what_to_install() -> None:
    with pytest.raises(NodeError, match=r"face_detect node 'faces' needs .*opencv-python-headless>=4.8,<5"):
        started(FaceDetect())


# --- params and registration --------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, message",
    [
        ({"scale_factor": 1.0}, "scale_factor must be a number above 1"),
        ({"scale_factor": 2.5}, "scale_factor"),
        ({"scale_factor": float("nan")}, "scale_factor"),
        ({"scale_factor": "1.1"}, "scale_factor"),
        ({"min_neighbors": -1}, "min_neighbors must be an integer in 0..100"),
        ({"min_neighbors": 2.0}, "min_neighbors"),
        ({"min_size": 0}, "min_size"),
        ({"min_size": True}, "min_size"),
        ({"max_faces": 0}, "max_faces"),
        ({"equalize": "no"}, "equalize"),
        ({"cascade": "nowhere/faces.xml"}, r"cascade 'nowhere/faces.xml' is not a file"),
        ({"cascade": 3}, "cascade must be the path"),
    ],
)
def test_face_detect_rejects_bad_params(params: dict[str, Any], message: str) -> None:
    with pytest.raises(NodeConfigError, match=message):
        FaceDetect(**params)


def test_face_detect_is_registered_with_two_ports(registry: Registry) -> None:
    node_type = registry.get("face_detect")
    assert node_type is not None and node_type.outputs == ("faces", "boxes")
    assert FaceDetect.input_count == 1
    assert {p.name for p in node_type.params} == {"scale_factor", "min_neighbors", "min_size", "max_faces",
                                                  "equalize", "cascade"}


# --- through a real session ---------------------------------------------------------------------


def face_video(path: Path, frames: int = 20) -> Path:
    """Even frames show the face photo, odd frames show none."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 30.0, (400, 240))
    for n in range(frames):
        writer.write(scene((150, 60, 128), bgr=True) if n % 2 == 0 else numbered_frame(n, 400, 240))
    writer.release()
    return path


def face_recipe(tmp_path: Path, video: Path) -> Path:
    return write_recipe(tmp_path, f"""
name: faces-from-file
nodes:
  cam:
    type: camera
    params: {{device: {json.dumps(str(video))}, realtime: false}}
  faces:
    type: face_detect
    inputs: [cam]
    sync: all
    record: true
""")


def run(recipe: Path, registry: Registry, tmp_path: Path, duration_s: float = 2.0):  # type: ignore[no-untyped-def]
    options = RunOptions(out_dir=tmp_path / "sessions", duration_s=duration_s, timing=FAST, worker="lab")
    return run_session(load_recipe(recipe, registry), registry, options, StopControl())


@needs_haar
def test_recorded_faces_have_a_row_and_an_event_per_frame(registry: Registry, tmp_path: Path) -> None:
    result = run(face_recipe(tmp_path, face_video(tmp_path / "faces.mp4")), registry, tmp_path)
    assert not result.failures
    stats = result.manifest["nodes"]["faces"]["stats"]
    seen = stats["samples_in"]["cam"]
    assert seen + stats["dropped_in"]["cam"] == 20 and seen >= 10
    node_dir = result.session_dir / "lab" / "faces"
    with open(node_dir / "faces.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["index", "t_ns", "local_ns", *COLUMNS] and len(rows) == seen
    counts = [int(r["count"]) for r in rows]
    assert set(counts) == {0, 1} and counts.count(1) >= seen // 2 - 1
    assert all((r["x"] == "") == (r["count"] == "0") for r in rows)  # no face: empty cells
    events = [json.loads(line) for line in (node_dir / "boxes.jsonl").read_text().splitlines()]
    assert len(events) == seen
    assert [(int(r["t_ns"]), int(r["local_ns"])) for r in rows] == [(e["t_ns"], e["local_ns"]) for e in events]
    for row, event in zip(rows, events, strict=True):
        largest = [int(row[k]) for k in ("x", "y", "w", "h")] if row["x"] else None
        assert len(event["value"]) == int(row["count"]) and (event["value"] or [None])[0] == largest


@pytest.mark.skipif(HAAR, reason="this OpenCV has the Haar cascade")
def test_session_without_a_cascade_fails_with_the_install_hint(registry: Registry, tmp_path: Path) -> None:
    result = run(face_recipe(tmp_path, face_video(tmp_path / "faces.mp4", 2)), registry, tmp_path, duration_s=10)
    assert "opencv-python-headless>=4.8,<5" in result.failures["faces"]
    assert result.manifest["status"] == "failed" and result.duration_s < 8
