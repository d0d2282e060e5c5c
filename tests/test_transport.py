"""Wire format and sockets: headers, zero-copy arrays, subscriptions, gaps, malformed input."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from cpcli.errors import TransportError
from cpcli.node import Sample
from cpcli.transport.control import ControlClient, ControlServer
from cpcli.transport.protocol import (
    HELLO,
    KIND_ARRAY,
    STATS,
    Header,
    array_from_payload,
    decode_header,
    encode_header,
    pack_control,
    pack_object,
    unpack_control,
)
from cpcli.transport.pubsub import Publisher, topic_for
from cpcli.transport.subscriber import Subscriber
from tests.conftest import wait_until

RECV_TIMEOUT_S = 5.0
log = logging.getLogger("test")


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


def _until(condition: Any, pump: Any = None) -> None:
    wait_until(condition, pump, RECV_TIMEOUT_S)


def _receive(sub: Subscriber) -> Sample:
    found: list[Sample] = []
    _until(lambda: bool(found) or bool(found.append(s) if (s := sub.receive()) is not None else False) or bool(found))
    return found[0]


def test_header_round_trip() -> None:
    header = Header(7, 123456789, KIND_ARRAY, "<u2", (4, 3), 30.0)
    assert decode_header(encode_header(header)) == header


@pytest.mark.parametrize("raw", [b"", b"\x01\x02", msgpack.packb({"s": 1}), msgpack.packb({"s": 1, "t": 2, "k": "zip"}),
                                 msgpack.packb([1, 2, 3]), b"x" * 5000])
def test_malformed_headers_raise_transport_error(raw: bytes) -> None:
    with pytest.raises(TransportError):
        decode_header(raw)


def test_array_payload_must_match_its_header() -> None:
    header = Header(0, 0, KIND_ARRAY, "|u1", (2, 2))
    assert array_from_payload(header, b"\x00" * 4).shape == (2, 2)
    with pytest.raises(TransportError, match="payload has 3 bytes"):
        array_from_payload(header, b"\x00" * 3)
    with pytest.raises(TransportError):
        array_from_payload(Header(0, 0, KIND_ARRAY, "|O", (1,)), b"\x00" * 8)


def test_objects_are_plain_data_never_pickled() -> None:
    assert msgpack.unpackb(pack_object({"a": np.float32(1.5), "b": (1, 2)})) == {"a": 1.5, "b": [1, 2]}
    with pytest.raises(TransportError, match="cannot be sent"):
        pack_object({"f": object()})


def test_control_messages_are_validated() -> None:
    assert unpack_control(pack_control(HELLO, {"pid": 3})) == (HELLO, {"pid": 3})
    for frames in ([b"NOPE", pack_object({})], [HELLO], [HELLO, b"\xc1"], [HELLO, pack_object([1])]):
        with pytest.raises(TransportError):
            unpack_control(frames)


def test_publisher_counts_subscribers_and_delivers_arrays_read_only(zmq_context: zmq.Context[Any]) -> None:
    pub = Publisher(zmq_context, "cam", ["video"])
    sub = Subscriber(zmq_context, "cam", pub.endpoint, topic_for("cam", "video"), log)
    try:
        _until(lambda: pub.subscribers("video") == 1, pub.handle_subscriptions)
        frame = np.arange(480 * 640 * 3, dtype=np.uint8).reshape(480, 640, 3)
        assert pub.publish("video", frame, 42, 30.0) == 0
        sample = _receive(sub)
        assert sample.seq == 0 and sample.t_ns == 42 and sample.rate_hz == 30.0
        assert np.array_equal(sample.value, frame) and not sample.value.flags.writeable
        pub.publish("video", {"row": 1}, 43)
        assert _receive(sub).value == {"row": 1}
    finally:
        sub.close()
        pub.close()


def test_subscriber_counts_sequence_gaps_as_drops_and_sees_the_end(zmq_context: zmq.Context[Any]) -> None:
    pub = Publisher(zmq_context, "n", ["out"])
    sub = Subscriber(zmq_context, "n", pub.endpoint, topic_for("n", "out"), log)
    try:
        _until(lambda: pub.subscribers("out") == 1, pub.handle_subscriptions)
        pub.publish("out", 1, 1)
        assert _receive(sub).seq == 0
        pub._seq["out"] = 5  # as if four messages were lost on the way
        pub.publish("out", 2, 2)
        assert _receive(sub).seq == 5
        assert sub.dropped == 4 and sub.received == 2
        pub.publish("out", 3, 3)
        pub._seq["out"] = 9  # the last two before the end were lost too
        pub.end()
        _until(lambda: sub.receive() is None and sub.ended)
        assert sub.received == 3 and sub.dropped == 4 + 2
    finally:
        sub.close()
        pub.close()


def test_subscriber_drops_malformed_messages_without_failing(zmq_context: zmq.Context[Any]) -> None:
    rogue = zmq_context.socket(zmq.XPUB)
    port = rogue.bind_to_random_port("tcp://127.0.0.1")
    sub = Subscriber(zmq_context, "x", f"tcp://127.0.0.1:{port}", b"x/out", log)
    try:
        _until(lambda: rogue.poll(10) != 0)
        rogue.recv()
        rogue.send_multipart([b"x/out", b"garbage", b"more"])
        rogue.send_multipart([b"x/out", encode_header(Header(0, 5, "obj")), pack_object("fine")])
        assert _receive(sub).value == "fine"
        assert sub.malformed == 1
    finally:
        sub.close()
        rogue.close(linger=0)


def test_control_server_and_client_exchange_and_ignore_garbage(zmq_context: zmq.Context[Any]) -> None:
    server = ControlServer(zmq_context)
    client = ControlClient(zmq_context, server.endpoint, "node-a")
    try:
        client.socket.send_multipart([b"garbage"])
        client.send(STATS, {"n": 1})
        got: list[Any] = []
        _until(lambda: bool(got) or bool((m := server.receive()) and got.append(m)))
        assert got[0] == ("node-a", STATS, {"n": 1})
        assert server.send("node-a", HELLO, {"x": 2})
        reply: list[Any] = []
        _until(lambda: bool(reply) or bool((m := client.receive()) and reply.append(m)))
        assert reply[0] == (HELLO, {"x": 2})
        assert server.send("nobody", HELLO) is False
    finally:
        client.close()
        server.close()
