"""Control plane sockets: a ROUTER that owns a set of peers, DEALERs that talk to it."""

from __future__ import annotations

import logging
from typing import Any

import zmq

from cpcli.errors import TransportError
from cpcli.transport.protocol import pack_control, unpack_control

CONTROL_HWM = 1000  # control messages are small and few; this only bounds a runaway peer
LINGER_MS = 200  # give a last DONE or STOP a moment to leave before the socket closes
MAX_CONTROL_BYTES = 1 << 20  # a control message larger than this is not one of ours


class ControlServer:
    """ROUTER end of the control plane: receives `(peer, command, body)`, sends to a peer."""

    def __init__(self, context: zmq.Context[Any], host: str = "127.0.0.1",
                 logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("cpcli.control")
        self._socket: zmq.Socket[Any] = context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, LINGER_MS)
        self._socket.setsockopt(zmq.SNDHWM, CONTROL_HWM)
        self._socket.setsockopt(zmq.RCVHWM, CONTROL_HWM)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_BYTES)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone peer raises, not vanishes
        try:
            port = self._socket.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as err:
            self._socket.close()
            raise TransportError(f"cannot bind the control socket on {host} ({err})") from err
        self.endpoint = f"tcp://{host}:{port}"
        self._bad_peers: set[bytes] = set()

    @property
    def socket(self) -> zmq.Socket[Any]:
        return self._socket

    def receive(self) -> tuple[str, bytes, dict[str, Any]] | None:
        """One waiting message as (peer, command, body); malformed ones are dropped and logged once."""
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return None
            peer = frames[0]
            try:
                command, body = unpack_control(frames[1:])
            except TransportError as err:
                if peer not in self._bad_peers:
                    self._bad_peers.add(peer)
                    self._log.warning("dropped a malformed control message from %r (%s)", peer, err)
                continue
            return peer.decode(errors="replace"), command, body

    def send(self, peer: str, command: bytes, body: dict[str, Any] | None = None) -> bool:
        """Send to a peer; False if the peer is not connected (any more)."""
        try:
            self._socket.send_multipart([peer.encode(), *pack_control(command, body)], zmq.NOBLOCK)
        except zmq.ZMQError:  # EHOSTUNREACH (gone) or EAGAIN (not reading): the caller decides
            return False
        return True

    def close(self) -> None:
        self._socket.close()


class ControlClient:
    """DEALER end of the control plane, with a fixed identity."""

    def __init__(self, context: zmq.Context[Any], endpoint: str, identity: str) -> None:
        self._socket: zmq.Socket[Any] = context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, LINGER_MS)
        self._socket.setsockopt(zmq.SNDHWM, CONTROL_HWM)
        self._socket.setsockopt(zmq.IDENTITY, identity.encode())
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_BYTES)
        self._socket.connect(endpoint)

    @property
    def socket(self) -> zmq.Socket[Any]:
        return self._socket

    def send(self, command: bytes, body: dict[str, Any] | None = None) -> None:
        try:
            self._socket.send_multipart(pack_control(command, body), zmq.NOBLOCK)
        except zmq.Again as err:
            raise TransportError("the supervisor is not reading control messages") from err

    def receive(self) -> tuple[bytes, dict[str, Any]] | None:
        try:
            frames = self._socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        return unpack_control(frames)

    def close(self) -> None:
        self._socket.close()
