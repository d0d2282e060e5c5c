"""The monitor's preview feed against a real node publisher: previews only while subscribed."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from cpcli.monitor.feed import PreviewFeed
from cpcli.transport.pubsub import Publisher

pytestmark = pytest.mark.timeout(30)
FRAME = np.zeros((480, 640, 3), np.uint8)


@pytest.fixture
def publisher() -> Iterator[Publisher]:
    context: zmq.Context[Any] = zmq.Context()
    pub = Publisher(context, "cam", ("video", "motion"))
    yield pub
    pub.close()
    context.term()


def _subscribers(publisher: Publisher, port: str, count: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # bounded: until the publisher has seen the (un)subscriptions
        publisher.handle_subscriptions()
        if publisher._subscribers.get(f"~cam/{port}".encode(), 0) == count:  # noqa: SLF001 - what it acts on
            return True
        time.sleep(0.01)
    return False


def test_feed_subscribes_decodes_and_unsubscribes(publisher: Publisher) -> None:
    feed = PreviewFeed()
    try:
        feed.watch({publisher.endpoint: [("cam", "video"), ("cam", "motion")]})
        assert feed.watching == 2
        assert _subscribers(publisher, "video", 1) and _subscribers(publisher, "motion", 1)
        publisher.offer_preview("video", FRAME, 0)
        publisher.offer_preview("motion", {"motion": 0.25}, 0)
        got: list[tuple[str, str, Any]] = []
        deadline = time.monotonic() + 3
        while len(got) < 2 and time.monotonic() < deadline:  # bounded by the deadline
            more, _ = feed.poll(0.1)
            got += more
        by_port = {port: value for _, port, value in got}
        assert by_port["motion"] == {"motion": 0.25}
        assert by_port["video"].shape[0] <= 36 and by_port["video"].shape[1] <= 64
        assert feed.bytes_received > by_port["video"].nbytes
        feed.watch({publisher.endpoint: [("cam", "motion")]})  # one port less
        assert _subscribers(publisher, "video", 0) and _subscribers(publisher, "motion", 1)
        feed.watch({})  # previews off: the publisher stops making them
        assert _subscribers(publisher, "motion", 0) and feed.watching == 0
        publisher.offer_preview("video", FRAME, 10**9)
        assert publisher.previews_sent == 2
    finally:
        feed.close()


def test_feed_wakes_for_a_readable_file_descriptor() -> None:
    feed = PreviewFeed()
    read, write = os.pipe()
    try:
        _, ready = feed.poll(0.05, read)
        assert not ready
        os.write(write, b"q")
        _, ready = feed.poll(1.0, read)
        assert ready
    finally:
        os.close(read)
        os.close(write)
        feed.close()
