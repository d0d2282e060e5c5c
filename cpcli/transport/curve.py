"""Who may talk to a cluster's sockets: CurveZMQ keys, the gatekeeper that checks each connection, refusals.

A cluster has one secret. The manager also holds a Curve key pair of its own; every member (worker,
`cp` client, node process) derives the same *member* key pair from the secret. The manager's
control socket serves with the manager's key; every other server (node publishers, archive
servers) serves with the member key. Each server's context runs a gatekeeper (ZeroMQ's ZAP) that
lets in only clients proving the member key, so a stranger can neither connect nor read. With data
encryption switched off, node publishers take PLAIN logins with a per-session password instead:
still members only, but frames cross the wire in the clear (so may that password, which opens
nothing beyond that session's streams, already readable on that wire).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils import z85

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP specification (RFC 27)
PLAIN_USER = b"cpcli"
POLL_MS = 100  # the gatekeeper's longest sleep: bounds how fast close() is noticed
JOIN_TIMEOUT_S = 2.0
# A stranger hammering a port: after this many refusals within the window, each further answer
# waits PENALTY_S (the handshake stays open meanwhile), so guessing cannot run faster than that.
THROTTLE_AFTER = 10
THROTTLE_WINDOW_S = 10.0
PENALTY_S = 1.0
MAX_PENDING = 1000  # deferred refusals held at once; beyond this the oldest are answered now
MAX_TRACKED = 4096  # addresses remembered for throttling and logging; a LAN larger than this is not a lab
SUMMARY_S = 60.0  # failed handshakes are logged as a count at most this often
_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL |
                     zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED |
                     zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)


def _derive(secret: bytes, purpose: str) -> bytes:
    return hmac.new(secret, f"cpcli/{purpose}".encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class Credentials:
    """What a machine knows of one cluster; `insecure` means no security at all (a one-machine demo)."""

    cluster: str
    manager_public: bytes = b""  # Z85, 40 bytes
    secret: bytes = field(default=b"", repr=False)  # the cluster secret (raw)
    manager_secret: bytes | None = field(default=None, repr=False)  # Z85; only on the manager's machine
    insecure: bool = False

    @classmethod
    def demo(cls, cluster: str) -> Credentials:
        """No keys: everything in the clear, anyone who reaches a port is let in (`--insecure`)."""
        return cls(cluster, insecure=True)

    @property
    def member_secret(self) -> bytes:
        return z85.encode(_derive(self.secret, "member-curve-key"))

    @property
    def member_public(self) -> bytes:
        return zmq.curve_public(self.member_secret)

    @property
    def fingerprint(self) -> str:
        """16 hex digits naming the manager's public key (shown in mDNS adverts and `cp token`)."""
        if self.insecure:
            return "insecure"
        return hashlib.sha256(z85.decode(self.manager_public)).hexdigest()[:16]

    @property
    def clock_key(self) -> bytes:
        """The key of the clock probes' MACs."""
        return _derive(self.secret, "clock-mac")

    def data_password(self, session: str) -> bytes:
        """The PLAIN password of one session's unencrypted data streams."""
        return _derive(self.secret, f"data-plain/{session}").hex().encode()

    # -- sockets -----------------------------------------------------------------------------

    def serve(self, sock: zmq.Socket[Any], *, as_manager: bool = False) -> None:
        """Make `sock` (before it binds) a server that only members can connect to."""
        if self.insecure:
            return
        if as_manager and self.manager_secret is None:
            raise ValueError("the manager's key is not on this machine")
        sock.setsockopt(zmq.ZAP_DOMAIN, self.cluster.encode())
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.manager_secret if as_manager and self.manager_secret
                        else self.member_secret)

    def serve_plain(self, sock: zmq.Socket[Any]) -> None:
        """A data publisher with encryption off: members log in with the session's password."""
        if self.insecure:
            return
        sock.setsockopt(zmq.ZAP_DOMAIN, self.cluster.encode())
        sock.setsockopt(zmq.PLAIN_SERVER, 1)

    def connect_to(self, sock: zmq.Socket[Any], *, manager: bool = False) -> None:
        """Make `sock` (before it connects) a client holding the member key; `manager`: to the manager."""
        if self.insecure:
            return
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.manager_public if manager else self.member_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.member_public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.member_secret)

    def login_plain(self, sock: zmq.Socket[Any], session: str) -> None:
        if self.insecure:
            return
        sock.setsockopt(zmq.PLAIN_USERNAME, PLAIN_USER)
        sock.setsockopt(zmq.PLAIN_PASSWORD, self.data_password(session))

    # -- to pass on to node processes ----------------------------------------------------------

    def to_env(self) -> str:
        """One line a child process reads back with `from_env` (never on a command line: `ps` shows those)."""
        if self.insecure:
            return f"insecure:{self.cluster}"
        return f"curve:{self.cluster}:{self.manager_public.decode()}:{self.secret.hex()}"

    @classmethod
    def from_env(cls, text: str) -> Credentials:
        kind, _, rest = text.partition(":")
        if kind == "insecure":
            return cls.demo(rest)
        if kind != "curve":
            raise ValueError("neither curve nor insecure")
        # Z85 keys may hold ':' themselves: the cluster name cannot, nor can the hex secret
        cluster, _, keys = rest.partition(":")
        public, _, secret = keys.rpartition(":")
        return cls(cluster, public.encode(), bytes.fromhex(secret))


@dataclass(frozen=True)
class DataSecurity:
    """How one session's node publishers and subscribers meet: Curve (encrypted), or PLAIN (members, in the clear)."""

    credentials: Credentials
    encrypt: bool
    session: str

    def serve(self, sock: zmq.Socket[Any]) -> None:
        if self.encrypt:
            self.credentials.serve(sock)
        else:
            self.credentials.serve_plain(sock)

    def connect_to(self, sock: zmq.Socket[Any]) -> None:
        if self.encrypt:
            self.credentials.connect_to(sock)
        else:
            self.credentials.login_plain(sock, self.session)

    def passwords(self) -> set[bytes]:
        return set() if self.encrypt or self.credentials.insecure else {self.credentials.data_password(self.session)}

    def to_env(self) -> str:
        return f"{int(self.encrypt)}:{self.session}:{self.credentials.to_env()}"

    @classmethod
    def from_env(cls, text: str) -> DataSecurity:
        encrypt, session, creds = text.split(":", 2)
        return cls(Credentials.from_env(creds), encrypt == "1", session)


@dataclass
class _Pending:
    due: float
    frames: list[bytes]


class Gatekeeper:
    """The ZAP handler of one ZeroMQ context: admits members, refuses the rest, slows repeat strangers.

    Start it before any server socket of the context binds (libzmq admits everyone when no handler
    is there). `credentials` is read at each handshake, so a rotated secret applies at once;
    `passwords` gives the PLAIN passwords accepted (sessions with data encryption off).
    """

    def __init__(self, context: zmq.Context[Any], credentials: Callable[[], Credentials],
                 passwords: Callable[[], set[bytes]] | None = None, logger: logging.Logger | None = None,
                 what: str = "server") -> None:
        """`what`: the server its log lines name ("manager", "archive server", "node camera")."""
        self._credentials = credentials
        self._passwords = passwords or (lambda: set())
        self._log = logger or logging.getLogger("cpcli.gatekeeper")
        self._socket: zmq.Socket[Any] = context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(ZAP_ENDPOINT)
        except zmq.ZMQError:
            self._socket.close()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gatekeeper", daemon=True)
        self._refusals: dict[str, deque[float]] = {}
        self._logged: set[str] = set()
        self._what = what
        self._pending: deque[_Pending] = deque()
        self.admitted = 0
        self.refused = 0
        self.throttled = 0

    def start(self) -> Gatekeeper:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(JOIN_TIMEOUT_S)
        elif self._thread.ident is None:
            self._socket.close()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                timeout = POLL_MS
                if self._pending:
                    timeout = max(1, min(POLL_MS, int((self._pending[0].due - time.monotonic()) * 1000) + 1))
                try:
                    readable = self._socket.poll(timeout)
                except zmq.ZMQError:  # the context was terminated under us: nothing left to guard
                    return
                if readable:
                    while True:
                        try:
                            frames = self._socket.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._answer(frames)
                now = time.monotonic()
                while self._pending and (self._pending[0].due <= now or len(self._pending) > MAX_PENDING):
                    self._send(self._pending.popleft().frames)
        finally:
            for pending in self._pending:  # answer what waits, so no handshake hangs on a closed gate
                self._send(pending.frames)
            self._socket.close()

    def _answer(self, frames: list[bytes]) -> None:
        # [peer, b"", version, request id, domain, address, identity, mechanism, credentials...]
        if len(frames) < 8 or frames[1] != b"" or frames[2] != b"1.0":
            self._log.warning("malformed ZAP request ignored")
            return
        envelope, request_id, address, mechanism = frames[:2], frames[3], frames[5], frames[7]
        ok = self._admits(mechanism, frames[8:])
        reply = [*envelope, b"1.0", request_id, b"200" if ok else b"400",
                 b"OK" if ok else b"not a member of this cluster", b"member" if ok else b"", b""]
        if ok:
            self.admitted += 1
            self._send(reply)
            return
        self.refused += 1
        host = address.decode(errors="replace")
        now = time.monotonic()
        if host not in self._refusals and len(self._refusals) >= MAX_TRACKED:
            self._refusals.pop(next(iter(self._refusals)))
        times = self._refusals.setdefault(host, deque(maxlen=THROTTLE_AFTER + 1))
        times.append(now)
        if host not in self._logged and len(self._logged) < MAX_TRACKED:
            self._logged.add(host)
            self._log.warning("refused a connection to the %s from %s: not a member of cluster %s (a wrong or "
                              "rotated join token); further attempts from there are counted, not logged",
                              self._what, host, self._credentials().cluster)
        if len(times) > THROTTLE_AFTER and now - times[0] < THROTTLE_WINDOW_S:
            self.throttled += 1
            self._pending.append(_Pending(now + PENALTY_S, reply))
        else:
            self._send(reply)

    def _admits(self, mechanism: bytes, credentials: list[bytes]) -> bool:
        creds = self._credentials()
        if creds.insecure:
            return True
        if mechanism == b"CURVE" and len(credentials) == 1:
            return hmac.compare_digest(credentials[0], z85.decode(creds.member_public))
        if mechanism == b"PLAIN" and len(credentials) == 2 and credentials[0] == PLAIN_USER:
            return any(hmac.compare_digest(credentials[1], p) for p in self._passwords())
        return False

    def _send(self, frames: list[bytes]) -> None:
        with contextlib.suppress(zmq.ZMQError):  # the connection it answers is gone
            self._socket.send_multipart(frames, zmq.NOBLOCK)


class HandshakeFailures:
    """A server socket's failed handshakes (a stranger without the keys, or not cpcli at all), logged sparingly.

    ZeroMQ reports these without the stranger's address (the gatekeeper logs the addresses of
    connections it refuses); the first is logged, then a count at most every SUMMARY_S.
    """

    def __init__(self, sock: zmq.Socket[Any], what: str, logger: logging.Logger) -> None:
        self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL |
                                                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._sock = sock
        self._what = what
        self._log = logger
        self._next_log = 0.0
        self._unlogged = 0
        self.count = 0

    def drain(self) -> None:
        while True:
            try:
                self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:  # Again, or closed
                break
            self.count += 1
            self._unlogged += 1
        now = time.monotonic()
        if self._unlogged and now >= self._next_log:
            self._log.warning("refused %d connection%s to the %s that did not hold this cluster's keys (a machine "
                              "with no or another cluster's token, or not cpcli); %d so far", self._unlogged,
                              "s" if self._unlogged != 1 else "", self._what, self.count)
            self._unlogged, self._next_log = 0, now + SUMMARY_S

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(linger=0)


def _monitor_event(frames: list[bytes]) -> int:
    """The event number of a ZeroMQ socket-monitor message (`[event u16, value u32][endpoint]`).

    Read here rather than with `zmq.utils.monitor`, which imports asyncio: 20 ms more start-up
    for every node process and every `cp` command."""
    if not frames or len(frames[0]) < 6:
        return 0
    return int(struct.unpack_from("=H", frames[0])[0])


class HandshakeWatch:
    """A client socket's view of its handshakes: did the server refuse us, and why."""

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self._monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        self._sock = sock
        self.succeeded = False
        self._failed_connections = 0
        self.refusal: str | None = None  # "auth": our member key was refused; "keys": no common keys

    def check(self) -> str | None:
        """Read what happened so far; the refusal kind once a handshake failed since the last success."""
        while True:
            try:
                kind = _monitor_event(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.ZMQError:
                break
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.succeeded, self.refusal, self._failed_connections = True, None, 0
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.refusal = "auth"
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self.refusal = self.refusal or "keys"
            elif kind == zmq.EVENT_CONNECTED:
                self.succeeded = False
            elif kind == zmq.EVENT_DISCONNECTED and not self.succeeded:
                # a server that cannot open our hello (other keys) just closes; twice in a row is no accident
                self._failed_connections += 1
                if self._failed_connections >= 2:
                    self.refusal = self.refusal or "keys"
        return None if self.succeeded else self.refusal

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(linger=0)


def refusal_message(kind: str, where: str, cluster: str) -> tuple[str, str]:
    """The one line (and hint) a refused client prints."""
    if kind == "auth":
        return (f"{where} refused this machine: not a member of cluster {cluster} (its join token is wrong or "
                "was rotated)", "run `cp token --save TOKEN` (or pass --token) with the token `cp token` prints "
                "on the manager's machine")
    return (f"{where} refused this machine: it does not share keys with it (the join token is for another "
            f"cluster or manager, or that manager runs --insecure)", "run `cp token --save TOKEN` (or pass --token) "
            f"with the token `cp token --cluster {cluster}` prints on the manager's machine")


