"""The camera source: frames from a webcam, a /dev/videoN node, an IP camera URL or a video file."""

from __future__ import annotations

import glob
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpcli.lazy import numpy as np
from cpcli.node import Clock, DeviceError, DeviceInfo, Inputs, Node, NodeConfigError, NodeContext, Outputs, Sample

MAX_WIDTH, MAX_HEIGHT = 7680, 4320  # 8K UHD: the largest frame any camera we target produces
MAX_FPS = 1000.0  # high-speed USB cameras reach a few hundred; more is a typo
MAX_INDEX = 63  # OpenCV indexes beyond this are backend-offset codes, not cameras
# Backends a recipe may name; each maps to cv2.CAP_<NAME> where this OpenCV build has it.
BACKENDS = ("any", "v4l2", "ffmpeg", "gstreamer", "dshow", "msmf", "avfoundation")
URL_RE = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)  # rtsp://, http(s)://, udp://, ...
DEV_VIDEO_RE = re.compile(r"^/dev/video(\d+)$")
OPEN_TIMEOUT_MS = 10_000  # a URL that does not answer fails setup() after this, not the ready timeout
READ_TIMEOUT_MS = 5_000  # a network stream that stalls this long makes read() fail
MAX_FAILED_READS = 5  # failed reads in a row that mean a device stopped (one glitch is forgiven)
NO_FRAME_TIMEOUT_S = 5.0  # ... or this long without a frame: a stalled V4L2 read alone blocks ~10 s
MAX_STALE_FRAMES = 8  # V4L2 queues a few frames while the session starts; more is a camera that never blocks
STALE_GRAB_S = 0.004  # a grab that returns sooner than this took a queued (old) frame, not a fresh one
ENDED_IDLE_S = 0.05  # an ended file read as fast as possible: sleep instead of spinning a core
FALLBACK_FILE_FPS = 30.0  # a file that states no frame rate plays at this rate
PROBE_LINUX_MAX = 10  # `cp devices` looks at /dev/video0 .. /dev/video9
PROBE_OTHER_MAX = 4  # elsewhere no node tells which indexes exist: try 0..3
PROBE_BUDGET_S = 3.0  # `cp devices` stops probing cameras after this long

if TYPE_CHECKING:  # annotations only: importing this module (`cp worker`, `cp devices`) skips numpy
    import numpy.typing as npt

    Frame = npt.NDArray[np.uint8]


def _check_int(what: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise NodeConfigError(f"{what} must be an integer in {low}..{high}, got {value!r}")
    return value


def _device_index(device: str) -> int | None:
    """The camera index behind `/dev/videoN` or a udev link to it (/dev/v4l/by-id/...), else None."""
    match = DEV_VIDEO_RE.match(os.path.realpath(device)) or DEV_VIDEO_RE.match(device)
    return int(match.group(1)) if match else None


def _linux_name(index: int) -> str:
    """The V4L2 driver's name for /dev/videoN, read from sysfs without opening the device."""
    try:
        return Path(f"/sys/class/video4linux/video{index}/name").read_text(encoding="utf-8").strip()
    except OSError:
        return f"/dev/video{index}"


class Camera(Node):
    """Grab BGR frames from a camera index, /dev/videoN, an IP camera URL or a video file.

    `width`, `height` and `fps` are requested from a live camera (0 keeps its default); what it
    actually delivers is logged and kept in `actual_width`, `actual_height`, `actual_fps` and
    `settings()`. A file plays at its own rate like a live camera (`realtime: false` reads it
    as fast as possible, `loop: true` starts it again at its end); after its end without
    `loop` the node sends nothing more and the session goes on. `fourcc` asks a live camera
    for a pixel format (e.g. MJPG, which USB cameras need for large frames at full rate).
    Frames are stamped when they are grabbed, before they are decoded.
    """

    outputs = ("video",)
    input_count = 0

    actual_width: int
    actual_height: int
    actual_fps: float | None

    _capture: Any  # cv2.VideoCapture while set up, else None
    _clock: Clock
    _log: logging.Logger
    _played: int  # frames sent since setup()
    _pending: Frame | None  # a file's first frame, read in setup() to prove it is a video
    _ended: bool
    _failed_reads: int
    _last_frame_s: float
    _fresh: bool  # a live camera's queue has been emptied of frames from before the start

    def __init__(
        self,
        *,
        device: int | str = 0,
        width: int = 0,
        height: int = 0,
        fps: float = 0.0,
        loop: bool = False,
        realtime: bool = True,
        backend: str = "any",
        fourcc: str = "",
    ) -> None:
        self.device = device
        self.kind, self.index, self.path = self._classify(device)
        self.width = _check_int("camera width (0 = the camera's default)", width, 0, MAX_WIDTH)
        self.height = _check_int("camera height (0 = the camera's default)", height, 0, MAX_HEIGHT)
        fps_ok = isinstance(fps, (int, float)) and not isinstance(fps, bool) and math.isfinite(fps)
        if not fps_ok or not 0 <= fps <= MAX_FPS:
            raise NodeConfigError(f"camera fps must be a number in 0..{MAX_FPS:g} (0 = the camera's default), "
                                  f"got {fps!r}")
        self.fps = float(fps)
        for name, flag in (("loop", loop), ("realtime", realtime)):
            if not isinstance(flag, bool):
                raise NodeConfigError(f"camera {name} must be true or false, got {flag!r}")
        self.loop, self.realtime = loop, realtime
        if not isinstance(backend, str) or backend.lower() not in BACKENDS:
            raise NodeConfigError(f"camera backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = backend.lower()
        if not isinstance(fourcc, str) or len(fourcc) not in (0, 4) or not fourcc.isascii():
            raise NodeConfigError(f"camera fourcc must be 4 characters such as MJPG or YUYV (or empty), got {fourcc!r}")
        self.fourcc = fourcc
        self.rate_hz = 0.0  # a live camera's read() blocks at its own rate; a file's rate is known in setup()
        self.actual_width, self.actual_height, self.actual_fps = 0, 0, None
        self._capture = None
        self._where = "this machine"
        self._backend_name = ""
        self._frame_count = 0
        self._settings: dict[str, Any] = {}

    @staticmethod
    def _classify(device: object) -> tuple[str, int, str]:
        """(kind, index, path) of a `device` param: kind is "index", "url" or "file"."""
        if isinstance(device, int) and not isinstance(device, bool):
            if not 0 <= device <= MAX_INDEX:
                raise NodeConfigError(f"camera device index must be in 0..{MAX_INDEX}, got {device}")
            return "index", device, ""
        if not isinstance(device, str) or not device.strip():
            raise NodeConfigError(
                f"camera device must be an index (0), /dev/videoN, a URL or a video file path, got {device!r}"
            )
        text = device.strip()
        if text.isdigit():
            return Camera._classify(int(text))
        if URL_RE.match(text):
            return "url", -1, text
        if text.startswith("/dev/"):  # a device node: whether it is there is setup()'s question
            index = _device_index(text)
            return ("index", index, text) if index is not None else ("file", -1, text)
        path = Path(text).expanduser()
        if "%" not in text and not path.is_file():  # "%04d" names an image sequence, not one file
            what = "is a folder, not a video file" if path.is_dir() else "does not exist"
            raise NodeConfigError(f"camera device {text!r} {what} (looked at {path.absolute()}); give a camera "
                                  f"index such as 0, /dev/videoN, an rtsp:// or http:// URL, or a video file")
        return "file", -1, str(path)

    # -- lifecycle ---------------------------------------------------------------------------

    def setup(self, ctx: NodeContext) -> None:
        self._clock, self._log, self._ctx = ctx.clock, ctx.logger, ctx
        self._shape: tuple[int, ...] | None = None  # of the last frame, to decode the next one in place
        self._where = "this machine" if ctx.worker == "local" else ctx.worker
        self._pending, self._ended, self._fresh, self._played = None, False, False, 0
        self._failed_reads, self._last_frame_s = 0, time.monotonic()
        self._open()
        try:
            frame = self._first_frame()
            height, width = frame.shape[:2]
            self.actual_width, self.actual_height = width, height
            if self.kind == "file":
                self._pending = frame  # played in the first step: a file loses no frame
                self.rate_hz = (self.actual_fps or FALLBACK_FILE_FPS) if self.realtime else 0.0
                if self.actual_fps is None:
                    ctx.logger.warning("%s states no frame rate: playing it at %g fps", self._name(),
                                       FALLBACK_FILE_FPS)
                if self.width or self.height or self.fps or self.fourcc:
                    ctx.logger.warning("%s plays at its own size and rate: width, height, fps and fourcc are "
                                       "for cameras and are ignored", self._name())
            else:
                self._check_request(ctx)
        except BaseException:
            self.teardown()
            raise
        self._settings = self._snapshot()
        ctx.info.update(self._settings)  # the actual size and rate go into the manifest
        ctx.logger.info("%s opened: %s", self._name(), self._describe())

    def step(self, inputs: Inputs) -> Outputs:
        if self._pending is not None:
            frame, self._pending = self._pending, None
            self._played += 1
            return Sample(frame, t_ns=self._clock.now_ns(), rate_hz=self.actual_fps)
        if self._ended:
            if not self.rate_hz:
                time.sleep(ENDED_IDLE_S)
            return None
        if self.kind != "file" and not self._fresh:
            self._skip_stale()
        return self._grab()

    def teardown(self) -> None:
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.release()
        self._pending = None

    def settings(self) -> dict[str, Any]:
        """What the device actually delivers (JSON-able, for the manifest); still there after `teardown()`."""
        return dict(self._settings)

    def _snapshot(self) -> dict[str, Any]:
        import cv2

        found: dict[str, Any] = {"source": self.kind, "width": self.actual_width, "height": self.actual_height,
                                 "fps": self.actual_fps, "backend": self._backend_name}
        if self.kind == "file":
            found["frame_count"] = self._frame_count
            found["rate_hz"] = self.rate_hz  # what it plays at; 0 = as fast as possible
            return found
        code = int(self._capture.get(cv2.CAP_PROP_FOURCC))  # the pixel format the camera chose
        fourcc = "".join(chr((code >> shift) & 0xFF) for shift in (0, 8, 16, 24))
        if code and fourcc.isprintable():
            found["fourcc"] = fourcc
        return found

    # -- opening -----------------------------------------------------------------------------

    def _name(self) -> str:
        return f"video file {self.path}" if self.kind == "file" else f"camera {self.path or self.index}"

    def _api(self) -> int:
        import cv2

        if self.backend == "any":
            return int(cv2.CAP_ANY)
        api = getattr(cv2, f"CAP_{self.backend.upper()}", None)
        if api is None or not cv2.videoio_registry.hasBackend(api):
            names = sorted({cv2.videoio_registry.getBackendName(b) for b in cv2.videoio_registry.getBackends()})
            raise DeviceError(f"this OpenCV build ({cv2.__version__}) on {self._where} has no {self.backend} "
                              f"video backend; it has {', '.join(names).lower()} (or use backend: any)")
        return int(api)

    def _open(self) -> None:
        import cv2

        api = self._api()
        if self.kind == "index":
            node = f"/dev/video{self.index}"
            if sys.platform.startswith("linux") and not os.path.exists(node):
                raise DeviceError(f"camera {self.index} is not on {self._where} (there is no {node}); is it plugged "
                                  f"in? `cp devices` lists the cameras here")
            capture = cv2.VideoCapture(self.index, api)
        else:
            params = [int(cv2.CAP_PROP_OPEN_TIMEOUT_MSEC), OPEN_TIMEOUT_MS,
                      int(cv2.CAP_PROP_READ_TIMEOUT_MSEC), READ_TIMEOUT_MS] if self.kind == "url" else []
            capture = cv2.VideoCapture(self.path, api, params)
        if not capture.isOpened():
            capture.release()
            raise self._open_error()
        self._capture = capture
        self._backend_name = capture.getBackendName()
        if self.kind != "file":
            self._request(capture)
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        self.actual_fps = fps if math.isfinite(fps) and 0 < fps <= MAX_FPS else None
        self._frame_count = max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT)))

    def _open_error(self) -> DeviceError:
        if self.kind == "index":
            return DeviceError(f"camera {self.index} could not be opened on {self._where}; is another program "
                               f"using it? `cp devices` lists the cameras here")
        if self.kind == "url":
            return DeviceError(f"camera {self.path} could not be opened from {self._where}; is the address right "
                               f"and the camera on the network?")
        return DeviceError(f"{self.path} is not a video OpenCV can read on {self._where}")

    def _request(self, capture: Any) -> None:
        """Ask a live camera for the format, size and rate of the recipe (it may choose others)."""
        import cv2

        if self.fourcc:  # first: which sizes and rates a camera offers depends on the pixel format
            capture.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*self.fourcc))
        for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, self.width), (cv2.CAP_PROP_FRAME_HEIGHT, self.height),
                            (cv2.CAP_PROP_FPS, self.fps)):
            if value:
                capture.set(prop, value)

    def _first_frame(self) -> Frame:
        """Read one frame: a camera that opens but sends nothing (busy, a metadata node) fails here."""
        ok, image = self._capture.read()
        frame = self._as_frame(image) if ok else None
        if frame is None:
            if self.kind == "file":
                raise DeviceError(f"{self.path} is not a video OpenCV can read on {self._where} "
                                  f"(it opened but gave no frame)")
            raise DeviceError(f"{self._name()} opened on {self._where} but sent no frame; is another program using "
                              f"it? `cp devices` lists the cameras here")
        self._last_frame_s = time.monotonic()
        return frame

    def _check_request(self, ctx: NodeContext) -> None:
        off = [f"{what} {want:g} requested, {got or 'unknown'} given" for what, want, got in (
            ("width", self.width, self.actual_width), ("height", self.height, self.actual_height),
            ("fps", self.fps, self.actual_fps)) if want and (got is None or abs(float(got) - want) > 0.5)]
        if off:  # cameras round a request to a mode they have: the recording says what they gave
            ctx.logger.warning("%s does not deliver what the recipe asks: %s", self._name(), ", ".join(off))

    def _describe(self) -> str:
        fps = f"{self.actual_fps:g} fps" if self.actual_fps else "unknown fps"
        text = f"{self.actual_width}x{self.actual_height} at {fps} through {self._backend_name}"
        if self.kind == "file":
            pace = f"played at {self.rate_hz:g} fps" if self.rate_hz else "read as fast as possible"
            return f"{text}, {self._frame_count} frames, {pace}{', looped' if self.loop else ''}"
        return f"{text} ({self._settings['fourcc']})" if "fourcc" in self._settings else text

    # -- grabbing ----------------------------------------------------------------------------

    @staticmethod
    def _as_frame(image: Any) -> Frame | None:
        """The image as a video frame (BGR, or gray); a 4-channel image loses its alpha."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.size == 0:
            return None
        if image.ndim == 3 and image.shape[2] == 4:
            image = np.ascontiguousarray(image[:, :, :3])
        elif image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        frame: Frame = image
        return frame if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 3) else None

    def _skip_stale(self) -> None:
        """Drop frames a live camera queued before the session started, so stamps are not late."""
        self._fresh = True
        for _ in range(MAX_STALE_FRAMES):
            started = time.monotonic()
            if not self._capture.grab() or time.monotonic() - started >= STALE_GRAB_S:
                return  # that grab waited for the camera: the queue is empty now

    def _grab(self) -> Outputs:
        ok = self._capture.grab()
        t_ns = self._clock.now_ns()  # the frame exists now; decoding it below takes time
        frame = None
        if ok:
            if self._shape is not None:  # decoded straight into the buffer it is sent from
                ok, image = self._capture.retrieve(self._ctx.output_buffer("video", self._shape))
            else:
                ok, image = self._capture.retrieve()
            frame = self._as_frame(image) if ok else None
            self._shape = frame.shape if frame is image and frame is not None else None
        if frame is not None:
            self._failed_reads, self._last_frame_s = 0, time.monotonic()
            self._played += 1
            return Sample(frame, t_ns=t_ns, rate_hz=self.actual_fps)
        if self.kind == "file":
            return self._file_ended()
        self._failed_reads += 1
        silent_s = time.monotonic() - self._last_frame_s
        if self._failed_reads >= MAX_FAILED_READS or silent_s >= NO_FRAME_TIMEOUT_S:
            raise DeviceError(f"{self._name()} stopped sending frames on {self._where} ({self._failed_reads} failed "
                              f"reads, none for {silent_s:.1f} s); was it unplugged or taken by another program?")
        return None

    def _file_ended(self) -> Outputs:
        if self.loop:  # reopen rather than seek: seeking to frame 0 is unreliable in some containers
            self.teardown()
            self._open()
            frame = self._first_frame()
            self._played += 1
            return Sample(frame, t_ns=self._clock.now_ns(), rate_hz=self.actual_fps)
        self._ended = True  # the session goes on: other sources and the recordings are not ours to end
        self._log.info("%s ended after %d frames; this camera sends nothing more (loop: true repeats it)",
                       self._name(), self._played)
        return None

    # -- cp devices --------------------------------------------------------------------------

    @classmethod
    def devices(cls) -> list[DeviceInfo]:
        """Cameras that open here: /dev/video0..9 that exist on Linux (never opening absent ones), else 0..3."""
        if sys.platform.startswith("linux"):
            found = sorted(int(m.group(1)) for p in glob.glob("/dev/video*") if (m := DEV_VIDEO_RE.match(p)))
            indexes = [i for i in found if i < PROBE_LINUX_MAX]
        else:
            indexes = list(range(PROBE_OTHER_MAX))
        if not indexes:
            return []
        import cv2

        api = int(cv2.CAP_V4L2) if sys.platform.startswith("linux") else int(cv2.CAP_ANY)
        deadline = time.monotonic() + PROBE_BUDGET_S
        cameras = []
        for index in indexes:
            if time.monotonic() > deadline:
                break
            capture = cv2.VideoCapture(index, api)
            try:
                if not capture.isOpened():
                    continue  # a metadata node of a camera, or one in use
                fps = float(capture.get(cv2.CAP_PROP_FPS))
                details = {"width": int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                           "height": int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                           "fps": fps if math.isfinite(fps) and fps > 0 else None,
                           "backend": capture.getBackendName()}
            finally:
                capture.release()
            name = _linux_name(index) if sys.platform.startswith("linux") else f"camera {index}"
            cameras.append(DeviceInfo(kind="camera", device=str(index), name=name, details=details))
        return cameras
