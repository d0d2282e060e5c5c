"""Previews for the monitor: made only while someone subscribes, small, at most twice a second."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import zmq

from cpcli.transport.preview import PREVIEW_SIZE
from cpcli.transport.protocol import KIND_ARRAY, array_from_payload, decode_header, unpack_object
from cpcli.transport.pubsub import Publisher

pytestmark = pytest.mark.timeout(30)
FRAME = (np.arange(480 * 640 * 3) % 251).astype(np.uint8).reshape(480, 640, 3)


def _subscribe(context: zmq.Context[Any], publisher: Publisher, topic: bytes) -> zmq.Socket[Any]:
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(publisher.endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # bounded: until the publisher has seen the subscription
        publisher.handle_subscriptions()
        if publisher._subscribers.get(topic):  # noqa: SLF001 - the count the publisher acts on
            return sub
        time.sleep(0.01)
    raise AssertionError("the subscription never arrived")


def _drain(sub: zmq.Socket[Any]) -> list[list[bytes]]:
    got = []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # bounded: a second of quiet at most
        if sub.poll(100):
            got.append(sub.recv_multipart())
        else:
            break
    return got


@pytest.fixture
def context() -> Any:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.term()


def test_no_preview_is_made_when_nobody_watches(context: zmq.Context[Any]) -> None:
    publisher = Publisher(context, "cam", ("video",))
    try:
        for i in range(50):
            publisher.publish("video", FRAME, i * 100_000_000)
            publisher.offer_preview("video", FRAME, i * 100_000_000)
        assert publisher.previews_sent == 0
    finally:
        publisher.close()


def test_video_preview_is_small_and_at_most_twice_a_second(context: zmq.Context[Any]) -> None:
    publisher = Publisher(context, "cam", ("video",))
    sub = _subscribe(context, publisher, b"~cam/video")
    try:
        for i in range(30):  # 3 s of frames at 10 Hz, by their timestamps
            publisher.publish("video", FRAME, i * 100_000_000)
            publisher.offer_preview("video", FRAME, i * 100_000_000)
        got = _drain(sub)
        assert len(got) == publisher.previews_sent == 6  # 0.0, 0.5, ... 2.5 s
        header = decode_header(got[0][1])
        assert header.kind == KIND_ARRAY
        thumb = array_from_payload(header, got[0][2])
        assert thumb.shape[0] <= PREVIEW_SIZE[0] and thumb.shape[1] <= PREVIEW_SIZE[1] and thumb.shape[2] == 3
        assert (thumb == FRAME[::14, ::14]).all()  # 480 / 36 rows: every 14th row and column
    finally:
        sub.close()
        publisher.close()


def test_audio_preview_is_a_level_with_the_peak_since_the_last(context: zmq.Context[Any]) -> None:
    publisher = Publisher(context, "mic", ("audio",))
    sub = _subscribe(context, publisher, b"~mic/audio")
    try:
        quiet = np.full((480, 2), 0.01, dtype=np.float32)
        loud = quiet.copy()
        loud[100, 1] = 1.0  # one clipped sample on the second channel
        publisher.offer_preview("audio", quiet, 0)
        publisher.offer_preview("audio", loud, 100_000_000)
        publisher.offer_preview("audio", quiet, 600_000_000)
        first, second = (unpack_object(m[2]) for m in _drain(sub))
        assert first["channels"] == 2 and first["rms_db"] == [-40.0, -40.0] and not first["clipped"]
        assert second["peak_db"] == [-40.0, 0.0] and second["clipped"]  # held from the block in between
    finally:
        sub.close()
        publisher.close()


def test_rows_preview_as_they_are(context: zmq.Context[Any]) -> None:
    publisher = Publisher(context, "level", ("level",))
    sub = _subscribe(context, publisher, b"~level/level")
    try:
        publisher.offer_preview("level", {"rms_db": -12.5}, 0)
        (message,) = _drain(sub)
        assert unpack_object(message[2]) == {"rms_db": -12.5}
    finally:
        sub.close()
        publisher.close()
