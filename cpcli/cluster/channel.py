"""Control-plane sockets of the cluster: the manager's ROUTER and the DEALERs of workers and clients.

Every connection is CurveZMQ (authenticated and encrypted) unless the cluster runs `--insecure`: a
Router's gatekeeper admits only members, so a stranger never gets as far as a message. Both ends
validate every message (`messages.check`) and drop what does not fit, with a log line per peer, so
garbage or a foreign program on the port never crashes anything. ZeroMQ itself refuses frames
above MAX_MESSAGE_BYTES (it closes that connection) and non-ZMTP bytes (failed handshake).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from cpcli.cluster.messages import REFUSED, VersionMismatch, check
from cpcli.errors import TransportError
from cpcli.transport.curve import Credentials, Gatekeeper, HandshakeFailures, HandshakeWatch
from cpcli.transport.protocol import PROTOCOL_VERSION, pack_object, unpack_object

MAX_MESSAGE_BYTES = 4 << 20  # a recipe of hundreds of nodes is far below this
HWM = 10_000  # control messages are small; this only bounds a runaway peer
LINGER_MS = 500  # a last STOP or RESULT gets this long to leave when a socket closes
MAX_LOGGED_PEERS = 100  # garbage is logged once per peer, for this many peers
REBIND_S = 2.0  # a closed listener is released by ZeroMQ's I/O thread a moment later: retry the bind this long


def _decode(frames: list[bytes]) -> tuple[bytes, dict[str, Any]]:
    if len(frames) != 2:
        raise TransportError(f"malformed control message ({len(frames)} frames)")
    command = frames[0]
    try:
        body = unpack_object(frames[1])
    except (msgpack.UnpackException, ValueError, TypeError) as err:
        raise TransportError(f"malformed control body ({type(err).__name__})") from err
    if not isinstance(body, dict):
        raise TransportError("control body is not a mapping")
    check(command, body)
    return command, body


def _socket(context: zmq.Context[Any], kind: int) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = context.socket(kind)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    return sock


class Router:
    """The manager's (or an archive server's) end: every peer is an identity; receive() yields only valid messages.

    It owns the gatekeeper of its context (one per context), which admits members only; `keys` is
    read at each handshake and at `rebind()`. `as_manager`: serve with the manager's key pair
    (the control port) instead of the member key (every other server).
    """

    def __init__(self, context: zmq.Context[Any], host: str, port: int, logger: logging.Logger,
                 keys: Callable[[], Credentials], *, as_manager: bool = False, what: str = "manager") -> None:
        self._log = logger
        self._context = context
        self._keys = keys
        self._as_manager = as_manager
        self._what = what
        self.gatekeeper = Gatekeeper(context, keys, logger=logger, what=what).start()
        self.host = host
        try:
            self.socket, self.credentials = self._open()
            self.port = self._bind(port)
        except BaseException:
            self.gatekeeper.close()
            raise
        self._logged: set[bytes] = set()
        self.dropped = 0  # malformed messages dropped so far
        self._failed_before = 0  # failed handshakes counted by monitors replaced at a rebind

    @property
    def counts(self) -> dict[str, int]:
        """What was turned away so far: malformed messages, connections refused, refusals slowed down."""
        self._failures.drain()
        return {"dropped_messages": self.dropped, "refused_connections": self.gatekeeper.refused,
                "failed_handshakes": self._failed_before + self._failures.count,
                "throttled": self.gatekeeper.throttled}

    def _open(self) -> tuple[zmq.Socket[Any], Credentials]:
        sock = _socket(self._context, zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone peer fails instead of vanishing
        credentials = self._keys()
        try:
            credentials.serve(sock, as_manager=self._as_manager)
        except ValueError as err:
            sock.close(linger=0)
            raise TransportError(f"cannot serve as the manager of cluster {credentials.cluster}: {err}",
                                 hint="run `cp manager` on the machine that holds the cluster's keys") from err
        self._failures = HandshakeFailures(sock, self._what, self._log)
        return sock, credentials

    def _bind(self, port: int, retry_s: float = 0.0) -> int:
        deadline = time.monotonic() + retry_s
        while True:
            try:
                if port:
                    self.socket.bind(f"tcp://{self.host}:{port}")
                    return port
                return self.socket.bind_to_random_port(f"tcp://{self.host}")
            except zmq.ZMQError as err:
                if err.errno == zmq.EADDRINUSE and time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                self._failures.close()
                self.socket.close(linger=0)
                hint = "another manager runs here? pick another --port" if err.errno == zmq.EADDRINUSE else (
                    "pass --interface with an address of this machine")
                # zmq.strerror: pyzmq's err.strerror repeats the address the message already names
                raise TransportError(f"cannot listen on {self.host}:{port} ({zmq.strerror(err.errno or 0)})",
                                     hint=hint) from err

    def rebind(self) -> None:
        """Cut every connection and listen again on the same port with the current keys (after a rotation).

        Peers reconnect by themselves and meet the gatekeeper again: members holding the new
        secret get back in, the others are refused.
        """
        self._failures.drain()
        old, old_failures = self.socket, self._failures
        self._failed_before += old_failures.count
        self.socket, self.credentials = self._open()  # before the old one closes: its monitor gets a name of its own
        old_failures.close()
        old.close(linger=0)  # what was queued for the old connections has no one to go to
        self._bind(self.port, REBIND_S)
        self._logged.clear()

    def check(self) -> None:
        """Log failed handshakes (strangers, garbage) sparingly; call it every turn of the owner's loop."""
        self._failures.drain()

    def receive(self) -> tuple[bytes, bytes, dict[str, Any]] | None:
        """One waiting valid message as (peer, command, body), or None when none waits."""
        self._failures.drain()
        while True:
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            peer, frames = parts[0].bytes, [p.bytes for p in parts[1:]]
            try:
                command, body = _decode(frames)
            except VersionMismatch as err:  # another cpcli release: tell it why, in its own terms
                self._drop(peer, parts[-1], f"refused a peer of another cpcli release: {err.message}")
                self.send(peer, REFUSED, {"message": f"this manager speaks control protocol {PROTOCOL_VERSION}, "
                                                     f"not {err.theirs} (another cpcli release)",
                                          "hint": err.hint or ""})
                continue
            except TransportError as err:
                self._drop(peer, parts[-1], f"dropped a malformed control message: {err.message}")
                continue
            return peer, command, body

    def _drop(self, peer: bytes, frame: zmq.Frame, what: str) -> None:
        self.dropped += 1
        if peer not in self._logged and len(self._logged) < MAX_LOGGED_PEERS:
            self._logged.add(peer)
            try:
                source = f"{frame.get('Peer-Address')}, "  # the sender's IP, which a person can look up
            except zmq.ZMQError:
                source = ""
            self._log.warning("%s (from %speer %s)", what, source, peer.hex()[:16])

    def send(self, peer: bytes, command: bytes, body: dict[str, Any]) -> bool:
        """Send to one peer; False when it is not connected (any more) or not reading."""
        try:
            self.socket.send_multipart([peer, command, pack_object(body)], zmq.NOBLOCK)
        except (zmq.ZMQError, TransportError):  # gone, or a value msgpack cannot carry (checked upstream)
            return False
        return True

    def close(self) -> None:
        """Idempotent."""
        if not self.socket.closed:
            self._failures.close()
            self.socket.close()
        self.gatekeeper.close()


class Dealer:
    """A worker's or client's end, with a fresh identity per connection (`<name>.<random>`).

    It holds the member key and expects the manager's; `refusal()` says when the manager's
    gatekeeper turned it away, so the caller can say why at once instead of timing out.
    """

    def __init__(self, context: zmq.Context[Any], address: str, name: str, logger: logging.Logger,
                 credentials: Credentials) -> None:
        self._log = logger
        self.credentials = credentials
        self.identity = f"{name}.{secrets.token_hex(4)}".encode()
        self.socket = _socket(context, zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, self.identity)
        self.socket.setsockopt(zmq.RECONNECT_IVL, 100)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self.socket.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a manager that is not connected
        credentials.connect_to(self.socket, manager=True)
        self._watch = HandshakeWatch(self.socket)
        try:
            self.socket.connect(f"tcp://{address}")
        except zmq.ZMQError as err:
            self._watch.close()
            self.socket.close()
            raise TransportError(f"cannot connect to manager {address} ({err.strerror})",
                                 hint="give --manager as HOST:PORT") from err
        self.dropped = 0

    def refusal(self) -> str | None:
        """Why the manager turned us away: "auth" (our member key), "keys" (we share no keys); None if it did not."""
        if self.socket.closed:
            return None
        return self._watch.check()

    def receive(self) -> tuple[bytes, dict[str, Any]] | None:
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return None
            try:
                return _decode(frames)
            except TransportError as err:
                self.dropped += 1
                self._log.warning("dropped a malformed control message from the manager: %s", err)

    def send(self, command: bytes, body: dict[str, Any]) -> bool:
        """False when the message cannot leave now (no connection to the manager)."""
        try:
            self.socket.send_multipart([command, pack_object(body)], zmq.NOBLOCK)
        except (zmq.ZMQError, TransportError):  # gone, or a value msgpack cannot carry (checked upstream)
            return False
        return True

    def close(self, discard: bool = False) -> None:
        """Close (idempotent); `discard` drops what is still queued (a connection given up on)."""
        if self.socket.closed:
            return
        self._watch.close()
        self.socket.close(linger=0 if discard else LINGER_MS)
