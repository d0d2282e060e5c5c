"""The speaker node: plays an audio input through PortAudio (the feedback layer)."""

from __future__ import annotations

import math
import queue
from typing import TYPE_CHECKING, Any

from cpcli.lazy import numpy as np
from cpcli.node import (
    DeviceError,
    DeviceInfo,
    Inputs,
    Node,
    NodeContext,
    NodeError,
    Outputs,
)
from nodes.portaudio import (
    INT_FULL_SCALE,
    MAX_BLOCKSIZE,
    MAX_CHANNELS,
    MAX_SAMPLERATE,
    MIN_QUEUE_BLOCKS,
    PREFILL_S,
    QUEUE_S,
    Throttle,
    abandon_stream,
    check_device,
    check_int,
    check_latency,
    device_infos,
    find_device,
    load_sounddevice,
)

if TYPE_CHECKING:  # annotations only: importing this module (`cp worker`) skips numpy
    import numpy.typing as npt


class Speaker(Node):
    """Plays its audio input on a sound card output: the feedback layer (a sink, no outputs).

    `samplerate`/`channels` 0 follow the input (the stream opens at the first block). Blocks are
    converted to float32: int16/int32 scaled to -1..1, floats clipped; a mono input plays on every
    channel, several channels mix down to mono, otherwise the first channels are kept. Playback
    starts once PREFILL_S of audio waits, and waits for that again after running dry: underflows
    (and PortAudio's own) are counted in `underflows`, blocks with no room in the queue in
    `blocks_dropped`; both are logged and kept in the node's `info`.
    """

    outputs = ()
    input_count = 1

    _ctx: NodeContext
    _sd: Any
    _info: dict[str, Any]
    _queue: queue.Queue[npt.NDArray[np.float32]]

    def __init__(
        self,
        *,
        device: int | str | None = None,
        samplerate: int = 0,
        channels: int = 0,
        blocksize: int = 0,
        latency: str | float = "low",
    ) -> None:
        self.device = check_device("speaker", device)
        self.samplerate = check_int("speaker samplerate (0 = the input's)", samplerate, 0, MAX_SAMPLERATE)
        self.channels = check_int("speaker channels (0 = the input's)", channels, 0, MAX_CHANNELS)
        self.blocksize = check_int("speaker blocksize (0 = PortAudio chooses)", blocksize, 0, MAX_BLOCKSIZE)
        self.latency = check_latency("speaker", latency)
        self.underflows = 0  # times the sound card wanted audio and none had arrived
        self.blocks_dropped = 0  # input blocks with no room left in the queue
        self._stream: Any = None
        self._where = "speaker"

    def setup(self, ctx: NodeContext) -> None:
        self._sd = load_sounddevice("speaker")
        self._ctx = ctx
        self._index, self._info = find_device(self._sd, self.device, "output", "speaker")
        self._where = f"speaker {self._info['name']!r} (device {self._index}) of node {ctx.node_id!r}"
        self._pending: npt.NDArray[np.float32] | None = None  # the block being played (callback thread)
        self._pos = 0
        self._playing = False
        self._block_frames = 1
        self._starved = 0  # written by the callback thread only
        self._underflow_log, self._drop_log = Throttle(), Throttle()
        if self.samplerate and self.channels:
            self._open(self.samplerate, self.channels)  # everything is known: fail now rather than later

    def step(self, inputs: Inputs) -> Outputs:
        sample = next(iter(inputs.values()))
        block = sample.value
        if not isinstance(block, np.ndarray) or block.ndim not in (1, 2) or block.size == 0:
            what = f"shape {block.shape}" if isinstance(block, np.ndarray) else type(block).__name__
            raise NodeError(f"{self._where} expects an audio block (frames x channels), got {what}")
        block = block.reshape(-1, 1) if block.ndim == 1 else block
        rate = round(sample.rate_hz) if sample.rate_hz else 0
        if self._stream is None:
            if not (self.samplerate or rate):
                raise NodeError(f"{self._where}: its input has no sample rate", hint="set samplerate: for it")
            self._open(self.samplerate or rate, self.channels or block.shape[1])
        if rate and rate != self._stream.samplerate:
            raise NodeError(f"{self._where} plays at {self._stream.samplerate:g} Hz but its input is {rate} Hz",
                            hint="leave samplerate at 0 to follow the input")
        if not self._stream.active:
            raise DeviceError(f"{self._where} stopped playing", hint="was it unplugged, or taken by another program?")
        self._count()
        out = self._convert(block, self._stream.channels)
        self._block_frames = out.shape[0]
        try:
            self._queue.put_nowait(out)
        except queue.Full:
            self.blocks_dropped += 1
            self._ctx.info["blocks_dropped"] = self.blocks_dropped
            self._ctx.info["lost"] = self.blocks_dropped
            if news := self._drop_log.add():
                self._ctx.logger.warning("%s: %d block(s) dropped, %d in all: input arrives faster than the "
                                         "sound card plays", self._where, news, self.blocks_dropped)
        return None

    def teardown(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.stop()  # plays what PortAudio already holds, then stops
            finally:
                stream.close()
            self._count()
            if self.underflows or self.blocks_dropped:  # the last ones may not have been logged yet
                self._ctx.logger.warning("%s: %d underflow(s) and %d dropped block(s) in all", self._where,
                                         self.underflows, self.blocks_dropped)

    @classmethod
    def devices(cls) -> list[DeviceInfo]:
        return device_infos("speaker", "output")

    def _open(self, samplerate: int, channels: int) -> None:
        sd = self._sd
        frames = self.blocksize or 1024  # a guess for sizing the queue when PortAudio chooses
        self._queue = queue.Queue(max(MIN_QUEUE_BLOCKS, math.ceil(QUEUE_S * samplerate / frames)))
        self._prefill_frames = PREFILL_S * samplerate
        try:
            self._stream = sd.OutputStream(
                device=self._index, samplerate=samplerate, channels=channels, blocksize=self.blocksize,
                dtype="float32", latency=self.latency, callback=self._callback)
            self._stream.start()
        except sd.PortAudioError as err:
            abandon_stream(sd, self._stream)
            self._stream = None
            raise DeviceError(
                f"{self._where} could not play {channels} channel(s) at {samplerate} Hz: {err}",
                hint=f"it offers up to {self._info['max_output_channels']} output channel(s), "
                     f"{self._info['default_samplerate']:g} Hz by default; set channels:/samplerate: to fit") from err
        self._ctx.info.update(device=self._info["name"], device_index=self._index, samplerate=samplerate,
                              channels=channels, latency_ms=round(self._stream.latency * 1e3, 3),
                              underflows=0, blocks_dropped=0)
        self._ctx.logger.info("%s: playing %d ch at %d Hz, %.1f ms output latency", self._where, channels,
                              samplerate, self._stream.latency * 1e3)

    def _count(self) -> None:
        starved = self._starved
        if starved != self.underflows:
            self.underflows = starved
            self._ctx.info["underflows"] = starved
            if news := self._underflow_log.add(starved - self._underflow_log.count):
                self._ctx.logger.warning("%s: %d underflow(s), %d in all: the input came too late, silence "
                                         "was played", self._where, news, starved)

    @staticmethod
    def _convert(block: npt.NDArray[Any], channels: int) -> npt.NDArray[np.float32]:
        if block.dtype.kind == "f":
            audio = np.clip(block, -1.0, 1.0).astype(np.float32, copy=False)
        elif block.dtype.name in INT_FULL_SCALE:
            audio = block.astype(np.float32) / np.float32(INT_FULL_SCALE[block.dtype.name])
        else:
            raise NodeError(f"speaker plays float, int16 or int32 audio, got {block.dtype}")
        have = audio.shape[1]
        if have == channels:
            return np.ascontiguousarray(audio)
        if have == 1:
            return np.repeat(audio, channels, axis=1)
        if channels == 1:
            mono: npt.NDArray[np.float32] = audio.mean(axis=1, keepdims=True, dtype=np.float32)
            return mono
        out = np.zeros((audio.shape[0], channels), np.float32)
        keep = min(have, channels)
        out[:, :keep] = audio[:, :keep]
        return out

    def _callback(self, outdata: npt.NDArray[np.float32], frames: int, time_info: Any, status: Any) -> None:
        """PortAudio's thread: fill outdata from the queue, silence where nothing waits; never block."""
        if status.output_underflow:
            self._starved += 1
        if not self._playing and self._queue.qsize() * self._block_frames >= self._prefill_frames:
            self._playing = True
        filled = 0
        while self._playing and filled < frames:
            if self._pending is None or self._pos >= len(self._pending):
                try:
                    self._pending, self._pos = self._queue.get_nowait(), 0
                except queue.Empty:
                    self._pending, self._playing = None, False
                    self._starved += 1
                    break
            n = min(frames - filled, len(self._pending) - self._pos)
            outdata[filled : filled + n] = self._pending[self._pos : self._pos + n]
            filled, self._pos = filled + n, self._pos + n
        outdata[filled:] = 0
