"""Previews from the nodes for `cp monitor`: a SUB socket per node publisher, subscribed only while watched.

A node computes and sends a preview (`~node/port`, at most twice a second) only while someone
subscribes to it, so closing a socket here (previews off, the session over) makes it stop.
The thread that creates a `PreviewFeed` owns its sockets and must be the only one to call it.
In a cluster the node publishers admit members only, so the feed logs in with the session's
`DataSecurity`, as the nodes' own inputs do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import msgpack
import numpy as np
import zmq

from cpcli.errors import TransportError
from cpcli.transport.curve import DataSecurity
from cpcli.transport.preview import preview_topic
from cpcli.transport.protocol import (
    KIND_ARRAY,
    KIND_OBJECT,
    array_from_payload,
    decode_header,
    topic_for,
    unpack_object,
)

PREVIEW_HWM = 8  # previews queued per publisher: twice a second each, an old one is worth nothing
LINGER_MS = 0  # nothing we send (subscriptions) matters once we close
MAX_PER_POLL = 256  # messages taken per call, so a flood cannot starve the keyboard and the screen
log = logging.getLogger("cpcli.monitor")

Preview = tuple[str, str, Any]  # node, port, value (a small frame, or plain data)


class PreviewFeed:
    """The preview subscriptions of one monitor."""

    def __init__(self, security: DataSecurity | None = None) -> None:
        """`security`: the watched session's data security (its keys, and whether its data is encrypted);
        None for a session without keys (one machine). A mismatch is refused by the node: no previews."""
        self._security = security
        self._context: zmq.Context[Any] = zmq.Context()
        self._sockets: dict[str, zmq.Socket[Any]] = {}
        self._topics: dict[str, set[bytes]] = {}
        self.bytes_received = 0  # preview traffic, for the benchmark
        self.malformed = 0

    def secure(self, security: DataSecurity | None) -> None:
        """Another session (or one with other keys): later subscriptions use `security`; current ones close."""
        if security == self._security:
            return
        for socket in self._sockets.values():
            socket.close(linger=LINGER_MS)
        self._sockets.clear()
        self._topics.clear()
        self._security = security

    def watch(self, wanted: Mapping[str, Iterable[tuple[str, str]]]) -> None:
        """Subscribe to exactly these (node, port) previews, per publisher endpoint; drop the rest."""
        topics = {endpoint: {preview_topic(topic_for(node, port)) for node, port in ports}
                  for endpoint, ports in wanted.items()}
        for endpoint in [e for e in self._sockets if not topics.get(e)]:
            self._sockets.pop(endpoint).close(linger=LINGER_MS)
            self._topics.pop(endpoint, None)
        for endpoint, want in topics.items():
            if not want:
                continue
            socket = self._sockets.get(endpoint)
            if socket is None:
                socket = self._context.socket(zmq.SUB)
                socket.setsockopt(zmq.LINGER, LINGER_MS)
                socket.setsockopt(zmq.RCVHWM, PREVIEW_HWM)
                if self._security is not None:
                    self._security.connect_to(socket)
                try:
                    socket.connect(endpoint)
                except zmq.ZMQError as err:
                    socket.close(linger=LINGER_MS)
                    log.warning("cannot connect to %s for previews: %s", endpoint, err)
                    continue
                self._sockets[endpoint], self._topics[endpoint] = socket, set()
            have = self._topics[endpoint]
            for topic in want - have:
                socket.setsockopt(zmq.SUBSCRIBE, topic)
            for topic in have - want:
                socket.setsockopt(zmq.UNSUBSCRIBE, topic)
            self._topics[endpoint] = set(want)

    @property
    def watching(self) -> int:
        """How many previews are subscribed."""
        return sum(len(t) for t in self._topics.values())

    def poll(self, timeout_s: float, fd: int | None = None) -> tuple[list[Preview], bool]:
        """Wait up to `timeout_s` for previews or for `fd` to be readable; returns the previews and whether it is."""
        poller = zmq.Poller()
        for socket in self._sockets.values():
            poller.register(socket, zmq.POLLIN)
        if fd is not None:
            poller.register(fd, zmq.POLLIN)
        ready = dict(poller.poll(max(0, int(timeout_s * 1000))))  # zmq polls in milliseconds
        previews: list[Preview] = []
        for socket in self._sockets.values():
            if socket in ready:
                previews.extend(self._drain(socket))
        return previews, fd is not None and fd in ready

    def _drain(self, socket: zmq.Socket[Any]) -> list[Preview]:
        got: list[Preview] = []
        for _ in range(MAX_PER_POLL):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.bytes_received += sum(len(f) for f in frames)
            preview = self._decode(frames)
            if preview is not None:
                got.append(preview)
        return got

    def _decode(self, frames: list[bytes]) -> Preview | None:
        try:
            if len(frames) != 3 or not frames[0].startswith(b"~"):
                raise TransportError(f"{len(frames)} frames, topic {frames[0][:40]!r}")
            node, _, port = frames[0][1:].decode().partition("/")
            header = decode_header(frames[1])
            if header.kind == KIND_ARRAY:
                value: Any = np.array(array_from_payload(header, frames[2]))
            elif header.kind == KIND_OBJECT:
                value = unpack_object(frames[2])
            else:
                raise TransportError(f"kind {header.kind!r}")
        except (TransportError, UnicodeDecodeError, ValueError, TypeError, msgpack.UnpackException) as err:
            self.malformed += 1
            if self.malformed == 1:
                log.warning("dropped a malformed preview (%s)", err)
            return None
        return node, port, value

    def close(self) -> None:
        """Unsubscribe from everything and release the sockets; idempotent."""
        self._sockets.clear()
        self._topics.clear()
        if not self._context.closed:  # every socket, even one an interrupt left out of our lists
            self._context.destroy(linger=LINGER_MS)
