"""Clock probes over UDP: the manager answers at once from its own thread; a worker's thread probes it.

UDP, on the same port number as the manager's control socket, because a probe must not wait behind
anything: no connection, no queue shared with control messages, no ZeroMQ I/O thread hop. A probe
is `MAGIC seq t1` (24 bytes); the answer `MAGIC seq t1 t2 t3` (40 bytes). Anything else is ignored.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable

from cpcli.clock import ClockMapping
from cpcli.clocksync import OffsetEstimator, Probe
from cpcli.errors import TransportError

MAGIC = b"CPCLOCK1"
_PROBE = struct.Struct("!8sqq")  # magic, seq, t1
_ANSWER = struct.Struct("!8sqqqq")  # magic, seq, t1, t2, t3
BURST = 8  # probes per burst; the lowest round trip of them is kept
BURST_GAP_S = 0.002  # between the probes of a burst
INTERVAL_S = 1.0  # between bursts: the estimate is refreshed this often
PROBE_TIMEOUT_S = 0.05  # an answer later than this is lost (and its probe with it)

log = logging.getLogger("cpcli.clock")


class ClockServer:
    """The manager's side: answers every valid probe with its receive and send times."""

    def __init__(self, host: str, port: int) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._sock.bind((host, port))
        except OSError as err:
            self._sock.close()
            raise TransportError(f"cannot listen for clock probes on UDP {host}:{port} ({err.strerror})",
                                 hint="another program holds that UDP port; pick another --port") from err
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="clock-server", daemon=True)
        self.answered = 0
        self.ignored = 0

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(64)
            except TimeoutError:
                continue
            except OSError:
                return
            t2 = time.monotonic_ns()
            if len(data) != _PROBE.size or not data.startswith(MAGIC):
                self.ignored += 1
                continue
            _, seq, t1 = _PROBE.unpack(data)
            try:
                self._sock.sendto(_ANSWER.pack(MAGIC, seq, t1, t2, time.monotonic_ns()), peer)
                self.answered += 1
            except OSError:
                self.ignored += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


class ClockClient:
    """A worker's side: a burst of probes every INTERVAL_S; `on_estimate` gets each new mapping."""

    def __init__(self, host: str, port: int, on_estimate: Callable[[ClockMapping, Probe], None],
                 interval_s: float = INTERVAL_S) -> None:
        self._address = (host, port)
        self._on_estimate = on_estimate
        self._interval_s = interval_s
        self.estimator = OffsetEstimator()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.settimeout(PROBE_TIMEOUT_S)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clock-client", daemon=True)
        self._seq = 0
        self.lost = 0

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
        t1 = time.monotonic_ns()
        try:
            self._sock.sendto(_PROBE.pack(MAGIC, self._seq, t1), self._address)
            deadline = time.monotonic() + PROBE_TIMEOUT_S
            while True:  # bounded by the deadline: late answers of earlier probes are skipped
                data = self._sock.recv(64)
                t4 = time.monotonic_ns()
                if len(data) == _ANSWER.size and data.startswith(MAGIC):
                    _, seq, echoed, t2, t3 = _ANSWER.unpack(data)
                    if seq == self._seq and echoed == t1:
                        time.sleep(BURST_GAP_S)
                        return Probe(t1, t2, t3, t4)
                if time.monotonic() > deadline:
                    raise TimeoutError
        except (TimeoutError, OSError):
            self.lost += 1
            return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
