"""Data plane: one XPUB per node, one SUB per input, sequence numbers that make drops visible."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import zmq

from cpcli.errors import TransportError
from cpcli.node import Sample
from cpcli.transport.protocol import (
    KIND_ARRAY,
    KIND_END,
    KIND_OBJECT,
    Header,
    array_from_payload,
    decode_header,
    encode_header,
    pack_object,
    unpack_object,
)

DATA_HWM = 64  # messages queued per subscriber before PUB drops; bounds memory at 64 frames
LINGER_MS = 0  # data is recorded at its source; nothing in flight is worth a hung exit
_SUBSCRIBE, _UNSUBSCRIBE = 1, 0


def topic_for(node_id: str, port: str) -> bytes:
    return f"{node_id}/{port}".encode()


class Publisher:
    """A node's one XPUB socket: publishes every output port and sees who subscribes."""

    def __init__(self, context: zmq.Context[Any], node_id: str, ports: Sequence[str], host: str = "127.0.0.1") -> None:
        self._socket: zmq.Socket[Any] = context.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.LINGER, LINGER_MS)
        self._socket.setsockopt(zmq.SNDHWM, DATA_HWM)
        self._socket.setsockopt(zmq.XPUB_VERBOSER, 1)  # every (un)subscribe, so we can count peers
        try:
            port = self._socket.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as err:
            self._socket.close()
            raise TransportError(f"cannot bind a data socket on {host} ({err})") from err
        self.endpoint = f"tcp://{host}:{port}"
        self._topics = {p: topic_for(node_id, p) for p in ports}
        self._seq = dict.fromkeys(ports, 0)
        self._subscribers: dict[bytes, int] = {}

    @property
    def socket(self) -> zmq.Socket[Any]:
        return self._socket

    def handle_subscriptions(self) -> None:
        """Count subscribe/unsubscribe messages waiting on the socket."""
        while True:
            try:
                msg = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg and msg[0] in (_SUBSCRIBE, _UNSUBSCRIBE):
                delta = 1 if msg[0] == _SUBSCRIBE else -1
                topic = msg[1:]
                self._subscribers[topic] = max(0, self._subscribers.get(topic, 0) + delta)

    def subscribers(self, port: str) -> int:
        return self._subscribers.get(self._topics[port], 0)

    def sent(self, port: str) -> int:
        """How many samples went out on a port (the next sequence number)."""
        return self._seq[port]

    def publish(self, port: str, value: Any, t_ns: int, rate_hz: float | None = None) -> int:
        """Send one sample; arrays go zero-copy. Returns its sequence number."""
        seq = self._seq[port]
        self._seq[port] = seq + 1
        topic = self._topics[port]
        if isinstance(value, np.ndarray) and not value.dtype.hasobject:
            array = np.ascontiguousarray(value)
            header = Header(seq, t_ns, KIND_ARRAY, array.dtype.str, array.shape, rate_hz)
            self._socket.send_multipart([topic, encode_header(header), array.data], copy=False)
        else:
            payload = pack_object(value)
            header = Header(seq, t_ns, KIND_OBJECT, rate_hz=rate_hz)
            self._socket.send_multipart([topic, encode_header(header), payload])
        return seq

    def end(self) -> None:
        """Tell subscribers every port is finished (carries the count sent, so tail drops show)."""
        for port, topic in self._topics.items():
            self._socket.send_multipart([topic, encode_header(Header(self._seq[port], 0, KIND_END))])

    def close(self) -> None:
        self._socket.close(linger=LINGER_MS)


class Subscriber:
    """One input of a node: a SUB socket on the upstream node's topic, counting gaps."""

    def __init__(self, context: zmq.Context[Any], key: str, endpoint: str, topic: bytes,
                 logger: logging.Logger) -> None:
        self.key = key
        self._topic = topic
        self._log = logger
        self._socket: zmq.Socket[Any] = context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, LINGER_MS)
        self._socket.setsockopt(zmq.RCVHWM, DATA_HWM)
        self._socket.setsockopt(zmq.SUBSCRIBE, topic)
        self._socket.connect(endpoint)
        self.received = 0
        self.dropped = 0
        self.malformed = 0
        self.ended = False
        self._next_seq = 0

    @property
    def socket(self) -> zmq.Socket[Any]:
        return self._socket

    def receive(self) -> Sample | None:
        """The next sample waiting, or None when there is none (or the stream has ended)."""
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            sample = self._decode(frames)
            if sample is not None:
                return sample
            if self.ended:
                return None

    def _decode(self, frames: list[zmq.Frame]) -> Sample | None:
        if len(frames) < 2 or frames[0].bytes != self._topic:
            return None  # another port of the same node that shares our topic prefix
        try:
            header = decode_header(frames[1].buffer)
            if header.kind == KIND_END:
                self._count_gap(header.seq)
                self.ended = True
                return None
            if len(frames) != 3:
                raise TransportError(f"{len(frames)} frames in a data message")
            if header.kind == KIND_ARRAY:
                value = array_from_payload(header, frames[2].buffer)
            else:
                value = unpack_object(frames[2].buffer)
        except (TransportError, ValueError) as err:
            self.malformed += 1
            if self.malformed == 1:
                self._log.warning("input %s: dropped a malformed message (%s)", self.key, err)
            return None
        self._count_gap(header.seq)
        self._next_seq = header.seq + 1
        self.received += 1
        return Sample(value, t_ns=header.t_ns, rate_hz=header.rate_hz, seq=header.seq)

    def _count_gap(self, seq: int) -> None:
        if seq > self._next_seq:
            self.dropped += seq - self._next_seq
            self._next_seq = seq

    def close(self) -> None:
        self._socket.close(linger=LINGER_MS)
