"""Clock probes over UDP: the manager answers at once from its own thread; a worker's thread probes it.

UDP, on the same port number as the manager's control socket, because a probe must not wait behind
anything: no connection, no queue shared with control messages, no ZeroMQ I/O thread hop. A probe
is `MAGIC seq t1` (24 bytes); the answer `MAGIC seq t1 t2 t3` (40 bytes). In a cluster with keys
both carry a 16-byte MAC keyed by the cluster secret (`MAGIC_MAC ... mac`), so only members get
answers: the server never reflects a stranger's datagram at anyone, and a forged answer cannot
pull a worker's clock. Anything else is ignored and counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from cpcli.clock import ClockMapping
from cpcli.clocksync import OffsetEstimator, Probe
from cpcli.errors import TransportError
from cpcli.transport.curve import Credentials

MAGIC = b"CPCLOCK1"
MAGIC_MAC = b"CPCLOCK2"  # the keyed format: the fields of MAGIC's, then the MAC of everything before it
# blake2b with a key is a MAC by design, and fast: about 0.4 us for an answer, computed after t3 is
# read, which puts that much (not a hash's worth of microseconds) between t3 and the datagram leaving
MAC_BYTES = 16
_PROBE = struct.Struct("!8sqq")  # magic, seq, t1
_ANSWER = struct.Struct("!8sqqqq")  # magic, seq, t1, t2, t3
BURST = 8  # probes per burst; the lowest round trip of them is kept
BURST_GAP_S = 0.002  # between the probes of a burst
INTERVAL_S = 1.0  # between bursts: the estimate is refreshed this often
PROBE_TIMEOUT_S = 0.05  # an answer later than this is lost (and its probe with it)
# Linux: the kernel stamps each datagram's arrival (option 35 there; Python does not name it)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform == "linux" else None)
_TIMESPEC = struct.Struct("@qq")  # the stamp: CLOCK_REALTIME seconds, nanoseconds
MAX_STAMP_AGE_NS = 1_000_000_000  # a kernel stamp older than this (or in the future): the wall clock stepped
PAIR_GAP_NS = 2_000  # two clock reads further apart than this were preempted: read them again

log = logging.getLogger("cpcli.clock")


def clock_key(creds: Credentials) -> bytes | None:
    """The key of a cluster's clock probes; None with no security (`--insecure`)."""
    return None if creds.insecure else creds.clock_key


def clock_keys(keys: Callable[[], Credentials]) -> Callable[[], bytes | None]:
    """The clock key of the current credentials, derived once per credentials (read at every probe)."""
    last: list[tuple[Credentials, bytes | None]] = []

    def key() -> bytes | None:
        creds = keys()
        if not last or last[0][0] is not creds:
            last[:] = [(creds, clock_key(creds))]
        return last[0][1]
    return key


class _Mac:
    """A keyed blake2b: the MAC of probes and answers."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self._base = hashlib.blake2b(key=key, digest_size=MAC_BYTES)  # copied per datagram: the key set up once

    def of(self, data: bytes) -> bytes:
        mac = self._base.copy()
        mac.update(data)
        return mac.digest()

    def valid(self, datagram: bytes) -> bool:
        return hmac.compare_digest(self.of(datagram[:-MAC_BYTES]), datagram[-MAC_BYTES:])


class ClockServer:
    """The manager's side: answers every valid probe with its receive and send times.

    `key` gives the cluster's clock key at each probe (None: the unkeyed format, `--insecure`), so
    a rotated secret applies at once.
    """

    def __init__(self, host: str, port: int, key: Callable[[], bytes | None]) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._sock.bind((host, port))
        except OSError as err:
            self._sock.close()
            raise TransportError(f"cannot listen for clock probes on UDP {host}:{port} ({err.strerror})",
                                 hint="another program holds that UDP port; pick another --port") from err
        self.port: int = self._sock.getsockname()[1]  # `port` 0: the one the system chose
        self._sock.settimeout(0.2)
        _stamp_arrivals(self._sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="clock-server", daemon=True)
        self._key = key
        self._mac: _Mac | None = None
        self.answered = 0
        self.ignored = 0

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer, t2 = _receive(self._sock)
            except TimeoutError:
                continue
            except OSError:
                return
            mac = self._mac_of(self._key())
            if mac is None:
                valid = len(data) == _PROBE.size and data.startswith(MAGIC)
            else:  # never answered unless signed: no reflection of a stranger's datagram at anyone
                valid = len(data) == _PROBE.size + MAC_BYTES and data.startswith(MAGIC_MAC) and mac.valid(data)
            if not valid:
                self.ignored += 1
                continue
            _, seq, t1 = _PROBE.unpack_from(data)
            try:
                if mac is None:
                    self._sock.sendto(_ANSWER.pack(MAGIC, seq, t1, t2, time.monotonic_ns()), peer)
                else:
                    answer = _ANSWER.pack(MAGIC_MAC, seq, t1, t2, time.monotonic_ns())  # t3 as late as the MAC allows
                    self._sock.sendto(answer + mac.of(answer), peer)
                self.answered += 1
            except OSError:
                self.ignored += 1

    def _mac_of(self, key: bytes | None) -> _Mac | None:
        if key is None:
            return None
        if self._mac is None or self._mac.key != key:
            self._mac = _Mac(key)
        return self._mac

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


class ClockClient:
    """A worker's side: a burst of probes every INTERVAL_S; `on_estimate` gets each new mapping."""

    def __init__(self, host: str, port: int, on_estimate: Callable[[ClockMapping, Probe], None],
                 interval_s: float = INTERVAL_S, local: str = "", *, key: bytes | None) -> None:
        """`local`: this machine's address to probe from (the worker's --interface); `key`: the cluster's
        clock key (`clock_key`), None for the unkeyed format of `--insecure`."""
        self.key = key
        self._mac = None if key is None else _Mac(key)
        self._address = (host, port)
        self._on_estimate = on_estimate
        self._interval_s = interval_s
        self.estimator = OffsetEstimator()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._sock.bind((local, 0))
            self._sock.connect(self._address)  # only the manager's datagrams come in
        except OSError as err:
            self._sock.close()
            raise TransportError(f"cannot probe the manager's clock at UDP {host}:{port} from {local or 'here'} "
                                 f"({err.strerror})") from err
        self._sock.settimeout(PROBE_TIMEOUT_S)
        _stamp_arrivals(self._sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clock-client", daemon=True)
        self._seq = 0
        self.lost = 0
        self.ignored = 0  # datagrams that were not a valid answer (unsigned or forged)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            probes = [p for p in (self._probe() for _ in range(BURST)) if p is not None]
            best = self.estimator.add_burst(probes)
            mapping = self.estimator.estimate()
            if best is not None and mapping is not None:
                self._on_estimate(mapping, best)
            self._stop.wait(self._interval_s)

    def _probe(self) -> Probe | None:
        self._seq += 1
        mac = self._mac
        t1 = time.monotonic_ns()
        if mac is None:
            probe = _PROBE.pack(MAGIC, self._seq, t1)
        else:  # the MAC is made after t1, as the server's after t3: the two delays cancel in the offset
            probe = _PROBE.pack(MAGIC_MAC, self._seq, t1)
            probe += mac.of(probe)
        try:
            self._sock.send(probe)
            deadline = time.monotonic() + PROBE_TIMEOUT_S
            while True:  # bounded by the deadline: late answers of earlier probes are skipped
                data, _, t4 = _receive(self._sock)
                if not self._answer_valid(data):
                    self.ignored += 1
                else:
                    _, seq, echoed, t2, t3 = _ANSWER.unpack_from(data)
                    if seq == self._seq and echoed == t1:
                        time.sleep(BURST_GAP_S)
                        return Probe(t1, t2, t3, t4)
                if time.monotonic() > deadline:
                    raise TimeoutError
        except (TimeoutError, OSError):
            self.lost += 1
            return None

    def _answer_valid(self, data: bytes) -> bool:
        if self._mac is None:
            return len(data) == _ANSWER.size and data.startswith(MAGIC)
        return len(data) == _ANSWER.size + MAC_BYTES and data.startswith(MAGIC_MAC) and self._mac.valid(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


def _stamp_arrivals(sock: socket.socket) -> None:
    """Ask the kernel to stamp each datagram's arrival (Linux); elsewhere arrivals are stamped on return."""
    if SO_TIMESTAMPNS is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


def _receive(sock: socket.socket) -> tuple[bytes, Any, int]:
    """A datagram, its sender, and when it arrived on the monotonic clock.

    The kernel's stamp is taken in the receive path, before this thread wakes up and waits for the GIL
    (up to the 5 ms switch interval when another thread of the process is busy): stamping after the
    return puts that wait on one side of the probe only, which biases its offset by half of it. The
    stamp is on CLOCK_REALTIME, moved onto the monotonic clock by the two clocks' difference read now
    (an NTP slew changes it by well under a microsecond per millisecond of waiting).
    """
    if not hasattr(sock, "recvmsg"):  # Windows
        data, peer = sock.recvfrom(64)
        return data, peer, time.monotonic_ns()
    data, ancillary, _, peer = sock.recvmsg(64, socket.CMSG_SPACE(_TIMESPEC.size))
    mono, real_minus_mono = _clock_pair()
    for level, kind, raw in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(raw)
            arrived = seconds * 1_000_000_000 + nanoseconds - real_minus_mono
            if 0 <= mono - arrived < MAX_STAMP_AGE_NS:
                return data, peer, arrived
    return data, peer, mono


def _clock_pair() -> tuple[int, int]:
    """Monotonic now, and CLOCK_REALTIME minus monotonic, read back to back.

    A preemption between the two reads would shift every converted stamp by its length, so the
    pair read with the shortest gap of up to three tries is kept (a few hundred ns apart).
    """
    gap = diff = mono = 0
    for attempt in range(3):
        before = time.monotonic_ns()
        real = time.clock_gettime_ns(time.CLOCK_REALTIME)
        after = time.monotonic_ns()
        if attempt == 0 or after - before < gap:
            gap, mono, diff = after - before, after, real - (before + after) // 2
        if gap < PAIR_GAP_NS:
            break
    return mono, diff
