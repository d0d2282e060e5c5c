"""A third-party node plugin used by cpcli's tests: registered through its own dist-info only."""

from __future__ import annotations

import time
from typing import Any

from cpcli.node import DeviceError, Inputs, Node, NodeConfigError, NodeContext, NodeError, Outputs, Sample


class Counter(Node):
    """Count up: a table row {"n": i} per step, at rate_hz (0 = as fast as possible)."""

    outputs = ("count",)
    input_count = 0

    def __init__(self, *, rate_hz: float = 100.0, limit: int = 0) -> None:
        if rate_hz < 0:
            raise NodeConfigError(f"rate_hz must be 0 or more, got {rate_hz}")
        self.rate_hz = rate_hz
        self.limit = limit
        self._n = 0

    def setup(self, ctx: NodeContext) -> None:
        self._clock = ctx.clock

    def step(self, inputs: Inputs) -> Outputs:
        if self.limit and self._n >= self.limit:
            return None
        self._n += 1
        return Sample({"n": self._n - 1}, t_ns=self._clock.now_ns())


class FailSetup(Node):
    """Fail in setup() like a camera that is not plugged in."""

    outputs = ("out",)
    input_count = 0

    def setup(self, ctx: NodeContext) -> None:
        raise DeviceError("test device 7 could not be opened; is it plugged in?")


class FailStep(Node):
    """Pass inputs through, then raise in step() after `after` steps."""

    outputs = ("out",)
    input_count = 1

    def __init__(self, *, after: int = 5) -> None:
        self.after = after
        self._steps = 0

    def step(self, inputs: Inputs) -> Outputs:
        self._steps += 1
        if self._steps > self.after:
            raise ZeroDivisionError("the test node divided by zero on purpose")
        return Sample(dict(next(iter(inputs.values())).value))


class Slow(Node):
    """Sleep `delay_ms` in every step: a consumer that cannot keep up."""

    outputs = ("out",)
    input_count = 1

    def __init__(self, *, delay_ms: float = 50.0) -> None:
        self.delay_ms = delay_ms

    def step(self, inputs: Inputs) -> Outputs:
        time.sleep(self.delay_ms / 1000)
        return None


class SeqCheck(Node):
    """Record, per step, the received sequence numbers and values of every input as a table row."""

    outputs = ("seen",)
    input_count = None

    def step(self, inputs: Inputs) -> Outputs:
        row: dict[str, object] = {}
        for key, sample in sorted(inputs.items()):
            row[f"{key}_seq"] = sample.seq
            row[f"{key}_t_ns"] = sample.t_ns
        return Sample(row)


class Stubborn(Node):
    """Ignore stopping: its step() blocks for `block_s` seconds (a hung device driver)."""

    outputs = ("out",)
    input_count = 0

    def __init__(self, *, block_s: float = 60.0) -> None:
        self.block_s = block_s
        self.rate_hz = 10.0

    def step(self, inputs: Inputs) -> Outputs:
        time.sleep(self.block_s)
        return None


class Pattern(Node):
    """Frames whose every byte is derived from the frame number: a torn frame cannot pass `verify`."""

    outputs = ("video",)
    input_count = 0

    def __init__(self, *, width: int = 640, height: int = 480, rate_hz: float = 0.0, lend: bool = False,
                 spoil: bool = False, keep: bool = False) -> None:
        """`lend`: build each frame in `ctx.output_buffer`; `spoil`: also take a second buffer every
        step, scribble over it and never return it (it must be taken back, unseen by readers);
        `keep`: also keep the last 3 sent frames and an unsent buffer (against the rules) and check
        every step that nothing was written over them (a kept buffer must never be lent again)."""
        self.width, self.height, self.rate_hz = width, height, rate_hz
        self.lend, self.spoil, self.keep = lend, spoil, keep
        self._n = 0
        self._kept: list[tuple[int, Any]] = []

    def setup(self, ctx: NodeContext) -> None:
        self._ctx = ctx

    def step(self, inputs: Inputs) -> Outputs:
        import numpy as np

        shape = (self.height, self.width, 3)
        if self.spoil:
            self._ctx.output_buffer("video", shape).fill(255)
        frame = self._ctx.output_buffer("video", shape) if self.lend else np.empty(shape, np.uint8)
        frame.fill(self._n % 251)
        frame.reshape(-1)[:8] = np.frombuffer(np.int64(self._n).tobytes(), dtype=np.uint8)
        if self.keep:
            for fill, kept in self._kept:
                if not np.all(kept.reshape(-1)[8:] == fill):
                    raise NodeError(f"a kept buffer (filled with {fill}) was written over")
            unsent = self._ctx.output_buffer("video", shape)
            unsent.fill(252)
            self._kept = [*self._kept[-3:], (self._n % 251, frame), (252, unsent)][-4:]
        self._n += 1
        return frame


class Blocks(Node):
    """float32 blocks built in lent buffers, every sample of block n equal to n: a recording that
    lost its hold on a slot (rewritten before it was written to the WAV) cannot pass for intact."""

    outputs = ("audio",)
    input_count = 0

    def __init__(self, *, frames: int = 4096, channels: int = 8, rate_hz: float = 0.0) -> None:
        self.frames, self.channels, self.rate_hz = frames, channels, rate_hz
        self._n = 0

    def setup(self, ctx: NodeContext) -> None:
        self._ctx = ctx

    def step(self, inputs: Inputs) -> Outputs:
        block = self._ctx.output_buffer("audio", (self.frames, self.channels), "float32")
        block.fill(float(self._n))
        self._n += 1
        return Sample(block, rate_hz=48000.0)


class Stills(Node):
    """Cycles `count` constant frames (`ctx.constant`), each filled with its index: sent again and again."""

    outputs = ("video",)
    input_count = 0

    def __init__(self, *, count: int = 3, width: int = 320, height: int = 240, rate_hz: float = 0.0) -> None:
        self.count, self.width, self.height, self.rate_hz = count, width, height, rate_hz
        self._n = 0

    def setup(self, ctx: NodeContext) -> None:
        import numpy as np

        self._frames = [ctx.constant(np.full((self.height, self.width, 3), i, np.uint8)) for i in range(self.count)]

    def step(self, inputs: Inputs) -> Outputs:
        frame = self._frames[self._n % self.count]
        self._n += 1
        return frame


class StillCheck(Node):
    """A table row per `stills` frame: its sequence number, and whether it is uniformly seq % count."""

    outputs = ("check",)
    input_count = 1

    def __init__(self, *, count: int = 3) -> None:
        self.count = count

    def step(self, inputs: Inputs) -> Outputs:
        import numpy as np

        sample = next(iter(inputs.values()))
        frame = np.asarray(sample.value)
        return Sample({"seq": sample.seq, "ok": bool(np.all(frame == sample.seq % self.count))})


class Verify(Node):
    """Check each `pattern` frame at the start and the end of a slow step: it must not change."""

    outputs = ("check",)
    input_count = 1

    def __init__(self, *, delay_ms: float = 0.0) -> None:
        self.delay_ms = delay_ms

    @staticmethod
    def _intact(frame: object) -> tuple[int, bool]:
        import numpy as np

        flat = np.asarray(frame).reshape(-1)
        n = int(flat[:8].view(np.int64)[0])
        return n, bool(np.all(flat[8:] == n % 251))

    def step(self, inputs: Inputs) -> Outputs:
        sample = next(iter(inputs.values()))
        n, ok_start = self._intact(sample.value)
        if self.delay_ms:
            time.sleep(self.delay_ms / 1000)
        n_end, ok_end = self._intact(sample.value)
        return Sample({"seq": sample.seq, "n": n, "ok": ok_start and ok_end and n == n_end})


class WallClock(Node):
    """The wall clock (CLOCK_REALTIME, shared by every time namespace) beside the framework's stamp.

    A table row {"realtime_ns", "spread_ns"} per step, stamped with the cluster clock read between
    two wall-clock reads: on one aligned timeline, realtime_ns - t_ns is the same on every machine.
    """

    outputs = ("time",)
    input_count = 0

    def __init__(self, *, rate_hz: float = 50.0) -> None:
        self.rate_hz = rate_hz

    def setup(self, ctx: NodeContext) -> None:
        self._clock = ctx.clock

    def step(self, inputs: Inputs) -> Outputs:
        before = time.clock_gettime_ns(time.CLOCK_REALTIME)
        stamp = self._clock.now_ns()
        after = time.clock_gettime_ns(time.CLOCK_REALTIME)
        return Sample({"realtime_ns": (before + after) // 2, "spread_ns": after - before}, t_ns=stamp)


class TwoPorts(Node):
    """Large frames on port `a` every step and on port `b` every `every`-th step (pattern-coded like
    `pattern`'s, so `verify` reads either): two ports of one pool, at different sequence numbers."""

    outputs = ("a", "b")
    input_count = 0

    def __init__(self, *, every: int = 4, rate_hz: float = 0.0) -> None:
        self.every, self.rate_hz = every, rate_hz
        self._steps = 0
        self._sent = {"a": 0, "b": 0}

    def _frame(self, port: str) -> object:
        import numpy as np

        n = self._sent[port]
        self._sent[port] = n + 1
        frame = np.full((240, 320, 3), n % 251, dtype=np.uint8)
        frame.reshape(-1)[:8] = np.frombuffer(np.int64(n).tobytes(), dtype=np.uint8)
        return frame

    def step(self, inputs: Inputs) -> Outputs:
        self._steps += 1
        out = {"a": self._frame("a")}
        if self._steps % self.every == 0:
            out["b"] = self._frame("b")
        return out
