"""A third-party plugin for tests of `cp devices` and `cp inspect`: devices without hardware, events."""

from __future__ import annotations

from cpcli.node import DeviceInfo, Inputs, Node, NodeContext, Outputs, Sample

USB_MIC = DeviceInfo("microphone", "Test USB mic", "Test USB mic", {"channels": 2, "samplerate": 48000})


class TestCamera(Node):
    """Lists two cameras; opens nothing."""

    __test__ = False
    outputs = ("video",)
    input_count = 0

    @classmethod
    def devices(cls) -> list[DeviceInfo]:
        return [DeviceInfo("camera", "0", "Test camera 0", {"resolution": "640x480", "fps": 30}),
                DeviceInfo("camera", "/dev/video9", "Test camera 9")]


class TestMicrophone(Node):
    """Lists one microphone and one speaker."""

    __test__ = False
    input_count = 0

    @classmethod
    def devices(cls) -> list[DeviceInfo]:
        return [USB_MIC, DeviceInfo("speaker", "1", "Test speaker", {"channels": 2})]


class TestHeadset(Node):
    """Lists the same microphone as TestMicrophone: one row, two node types."""

    __test__ = False
    input_count = 0

    @classmethod
    def devices(cls) -> list[DeviceInfo]:
        return [USB_MIC]


class ListingFails(Node):
    """Its device listing raises, like a driver that is not installed."""

    __test__ = False
    input_count = 0

    @classmethod
    def devices(cls) -> list[DeviceInfo]:
        raise RuntimeError("the test bus is down\nsecond line of the message")


class Ticker(Node):
    """An event (a JSON list) `rate_hz` times a second: a stream recorded as JSON Lines."""

    __test__ = False
    outputs = ("tick",)
    input_count = 0

    def __init__(self, *, rate_hz: float = 20.0) -> None:
        self.rate_hz = rate_hz

    def setup(self, ctx: NodeContext) -> None:
        self._clock = ctx.clock
        self._n = 0

    def step(self, inputs: Inputs) -> Outputs:
        self._n += 1
        return Sample([self._n, "tick"], t_ns=self._clock.now_ns())
