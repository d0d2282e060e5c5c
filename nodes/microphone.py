"""The microphone node: a sound card's input through PortAudio, stamped from its ADC clock."""

from __future__ import annotations

import math
import queue
import time
from typing import TYPE_CHECKING, Any

from cpcli.node import (
    Clock,
    DeviceError,
    DeviceInfo,
    Inputs,
    Node,
    NodeConfigError,
    NodeContext,
    Outputs,
    Sample,
)
from nodes.portaudio import (
    CLOCK_JUMP_NS,
    CLOCK_LOG_NS,
    CLOCK_READINGS,
    DTYPES,
    FIRST_BLOCK_TIMEOUT_S,
    MAX_BLOCKSIZE,
    MAX_CHANNELS,
    MAX_SAMPLERATE,
    MIN_QUEUE_BLOCKS,
    NS_PER_S,
    POLL_S,
    QUEUE_S,
    RESYNC_NS,
    SMOOTHING,
    STALL_S,
    Throttle,
    abandon_stream,
    check_device,
    check_int,
    check_latency,
    device_infos,
    find_device,
    load_sounddevice,
    to_ns,
)

if TYPE_CHECKING:  # annotations only: importing this module (`cp worker`) skips numpy
    import numpy.typing as npt


class Microphone(Node):
    """Audio from a sound card input in (frames x channels) blocks, stamped with their capture time.

    PortAudio's callback (its own thread) hands each block over with the ADC time of its first
    frame; step() returns them one by one. ADC times are on the stream's clock (on Linux/ALSA the
    wall clock), mapped onto ours with an offset measured at setup from the tightest of a few
    (stream time, monotonic) readings; each callback's own reading of the stream clock reveals a
    wall clock step, and the offset is measured again (logged). Host APIs without ADC times get
    the callback's arrival time minus the block's duration.

    A block's t_ns is the previous block's plus its frames at `samplerate`, pulled 1/SMOOTHING of
    the way towards its own ADC time: ADC times jitter by milliseconds (through PulseAudio by
    tens), the sample count does not, and the pull still follows the sound card's clock drift.
    After lost audio the timeline restarts from the ADC time, so the hole shows as a gap. Lost
    audio is never silent: PortAudio input overflows and blocks dropped because step() fell
    behind are counted (`overflows`, `blocks_dropped`, also in the node's `info`) and logged.
    """

    outputs = ("audio",)
    input_count = 0

    _clock: Clock
    _ctx: NodeContext
    _next_ns: int | None
    _queue: queue.Queue[tuple[npt.NDArray[Any], float, float, int, bool, bool]]

    def __init__(
        self,
        *,
        device: int | str | None = None,
        samplerate: int = 48000,
        channels: int = 1,
        blocksize: int = 1024,
        dtype: str = "float32",
        latency: str | float = "low",
    ) -> None:
        self.device = check_device("microphone", device)
        self.samplerate = check_int("microphone samplerate", samplerate, 1, MAX_SAMPLERATE)
        self.channels = check_int("microphone channels", channels, 1, MAX_CHANNELS)
        self.blocksize = check_int("microphone blocksize (0 = PortAudio chooses)", blocksize, 0, MAX_BLOCKSIZE)
        if dtype not in DTYPES:
            raise NodeConfigError(f"microphone dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.latency = check_latency("microphone", latency)
        self.rate_hz = 0  # step() waits for PortAudio's blocks itself
        self.overflows = 0  # PortAudio input overflows: the device had audio nobody took
        self.blocks_dropped = 0  # blocks PortAudio delivered that the queue had no room for
        self._stream: Any = None
        self._where = "microphone"

    def setup(self, ctx: NodeContext) -> None:
        sd = load_sounddevice("microphone")
        self._ctx, self._clock = ctx, ctx.clock
        index, info = find_device(sd, self.device, "input", "microphone")
        self._where = f"microphone {info['name']!r} (device {index}) of node {ctx.node_id!r}"
        block_frames = self.blocksize or 256  # a guess for sizing when PortAudio chooses
        self._queue = queue.Queue(max(MIN_QUEUE_BLOCKS, math.ceil(QUEUE_S * self.samplerate / block_frames)))
        self._lost = self._lost_put = 0  # written by the callback thread only: blocks dropped, and when last put
        self._lost_seen = 0
        self._overflow_log, self._drop_log = Throttle(), Throttle()
        try:
            self._stream = sd.InputStream(
                device=index, samplerate=self.samplerate, channels=self.channels, blocksize=self.blocksize,
                dtype=self.dtype, latency=self.latency, callback=self._callback)
            self._offset_ns = self._anchor()
            self._stream.start()
        except sd.PortAudioError as err:
            abandon_stream(sd, self._stream)
            self._stream = None
            raise DeviceError(
                f"{self._where} could not record {self.channels} channel(s) of {self.dtype} at "
                f"{self.samplerate} Hz: {err}",
                hint=f"it offers up to {info['max_input_channels']} input channel(s), "
                     f"{info['default_samplerate']:g} Hz by default; is another program using it?") from err
        try:
            self._queue.get(timeout=FIRST_BLOCK_TIMEOUT_S)
        except queue.Empty:
            abandon_stream(sd, self._stream)
            self._stream = None
            raise DeviceError(f"{self._where} sent no audio within {FIRST_BLOCK_TIMEOUT_S:g} s of starting",
                              hint="is it muted, unplugged or in use by another program?") from None
        self._stall_s = STALL_S + 2 * block_frames / self.samplerate
        self._last_block_s = -1.0  # -1: the session has not started; step() drops what came before it
        ctx.info.update(device=info["name"], device_index=index, samplerate=self.samplerate,
                        channels=self.channels, dtype=self.dtype, latency_ms=round(self._stream.latency * 1e3, 3),
                        overflows=0, blocks_dropped=0)
        ctx.logger.info("%s: recording %d ch %s at %d Hz, %.1f ms input latency", self._where, self.channels,
                        self.dtype, self.samplerate, self._stream.latency * 1e3)

    def step(self, inputs: Inputs) -> Outputs:
        if self._last_block_s < 0:  # the first step: what was captured before the session is not part of it
            while not self._queue.empty():
                self._queue.get_nowait()
            self._lost_seen = self._lost
            self._last_block_s = time.monotonic()
            self._next_ns = None  # no timeline yet: the first block starts it
        self._count_drops()
        try:
            block, adc_s, current_s, arrival_ns, overflowed, after_drop = self._queue.get(timeout=POLL_S)
        except queue.Empty:
            silent_s = time.monotonic() - self._last_block_s
            if silent_s > self._stall_s:
                state = "" if self._stream.active else " and its stream has stopped"
                raise DeviceError(f"{self._where} stopped sending audio (nothing for {silent_s:.1f} s{state})",
                                  hint="was it unplugged, or taken by another program?") from None
            return None
        self._last_block_s = time.monotonic()
        if overflowed:
            self.overflows += 1
            self._ctx.info["overflows"] = self.overflows
            self._ctx.info["lost"] = self.overflows + self.blocks_dropped
            if news := self._overflow_log.add():
                self._ctx.logger.warning("%s: %d input overflow(s), %d in all: audio was lost (a gap in the "
                                         "timestamps); the machine is too busy or blocksize too small",
                                         self._where, news, self.overflows)
        frames = block.shape[0]
        measured_ns = self._capture_ns(frames, adc_s, current_s, arrival_ns)
        predicted_ns = measured_ns if self._next_ns is None else self._next_ns
        error_ns = measured_ns - predicted_ns
        if overflowed or after_drop or abs(error_ns) > RESYNC_NS:
            local_ns = measured_ns  # a gap: the timeline continues from the ADC time
        else:
            local_ns = predicted_ns + error_ns // SMOOTHING  # frames counted, pulled towards the ADC time
        self._next_ns = local_ns + frames * NS_PER_S // self.samplerate
        return Sample(block, t_ns=self._clock.to_cluster_ns(local_ns), rate_hz=float(self.samplerate))

    def teardown(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.stop()
            finally:
                stream.close()
            if self._last_block_s >= 0:  # blocks lost before the session started are not its loss
                self._count_drops()
            if self.overflows or self.blocks_dropped:  # the last ones may not have been logged yet
                self._ctx.logger.warning("%s: %d input overflow(s) and %d dropped block(s) in all", self._where,
                                         self.overflows, self.blocks_dropped)

    @classmethod
    def devices(cls) -> list[DeviceInfo]:
        return device_infos("microphone", "input")

    def _callback(self, indata: npt.NDArray[Any], frames: int, time_info: Any, status: Any) -> None:
        """PortAudio's thread: hand the block over, never block, never log (no Python thread objects here)."""
        arrival_ns = time.monotonic_ns()
        item = (indata.copy(), time_info.inputBufferAdcTime, time_info.currentTime, arrival_ns,
                bool(status.input_overflow), self._lost != self._lost_put)
        try:
            self._queue.put_nowait(item)
            self._lost_put = self._lost
        except queue.Full:
            self._lost += 1

    def _count_drops(self) -> None:
        lost = self._lost
        if lost != self._lost_seen:
            self.blocks_dropped += lost - self._lost_seen
            self._ctx.info["blocks_dropped"] = self.blocks_dropped
            self._ctx.info["lost"] = self.overflows + self.blocks_dropped
            news = self._drop_log.add(lost - self._lost_seen)
            self._lost_seen = lost
            if news:
                self._ctx.logger.warning("%s: %d block(s) dropped, %d in all: step() fell %g s behind the "
                                         "sound card (a gap in the timestamps)", self._where, news,
                                         self.blocks_dropped, QUEUE_S)

    def _capture_ns(self, frames: int, adc_s: float, current_s: float, arrival_ns: int) -> int:
        """Local monotonic ns of a block's first frame."""
        if adc_s <= 0:  # no ADC time from this host API: the block was complete when its callback ran
            return arrival_ns - frames * NS_PER_S // self.samplerate
        if current_s > 0:
            seen_ns = arrival_ns - to_ns(current_s)  # this callback's own (later by its wake-up) offset
            if abs(seen_ns - self._offset_ns) > CLOCK_JUMP_NS:
                before, self._offset_ns = self._offset_ns, self._anchor()
                if abs(self._offset_ns - before) > CLOCK_LOG_NS:
                    self._ctx.logger.warning("%s: PortAudio's clock jumped by %.3f s against ours (a wall "
                                             "clock step?); timestamps re-anchored", self._where,
                                             (before - self._offset_ns) / NS_PER_S)
        return self._offset_ns + to_ns(adc_s)

    def _anchor(self) -> int:
        """Offset from the stream's clock to our monotonic clock (local = offset + stream), best of a few."""
        best_span, best_offset = math.inf, 0
        for _ in range(CLOCK_READINGS):
            before = time.monotonic_ns()
            stream_s = self._stream.time
            after = time.monotonic_ns()
            if after - before < best_span:
                best_span, best_offset = after - before, (before + after) // 2 - to_ns(stream_s)
        return best_offset
