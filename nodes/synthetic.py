"""Synthetic sources that stand in for a camera and a microphone: test_video and test_audio."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from cpcli.lazy import numpy as np
from cpcli.node import Clock, Inputs, Node, NodeConfigError, NodeContext, Outputs, Sample

if TYPE_CHECKING:  # annotations only: importing this module (`cp worker`) skips numpy
    import numpy.typing as npt

MAX_WIDTH, MAX_HEIGHT = 7680, 4320  # 8K UHD: the largest frame any camera we target produces
MIN_SIDE = 16  # below this the frame number cannot be drawn legibly
PRECOMPUTED_MAX_BYTES = 2 << 30  # a benchmark needs a few hundred frames, not all of the machine's memory
NS_PER_S = 1_000_000_000
INT16_FULL_SCALE = 32767  # amplitude 1.0 maps to the largest int16 that does not wrap
MAX_CHANNELS = 64
MAX_SAMPLERATE = 1_000_000
MAX_BLOCKSIZE = 1 << 20
AUDIO_DTYPES = ("float32", "int16")
TAU = 2.0 * math.pi


def _check_int(what: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise NodeConfigError(f"{what} must be an integer in {low}..{high}, got {value!r}")
    return value


def _check_number(what: str, value: object, low: float, high: float = math.inf) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and low <= number <= high:
            return number
    limit = f"at least {low:g}" if high == math.inf else f"in {low:g}..{high:g}"
    raise NodeConfigError(f"{what} must be a finite number {limit}, got {value!r}")


class TestVideo(Node):
    """Moving colour pattern with the frame number drawn in: a camera for tests and benchmarks.

    Each BGR frame shows a gradient that scrolls right by width/160 pixels per frame, a white
    bar that scrolls with it, and the frame number in the top-left corner, so a recording can
    be checked by eye. Each frame is drawn straight into the buffer it is sent from. With
    `precomputed` > 0 the frames are drawn once in `setup()` (into shared memory, as constants)
    and cycled (their numbers repeat), so the source costs nothing per frame in a benchmark;
    `copy: true` copies each of them into the buffer it is sent from instead, as a camera
    writes every frame (a benchmark of one write per frame).
    """

    __test__ = False  # not a pytest test class despite its name
    outputs = ("video",)
    input_count = 0

    _clock: Clock
    _ctx: NodeContext
    _base: npt.NDArray[np.uint8]
    _frames: tuple[npt.NDArray[np.uint8], ...]
    _index: int

    def __init__(
        self, *, width: int = 640, height: int = 480, rate_hz: float = 30.0, precomputed: int = 0, copy: bool = False
    ) -> None:
        self.width = _check_int("test_video width", width, MIN_SIDE, MAX_WIDTH)
        self.height = _check_int("test_video height", height, MIN_SIDE, MAX_HEIGHT)
        self.rate_hz = _check_number("test_video rate_hz (0 = as fast as possible)", rate_hz, 0.0)
        self.precomputed = _check_int("test_video precomputed", precomputed, 0, 2**31 - 1)
        if not isinstance(copy, bool):
            raise NodeConfigError(f"test_video copy must be true or false, got {copy!r}")
        if copy and not precomputed:
            raise NodeConfigError("test_video copy: true copies precomputed frames; set precomputed too")
        self.copy = copy
        frame_bytes = width * height * 3
        if precomputed * frame_bytes > PRECOMPUTED_MAX_BYTES:
            raise NodeConfigError(
                f"test_video precomputed={precomputed} frames of {width}x{height} need "
                f"{precomputed * frame_bytes / 2**30:.1f} GiB, more than the "
                f"{PRECOMPUTED_MAX_BYTES / 2**30:.0f} GiB allowed; use fewer or smaller frames"
            )
        self._shift = max(1, width // 160)  # pixels per frame: a cycle takes about 160 frames

    def setup(self, ctx: NodeContext) -> None:
        import cv2  # noqa: F401  # loaded now, before the session starts, not in the first step
        self._clock, self._ctx = ctx.clock, ctx
        self._index = 0
        self._base = self._draw_base()
        shape = (self.height, self.width, 3)
        # handed out again and again, read-only: written to shared memory once, never copied again
        frames = (self._draw(i, np.empty(shape, np.uint8)) for i in range(self.precomputed))
        if self.copy:  # copied from each step: private, read-only
            self._frames = tuple(frames)
            for frame in self._frames:
                frame.flags.writeable = False
        else:
            self._frames = tuple(map(ctx.constant, frames))
        if self._frames:
            self._base = np.empty((0, 0, 3), np.uint8)  # never drawn from again

    def step(self, inputs: Inputs) -> Outputs:
        t_ns = self._clock.now_ns()  # the instant this frame stands for
        index, self._index = self._index, self._index + 1
        if self._frames and self.copy:
            frame = self._ctx.output_buffer("video", (self.height, self.width, 3))
            np.copyto(frame, self._frames[index % len(self._frames)])
        elif self._frames:
            frame = self._frames[index % len(self._frames)]
        else:
            frame = self._draw(index, self._ctx.output_buffer("video", (self.height, self.width, 3)))
        return Sample(frame, t_ns=t_ns, rate_hz=self.rate_hz or None)

    def teardown(self) -> None:
        self._base = np.empty((0, 0, 3), np.uint8)
        self._frames = ()

    def _draw_base(self) -> npt.NDArray[np.uint8]:
        """Two periods of the pattern side by side, so any frame is one slice of it."""
        w, h = self.width, self.height
        x = np.arange(2 * w) % w
        saw = (x * 256 // w).astype(np.uint8)
        base = np.empty((h, 2 * w, 3), np.uint8)
        base[:, :, 0] = saw
        base[:, :, 1] = (np.arange(h) * 256 // h).astype(np.uint8)[:, None]
        base[:, :, 2] = 255 - saw
        bar = x < max(2, w // 32)
        base[:, bar] = 255
        return base

    def _draw(self, index: int, frame: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """Frame `index`, drawn into `frame` (height x width x 3)."""
        import cv2

        w = self.width
        start = w - (index * self._shift) % w  # the slice moves left, so the pattern moves right
        np.copyto(frame, self._base[:, start : start + w])
        scale = max(0.3, self.height / 480.0)
        thickness = max(1, round(scale * 2))
        text = str(index)
        (text_w, text_h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        pad = max(2, text_h // 4)
        cv2.rectangle(frame, (0, 0), (text_w + 2 * pad, text_h + baseline + 2 * pad), (0, 0, 0), -1)
        cv2.putText(
            frame,
            text,
            (pad, pad + text_h),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (255, 255, 255),
            thickness,
            cv2.LINE_AA,
        )
        return frame


class TestAudio(Node):
    """Sine tone in (blocksize x channels) blocks, paced and stamped like a sound card.

    Every channel carries the same sine; its phase runs on across blocks. A block's t_ns is
    the capture time of its first frame on an ideal sound-card clock that starts one block
    before the first step (a block is complete only once it has been captured).
    """

    __test__ = False  # not a pytest test class despite its name
    outputs = ("audio",)
    input_count = 0

    _clock: Clock
    _ramp: npt.NDArray[np.float64]
    _block_phase: float
    _phase: float
    _index: int
    _t0_ns: int

    def __init__(
        self,
        *,
        samplerate: int = 48000,
        channels: int = 1,
        blocksize: int = 1024,
        frequency_hz: float = 440.0,
        amplitude: float = 0.5,
        dtype: str = "float32",
    ) -> None:
        self.samplerate = _check_int("test_audio samplerate", samplerate, 1, MAX_SAMPLERATE)
        self.channels = _check_int("test_audio channels", channels, 1, MAX_CHANNELS)
        self.blocksize = _check_int("test_audio blocksize", blocksize, 1, MAX_BLOCKSIZE)
        self.amplitude = _check_number("test_audio amplitude", amplitude, 0.0, 1.0)
        nyquist = samplerate / 2
        ok = isinstance(frequency_hz, (int, float)) and not isinstance(frequency_hz, bool)
        if not ok or not 0 < frequency_hz < nyquist:
            raise NodeConfigError(
                f"test_audio frequency_hz must be above 0 and below the Nyquist frequency "
                f"(samplerate/2 = {nyquist:g}), got {frequency_hz!r}"
            )
        self.frequency_hz = float(frequency_hz)
        if dtype not in AUDIO_DTYPES:
            raise NodeConfigError(f"test_audio dtype must be one of {', '.join(AUDIO_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.rate_hz = samplerate / blocksize  # one block per step, like a sound card's callback

    def setup(self, ctx: NodeContext) -> None:
        self._clock = ctx.clock
        per_frame = TAU * self.frequency_hz / self.samplerate
        self._ramp = per_frame * np.arange(self.blocksize, dtype=np.float64)
        self._block_phase = math.fmod(per_frame * self.blocksize, TAU)
        self._phase = 0.0
        self._index = 0
        self._t0_ns = 0

    def step(self, inputs: Inputs) -> Outputs:
        if self._index == 0:
            self._t0_ns = self._clock.now_ns() - self.blocksize * NS_PER_S // self.samplerate
        # From the block index, in integers: the timeline never drifts from the sample count.
        t_ns = self._t0_ns + self._index * self.blocksize * NS_PER_S // self.samplerate
        self._index += 1
        mono = np.sin(self._phase + self._ramp)
        mono *= self.amplitude
        self._phase = math.fmod(self._phase + self._block_phase, TAU)  # stay small: no precision loss
        block = np.empty((self.blocksize, self.channels), np.dtype(self.dtype))
        if self.dtype == "int16":
            mono = np.rint(mono * INT16_FULL_SCALE)
        block[:] = mono[:, None]
        return Sample(block, t_ns=t_ns, rate_hz=float(self.samplerate))

    def teardown(self) -> None:
        self._ramp = np.empty(0, np.float64)


class Discard(Node):
    """Take any inputs and keep nothing: a sink for benchmarks and tests (its stats count what arrived)."""

    outputs = ()
    input_count = None

    def step(self, inputs: Inputs) -> Outputs:
        return None
