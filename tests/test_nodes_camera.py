"""Tests of the camera node on real OpenCV capture: generated video files, a local HTTP stream, real sessions."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from cpcli.node import Clock, DeviceError, DeviceInfo, NodeConfigError, NodeContext, Sample
from cpcli.recipe import load_recipe
from cpcli.registry import Registry
from cpcli.runtime.session import RunOptions, SessionResult, StopControl, run_session
from cpcli.runtime.timing import Timing
from nodes.camera import MAX_STALE_FRAMES, Camera
from tests.conftest import write_recipe
from tests.media import frame_number, numbered_frame, recorded_video, write_numbered_video

FRAMES = 64
FAST = Timing(stats_interval_s=0.2, drain_timeout_s=1.0, exit_timeout_s=2.0, ready_timeout_s=20.0)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 numbered frames, 320x240 at 30 fps."""
    return write_numbered_video(tmp_path_factory.mktemp("media") / "numbered.mp4", FRAMES)


def started(camera: Camera, worker: str = "local") -> Camera:
    camera.setup(NodeContext(node_id="cam", clock=Clock(), worker=worker))
    return camera


def play(camera: Camera, limit: int = 10 * FRAMES) -> list[Sample]:
    """Step the camera until it sends nothing (or `limit` frames)."""
    samples: list[Sample] = []
    while len(samples) < limit:
        out = camera.step({})
        if out is None:
            break
        assert isinstance(out, Sample)
        samples.append(out)
    return samples


def closed_port() -> int:
    """A loopback port nobody listens on (the OS just handed it out and it was closed again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- files ---------------------------------------------------------------------------------------


def test_camera_plays_every_frame_of_a_file_in_order(video: Path) -> None:
    camera = started(Camera(device=str(video), realtime=False))
    samples = play(camera)
    assert [frame_number(s.value) for s in samples] == list(range(FRAMES))
    assert all(s.value.shape == (240, 320, 3) and s.value.dtype == np.uint8 for s in samples)
    times = [s.t_ns for s in samples]
    assert all(isinstance(t, int) for t in times) and times == sorted(times)  # type: ignore[type-var]
    assert {s.rate_hz for s in samples} == {30.0}
    assert camera.step({}) is None, "a file that ended without loop stays ended"
    camera.teardown()
    camera.teardown()


def test_camera_reads_the_actual_size_and_rate_of_a_file(video: Path) -> None:
    camera = started(Camera(device=str(video), realtime=False))
    assert (camera.actual_width, camera.actual_height, camera.actual_fps) == (320, 240, 30.0)
    settings = camera.settings()
    assert settings["width"] == 320 and settings["height"] == 240 and settings["fps"] == 30.0
    assert settings["source"] == "file" and settings["frame_count"] == FRAMES and settings["backend"]
    json.dumps(settings)  # it goes into the manifest as it is
    camera.teardown()
    assert camera.settings() == settings  # still there for the runtime after the device is released
    assert Camera(device=str(video)).settings() == {}


def test_camera_paces_a_file_at_its_own_rate_when_realtime(video: Path, tmp_path: Path) -> None:
    camera = Camera(device=str(video))
    assert camera.rate_hz == 0  # unknown before the file is opened
    started(camera)
    assert camera.rate_hz == 30.0
    camera.teardown()
    slow = write_numbered_video(tmp_path / "slow.mp4", 5, fps=12.5)
    camera = started(Camera(device=str(slow)))
    assert camera.rate_hz == 12.5 and camera.settings()["rate_hz"] == 12.5
    assert len(play(camera)) == 5
    camera.teardown()


def test_camera_reads_a_file_as_fast_as_possible_without_realtime(video: Path) -> None:
    camera = started(Camera(device=str(video), realtime=False))
    assert camera.rate_hz == 0
    camera.teardown()


def test_ended_file_camera_waits_instead_of_spinning_when_read_as_fast_as_possible(tmp_path: Path) -> None:
    camera = started(Camera(device=str(write_numbered_video(tmp_path / "two.mp4", 2)), realtime=False))
    assert len(play(camera)) == 2
    started_s = time.monotonic()
    assert [camera.step({}) for _ in range(4)] == [None] * 4
    assert time.monotonic() - started_s >= 0.15  # the driver calls a rate-less source in a tight loop
    camera.teardown()


def test_camera_says_a_file_ignores_camera_settings(video: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    camera = started(Camera(device=str(video), width=640, fps=60))
    assert "width, height, fps and fourcc are for cameras and are ignored" in caplog.text
    assert "320x240 at 30 fps" in caplog.text and camera.actual_width == 320 and camera.rate_hz == 30
    camera.teardown()


def test_camera_loop_starts_the_file_again_at_its_end(tmp_path: Path) -> None:
    short = write_numbered_video(tmp_path / "short.mp4", 10)
    camera = started(Camera(device=str(short), loop=True, realtime=False))
    numbers = [frame_number(s.value) for s in play(camera, limit=25)]
    assert numbers == [*range(10), *range(10), *range(5)]
    camera.teardown()


def test_camera_file_frames_are_new_arrays_the_runtime_may_keep(tmp_path: Path) -> None:
    short = write_numbered_video(tmp_path / "short.mp4", 3)
    camera = started(Camera(device=str(short), realtime=False))
    frames = [s.value for s in play(camera)]
    assert [frame_number(f) for f in frames] == [0, 1, 2]  # read again after all were taken: none overwritten
    camera.teardown()


def test_camera_missing_file_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "take1.mp4"
    with pytest.raises(NodeConfigError, match=r"take1\.mp4' does not exist"):
        Camera(device=str(missing))


def test_camera_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(NodeConfigError, match="is a folder"):
        Camera(device=str(tmp_path))


@pytest.mark.parametrize("name, data", [("notes.csv", b"a,b\n1,2\n" * 50), ("broken.mp4", bytes(range(256)) * 64)])
def test_camera_file_that_is_not_a_video_fails_setup(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    camera = Camera(device=str(path))  # it exists: only opening it can tell
    with pytest.raises(DeviceError, match=f"{name} is not a video OpenCV can read"):
        started(camera)


def test_camera_truncated_recording_fails_setup_not_the_first_step(video: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(video.read_bytes()[: video.stat().st_size // 3])  # the index (moov) at the end is gone
    with pytest.raises(DeviceError, match="is not a video OpenCV can read"):
        started(Camera(device=str(cut)))


def test_camera_names_the_worker_in_device_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b\n")
    with pytest.raises(DeviceError, match="on lab-03"):
        started(Camera(device=str(path)), worker="lab-03")


# --- devices and URLs ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", [42, "42", "/dev/video42"])
def test_camera_absent_index_fails_setup_quickly(device: int | str) -> None:
    camera = Camera(device=device)
    started_s = time.monotonic()
    with pytest.raises(DeviceError, match=r"camera 42 .*`cp devices` lists the cameras here"):
        started(camera)
    assert time.monotonic() - started_s < 2.0


@pytest.mark.parametrize("scheme", ["rtsp", "http"])
def test_camera_unreachable_url_fails_setup_quickly(scheme: str) -> None:
    url = f"{scheme}://127.0.0.1:{closed_port()}/stream"
    started_s = time.monotonic()
    with pytest.raises(DeviceError, match=f"camera {url} could not be opened"):
        started(Camera(device=url))
    assert time.monotonic() - started_s < 5.0


class _MjpegStream(http.server.BaseHTTPRequestHandler):
    """What an IP camera serves: JPEG frames in a multipart/x-mixed-replace stream (here FRAMES, then the end)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        try:
            for number in range(FRAMES):
                jpeg = cv2.imencode(".jpg", numbered_frame(number))[1].tobytes()
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n"
                                 % (len(jpeg), jpeg))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the camera node went away first

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def mjpeg_url() -> Iterator[str]:
    """A local HTTP server streaming numbered frames as MJPEG, like an IP camera."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MjpegStream)
    thread = threading.Thread(target=server.serve_forever, name="mjpeg-camera", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/video.mjpg"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_camera_reads_a_url_and_says_when_the_stream_stops(mjpeg_url: str) -> None:
    camera = started(Camera(device=mjpeg_url))
    assert camera.rate_hz == 0  # a stream comes at its own pace; `realtime` is for files
    assert camera.settings()["source"] == "url"
    numbers = []
    with pytest.raises(DeviceError, match=f"camera {mjpeg_url} stopped sending frames"):
        for _ in range(FRAMES + 10):
            out = camera.step({})
            if isinstance(out, Sample):
                numbers.append(frame_number(out.value))
    # Frame 0 proved the stream in setup(); frames that were waiting when stepping began are old, and a
    # live camera skips them (at most MAX_STALE_FRAMES) so that no frame is stamped late.
    assert 1 <= numbers[0] <= 1 + MAX_STALE_FRAMES
    assert numbers == list(range(numbers[0], FRAMES))
    camera.teardown()


def test_camera_backend_this_build_lacks_fails_setup(video: Path) -> None:
    backend = "v4l2" if sys.platform == "win32" else "dshow"
    with pytest.raises(DeviceError, match=f"has no {backend} video backend"):
        started(Camera(device=str(video), backend=backend))


def test_camera_devices_is_quick_and_lists_only_cameras() -> None:
    started_s = time.monotonic()
    found = Camera.devices()
    assert time.monotonic() - started_s < 5.0
    assert all(isinstance(d, DeviceInfo) and d.kind == "camera" and d.device.isdigit() for d in found)
    if not list(Path("/dev").glob("video*")) and sys.platform.startswith("linux"):
        assert found == []


@pytest.mark.parametrize(
    "params, message",
    [
        ({"device": -1}, "index must be in 0..63"),
        ({"device": 64}, "index must be in 0..63"),
        ({"device": ""}, "camera device must be"),
        ({"device": 1.5}, "camera device must be"),
        ({"device": True}, "camera device must be"),
        ({"device": "front"}, "'front' does not exist"),
        ({"width": -1}, "camera width"),
        ({"height": 5000}, "camera height"),
        ({"width": 640.0}, "camera width"),
        ({"fps": -1}, "camera fps"),
        ({"fps": float("nan")}, "camera fps"),
        ({"fps": "30"}, "camera fps"),
        ({"loop": "yes"}, "camera loop"),
        ({"realtime": 1}, "camera realtime"),
        ({"backend": "directshow"}, "camera backend must be one of any, v4l2"),
        ({"fourcc": "MJPEG"}, "camera fourcc"),
    ],
)
def test_camera_rejects_bad_params(params: dict[str, Any], message: str) -> None:
    with pytest.raises(NodeConfigError, match=message):
        Camera(**params)


def test_camera_accepts_every_kind_of_device_without_touching_it(video: Path) -> None:
    assert Camera(device=0).index == 0 and Camera(device="3").index == 3
    assert Camera(device="/dev/video2").index == 2  # no such node here: setup() is where that matters
    assert Camera(device="rtsp://10.0.0.9:554/live").kind == "url"
    assert Camera(device="HTTPS://cam.local/mjpeg").kind == "url"
    assert Camera(device=str(video)).kind == "file"
    assert Camera(device="frames/img_%04d.png").kind == "file"  # an image sequence: OpenCV resolves it


def test_camera_is_registered_with_its_params(registry: Registry) -> None:
    node_type = registry.get("camera")
    assert node_type is not None and node_type.outputs == ("video",)
    assert [p.name for p in node_type.params] == ["device", "width", "height", "fps", "loop", "realtime",
                                                  "backend", "fourcc"]


# --- through a real session ----------------------------------------------------------------------


def run(recipe: Path, registry: Registry, tmp_path: Path, duration_s: float) -> SessionResult:
    options = RunOptions(out_dir=tmp_path / "sessions", duration_s=duration_s, timing=FAST, worker="lab")
    return run_session(load_recipe(recipe, registry), registry, options, StopControl())


def test_recorded_file_camera_decodes_to_every_frame_in_order(video: Path, registry: Registry,
                                                              tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, f"""
name: file-camera
nodes:
  cam:
    type: camera
    params: {{device: {json.dumps(str(video))}, realtime: false}}
    record: true
  gray: {{type: grayscale, inputs: [cam]}}
""")
    result = run(recipe, registry, tmp_path, duration_s=2.0)
    assert not result.failures and result.manifest["status"] == "complete"
    info = result.manifest["nodes"]["cam"]["info"]  # what the device actually delivered
    assert (info["width"], info["height"]) == (320, 240) and info["fps"] == pytest.approx(30, abs=0.5)
    stats = result.manifest["nodes"]["cam"]["stats"]
    assert stats["sent_in_place"] >= FRAMES - 2, "frames were not decoded into the slots they were sent from"
    node_dir = result.session_dir / "lab" / "cam"
    numbers, rows = recorded_video(node_dir)
    assert len(numbers) == len(rows) == FRAMES
    assert numbers == list(range(FRAMES)), "frames were lost, repeated or reordered on the way to the archive"
    assert [int(r["index"]) for r in rows] == list(range(FRAMES))
    times = [int(r["t_ns"]) for r in rows]
    assert times == sorted(times) and times[0] >= 0
    files = {Path(f["path"]).name: f for f in result.manifest["nodes"]["cam"]["files"]}
    assert "video.timestamps.csv" in files and files["video-0000.mp4"]["kind"] == "video"
    gray = result.manifest["nodes"]["gray"]["stats"]  # `sync: latest` may skip frames it was too busy for
    assert 0 < gray["samples_in"]["cam"] <= FRAMES


def test_realtime_looped_file_camera_runs_at_the_file_rate(registry: Registry, tmp_path: Path) -> None:
    short = write_numbered_video(tmp_path / "short.mp4", 10, fps=20.0)
    recipe = write_recipe(tmp_path, f"""
name: looped-camera
nodes:
  cam:
    type: camera
    params: {{device: {json.dumps(str(short))}, loop: true}}
    record: true
""")
    result = run(recipe, registry, tmp_path, duration_s=2.0)
    assert not result.failures
    stats = result.manifest["nodes"]["cam"]["stats"]
    assert 16 <= stats["rate_hz"] <= 24 and 25 <= stats["samples_out"] <= 50
    numbers, rows = recorded_video(result.session_dir / "lab" / "cam")
    assert len(numbers) == len(rows) == stats["samples_out"]
    assert numbers == [n % 10 for n in range(len(numbers))], "the loop skipped or repeated frames"
    gaps_ms = np.diff([int(r["t_ns"]) for r in rows]) / 1e6
    assert 40 <= float(np.median(gaps_ms)) <= 60  # 20 fps: a frame every 50 ms, like a live camera


@pytest.mark.hardware
def test_real_camera_0_delivers_what_it_reports() -> None:
    camera = started(Camera(device=0, width=640, height=480))
    samples = [out for out in (camera.step({}) for _ in range(30)) if isinstance(out, Sample)]
    settings = camera.settings()
    camera.teardown()
    assert len(samples) >= 25, "camera 0 dropped reads"
    assert {s.value.shape[:2] for s in samples} == {(settings["height"], settings["width"])}
    if settings["fps"]:
        period_ms = float(np.median(np.diff([s.t_ns for s in samples]))) / 1e6
        assert abs(period_ms - 1000 / settings["fps"]) < 0.3 * 1000 / settings["fps"]
