"""Data plane, sending end: one XPUB per node, sequence numbers that make drops visible (the
reading end, one per input, is `subscriber.Subscriber`).

Each port has two paths. Its ZeroMQ topic `node/port` carries payloads inline (TCP, for other
machines). Readers on the publisher's own machine connect to its same-host socket instead
(`bell`: one Unix connection each, no ZeroMQ thread in between) and get large arrays as a
reference to a shared-memory slot (written once, read in place). The publisher sends on a path
only while someone reads it, so a node never pays for a path nobody uses.

In a cluster both ends take the session's `DataSecurity`: the publisher lets in only members
(Curve, encrypted; or PLAIN with the session's password when the recipe says `encrypt_data:
false`), so a stranger can neither read a stream nor send the subscriptions that steer it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from cpcli.errors import TransportError
from cpcli.transport import bell, preview, shm
from cpcli.transport.curve import DataSecurity, Gatekeeper
from cpcli.transport.protocol import (
    KIND_ARRAY,
    KIND_END,
    KIND_OBJECT,
    KIND_SHM,
    KIND_SHM_OBJECT,
    Header,
    encode_header,
    pack_object,
    topic_for,
)

DATA_HWM = 64  # messages queued per subscriber before PUB drops; bounds memory at 64 frames
LINGER_MS = 0  # data is recorded at its source; nothing in flight is worth a hung exit
END_LINGER_MS = 1000  # a normal end: samples still queued (the last ones) get this long to leave
SHM_THRESHOLD_BYTES = 64 * 1024  # below this a copy through ZeroMQ costs less than a slot
SHM_POOL_MAX_BYTES = 512 * 1024 * 1024  # a publisher's pool never grows past this
# Fewer slots than ZeroMQ can queue for one subscriber (its pipes report full from about half
# of DATA_HWM on), so a `sync: all` reader's backlog is bounded by slots, never dropped by ZeroMQ.
SHM_MAX_SLOTS = DATA_HWM // 2 - 8
BACKPRESSURE_TIMEOUT_S = 1.0  # longest a source waits for a `sync: all` reader before dropping
CONSTANT_MAX_BYTES = SHM_POOL_MAX_BYTES // 2  # pinned values (sent again and again) take at most this
MAX_SUBSCRIPTION_BYTES = 1024  # a subscription names one of our topics: far shorter than this
_SUBSCRIBE, _UNSUBSCRIBE = 1, 0


@dataclass(frozen=True)
class SharedMemoryPlan:
    """How a publisher shares memory with the readers on its machine (its segments are named by
    the prefix given to `Publisher.open_local`)."""

    local_readers: int  # subscriptions from this machine, to size the pool
    all_readers: tuple[tuple[int, str], ...] = ()  # (reader index, port) of `sync: all` inputs (backpressure)
    threshold_bytes: int = SHM_THRESHOLD_BYTES


class Publisher:
    """A node's one XPUB socket: publishes every output port and sees who subscribes."""

    def __init__(self, context: zmq.Context[Any], node_id: str, ports: Sequence[str], host: str = "127.0.0.1",
                 logger: logging.Logger | None = None, security: DataSecurity | None = None) -> None:
        """`security`: who may subscribe (None: anyone who reaches `host`, for loopback-only sessions).

        A secured publisher runs the gatekeeper of `context`, so a context holds at most one.
        """
        self._log = logger or logging.getLogger("cpcli.pubsub")
        self._gatekeeper: Gatekeeper | None = None
        if security is not None and not security.credentials.insecure:
            self._gatekeeper = _start_gatekeeper(context, security, self._log, node_id)
        self._socket: zmq.Socket[Any] = context.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.LINGER, LINGER_MS)
        self._socket.setsockopt(zmq.SNDHWM, DATA_HWM)
        self._socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscribe, so we can count peers
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)  # a reader only ever subscribes
        try:
            if security is not None:
                security.serve(self._socket)  # before the bind, like every socket option
            port = self._socket.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as err:
            self._socket.close()
            if self._gatekeeper is not None:
                self._gatekeeper.close()
            raise TransportError(f"cannot bind a data socket on {host} ({err})") from err
        self.endpoint = f"tcp://{host}:{port}"
        self._topics = {p: topic_for(node_id, p) for p in ports}
        self._preview_topics = {p: preview.preview_topic(t) for p, t in self._topics.items()}
        self._known = {*self._topics.values(), *self._preview_topics.values()}
        self._bell: bell.BellServer | None = None
        self._prefix: str | None = None
        self._shared_from = min(SHM_THRESHOLD_BYTES, bell.INLINE_MAX_BYTES)  # arrays this large go by slot
        self._previews: dict[str, preview.PreviewState] = {}
        self.previews_sent = 0
        self._seq = dict.fromkeys(ports, 0)
        self._subscribers: dict[bytes, int] = {}
        self._plan: SharedMemoryPlan | None = None
        self._pool: shm.SlotPool | None = None
        self.pool_dropped = 0  # samples no slot could be found for in time: counted, never hidden
        self._owner = threading.get_ident()  # lending is for the node's own thread (setup, step)
        self._loans: dict[int, _Loan] = {}  # data address -> slot lent out since the last end_step()
        self._constants: dict[int, _Constant] = {}  # data address -> a value sent again and again
        self._constant_bytes = 0
        self._waited: set[str] = set()  # ports whose lend this step found no slot in time
        self.lent_sent = 0  # samples sent from a lent or pinned slot: written once, copied by nobody

    @property
    def socket(self) -> zmq.Socket[Any]:
        return self._socket

    @property
    def local_fd(self) -> int | None:
        """Readable when the same-host socket needs `handle_subscriptions()` (None: no such socket)."""
        return self._bell.fileno() if self._bell is not None else None

    def open_local(self, prefix: str) -> bool:
        """Listen for readers on this machine (named after the shared-memory `prefix`); False where
        this system has no such sockets (its readers then use TCP)."""
        if not bell.available():
            return False
        try:
            self._bell = bell.BellServer(prefix, self._topics.values(), self._log, DATA_HWM)
        except TransportError as err:  # a sandbox without abstract sockets: TCP still works
            self._log.warning("%s; readers on this machine will use TCP", err)
            return False
        self._prefix = prefix
        return True

    def share_memory(self, plan: SharedMemoryPlan) -> None:
        """Size the shared-memory pool for the readers on this machine (`open_local` first)."""
        self._plan = plan
        self._shared_from = min(plan.threshold_bytes, bell.INLINE_MAX_BYTES)

    def handle_subscriptions(self) -> None:
        """Count subscribe/unsubscribe messages waiting on the socket; admit same-host readers."""
        if self._bell is not None:
            self._bell.handle()
        while True:
            try:
                msg = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[1:] not in self._known:  # not one of our topics: kept nowhere (a peer cannot grow our memory)
                continue
            if msg and msg[0] == _SUBSCRIBE:
                self._subscribers[msg[1:]] = self._subscribers.get(msg[1:], 0) + 1
            elif msg and msg[0] == _UNSUBSCRIBE and msg[1:].startswith(preview.PREVIEW_MARK):
                self._subscribers[msg[1:]] = 0  # the monitor left: stop making previews
            # A data topic's count never goes down: libzmq passes up a ZMTP/1.0 peer's unsubscribe even
            # for a topic it never subscribed to, so a stranger could silence a port. Readers leave only
            # when the session ends (a failing node stops it), so nothing is sent in vain for long.

    def subscribers(self, port: str) -> int:
        """Subscribers of a port over either path."""
        local = self._bell.readers(self._topics[port]) if self._bell is not None else 0
        return self._subscribers.get(self._topics[port], 0) + local

    def sent(self, port: str) -> int:
        """How many samples went out on a port (the next sequence number)."""
        return self._seq[port]

    def publish(self, port: str, value: Any, t_ns: int, rate_hz: float | None = None) -> int:
        """Send one sample on every path that has readers. Returns its sequence number."""
        seq = self._seq[port]
        self._seq[port] = seq + 1
        topic = self._topics[port]
        remote = self._subscribers.get(topic, 0) > 0
        local = self._bell is not None and self._bell.readers(topic) > 0
        if isinstance(value, np.ndarray) and not value.dtype.hasobject:
            if self._loans or self._constants:
                loan = self._loan_of(value)
                # A lent slot goes out once: sent on a second port it is copied (one reader process
                # of both would otherwise share one lock on the slot, and let go of it twice).
                if loan is not None and (isinstance(loan, _Constant) or loan.ref is None):
                    self._publish_loan(port, loan, value, seq, t_ns, rate_hz, local, remote)
                    return seq
            array = np.ascontiguousarray(value)
            shared = local and array.nbytes >= self._shared_from
            if shared:
                self._publish_shared(port, array, seq, t_ns, rate_hz, KIND_SHM)
            if remote or (local and not shared):
                header = encode_header(Header(seq, t_ns, KIND_ARRAY, array.dtype.str, array.shape, rate_hz))
                if local and not shared:
                    self._send_local(topic, (bell.frame(header), array.data))
                if remote:
                    self._socket.send_multipart([topic, header, array.data], copy=False)
            return seq
        if local or remote:
            payload = pack_object(value)
            header = encode_header(Header(seq, t_ns, KIND_OBJECT, rate_hz=rate_hz))
            if local:
                if len(payload) > bell.INLINE_MAX_BYTES:
                    self._publish_shared(port, np.frombuffer(payload, dtype=np.uint8), seq, t_ns, rate_hz,
                                         KIND_SHM_OBJECT)
                else:
                    self._send_local(topic, (bell.frame(header), payload))
            if remote:
                self._socket.send_multipart([topic, header, payload])
        return seq

    def _send_local(self, topic: bytes, parts: tuple[Any, ...], force: bool = False) -> None:
        assert self._bell is not None
        self._bell.send(topic, parts, force)

    def offer_preview(self, port: str, value: Any, t_ns: int) -> None:
        """Send a preview of this sample if a monitor watches the port and the last one is old enough."""
        topic = self._preview_topics[port]
        if not self._subscribers.get(topic):
            self._previews.pop(port, None)
            return
        state = self._previews.setdefault(port, preview.PreviewState())
        preview.accumulate(state, value)
        if t_ns - state.last_ns < preview.PREVIEW_INTERVAL_NS:
            return
        state.last_ns = t_ns
        shown = preview.make(value, state)
        try:
            if isinstance(shown, np.ndarray):
                header = encode_header(Header(self._seq[port] - 1, t_ns, KIND_ARRAY, shown.dtype.str, shown.shape))
                self._socket.send_multipart([topic, header, shown.data], zmq.NOBLOCK)
            else:
                header = encode_header(Header(self._seq[port] - 1, t_ns, KIND_OBJECT))
                self._socket.send_multipart([topic, header, pack_object(shown)], zmq.NOBLOCK)
        except (zmq.Again, TransportError):
            return  # a slow monitor, or a value that is not plain data: the preview is skipped, never the data
        self.previews_sent += 1

    def _publish_shared(self, port: str, array: np.ndarray, seq: int, t_ns: int, rate_hz: float | None,
                        kind: str) -> None:
        pool = self._pool or self._make_pool(array.nbytes)
        waited = port in self._waited  # this step already waited for a slot for this port, in vain
        ref = pool.write(array, seq, 0.0 if waited else BACKPRESSURE_TIMEOUT_S, port)
        if ref is None:  # every slot still held: the readers see a gap in sequence numbers
            self._count_pool_drop(port)
            return
        self._send_ref(port, ref, Header(seq, t_ns, kind, array.dtype.str, array.shape, rate_hz))

    def _send_ref(self, port: str, ref: shm.SlotRef, header: Header) -> None:
        """Tell same-host readers where sample `header` lies in the pool."""
        header = header._replace(slot=ref.slot, generation=ref.generation)
        self._send_local(self._topics[port], (bell.frame(encode_header(header)),))

    # -- values built in place (lent slots) and values sent again and again (pinned slots) ------

    def lend(self, port: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """A writable array for the node to build the next value of `port` in. Returned from this
        step, it is sent and recorded with no copy; kept, it is taken back at `end_step()`. Where
        nobody reads the port on this machine (or the pool is full) it is plain memory."""
        topic = self._topics.get(port)
        if topic is None:
            raise TransportError(f"node has no output port {port!r} (its outputs: {', '.join(self._topics)})")
        nbytes = math.prod(shape) * dtype.itemsize
        if (self._bell is None or nbytes < self._shared_from or not self._bell.readers(topic)
                or threading.get_ident() != self._owner or dtype.hasobject):
            return np.empty(shape, dtype)
        pool = self._pool or self._make_pool(nbytes)
        index = pool.lend(nbytes, 0.0 if port in self._waited else BACKPRESSURE_TIMEOUT_S)  # waits as sending would
        if index is None:  # still full: sending it this step drops it at once (counted), no second wait
            self._waited.add(port)
            return np.empty(shape, dtype)
        array = pool.view(index).view(dtype).reshape(shape)
        # The slot is not reused while this array (or a view of it) is alive anywhere: in the
        # recorder's queue, or kept by the node against the rules. Freed, it lets go by itself.
        pool.hold(index)
        weakref.finalize(array, pool.unhold, index)
        self._loans[array.__array_interface__["data"][0]] = _Loan(index, nbytes)
        return array

    def constant(self, value: np.ndarray) -> np.ndarray:
        """A read-only copy of `value` that may be sent any number of times: the first time a reader
        on this machine needs it, it is written once into a slot of its own, then only referenced."""
        array: np.ndarray = np.array(value, copy=True, order="C")
        array.flags.writeable = False
        if (not array.dtype.hasobject and array.nbytes >= self._shared_from
                and self._constant_bytes + array.nbytes <= CONSTANT_MAX_BYTES):
            self._constants[array.__array_interface__["data"][0]] = _Constant(array)
            self._constant_bytes += array.nbytes
        return array

    def _loan_of(self, value: np.ndarray) -> _Loan | _Constant | None:
        """The lent or pinned slot `value` is (the whole of it, in order), if it is one."""
        if not value.flags.c_contiguous:
            return None
        address = value.__array_interface__["data"][0]
        found: _Loan | _Constant | None = self._loans.get(address) or self._constants.get(address)
        if found is None:
            return None
        return found if value.nbytes == found.nbytes else None

    def _publish_loan(self, port: str, loan: _Loan | _Constant, value: np.ndarray, seq: int, t_ns: int,
                      rate_hz: float | None, local: bool, remote: bool) -> None:
        header = Header(seq, t_ns, KIND_SHM, value.dtype.str, value.shape, rate_hz)
        if local:
            ref = self._shared_ref(loan, seq, port)
            if ref is None:
                self._count_pool_drop(port)
            else:
                self._send_ref(port, ref, header)
                self.lent_sent += 1
        if remote:
            # A lent slot is reused once readers let go: ZeroMQ must copy it (a pinned one never changes).
            self._socket.send_multipart([self._topics[port], encode_header(header._replace(kind=KIND_ARRAY)),
                                         value.data], copy=isinstance(loan, _Loan))

    def _shared_ref(self, loan: _Loan | _Constant, seq: int, port: str) -> shm.SlotRef | None:
        pool = self._pool
        if isinstance(loan, _Loan):
            assert pool is not None
            loan.ref = pool.publish_lent(loan.index, seq, port)
            return loan.ref
        pool = pool or self._make_pool(loan.array.nbytes)
        if loan.ref is None:
            loan.ref = pool.pin(loan.array)
            if loan.ref is None:
                return pool.write(loan.array, seq, BACKPRESSURE_TIMEOUT_S, port)  # no room to pin: copied as usual
        deadline = time.monotonic() + BACKPRESSURE_TIMEOUT_S
        while not pool.all_readers_within(seq, SHM_MAX_SLOTS, port):  # a pinned slot bounds no backlog itself
            if time.monotonic() >= deadline:
                return None
            time.sleep(shm.BACKPRESSURE_POLL_S)
        return loan.ref

    def for_recording(self, value: Any) -> Any:
        """What the recorder may queue of a sample just published: a lent slot stays held while the
        recorder has it, so once lent arrays hold a quarter of the pool it gets a copy instead (a
        slow disk never starves the readers)."""
        if not self._loans or not isinstance(value, np.ndarray):
            return value
        pool = self._pool
        if pool is not None and isinstance(self._loan_of(value), _Loan) and pool.held >= max(2, pool.max_slots // 4):
            return value.copy()
        return value

    def end_step(self) -> None:
        """The step is over: lent slots it did not send are free again (once their arrays are gone)."""
        if self._loans:
            assert self._pool is not None
            for loan in self._loans.values():
                if loan.ref is None:
                    self._pool.take_back(loan.index)
            self._loans.clear()
        self._waited.clear()

    def _count_pool_drop(self, port: str) -> None:
        self.pool_dropped += 1
        if self.pool_dropped == 1:
            self._log.warning("shared-memory pool full for %s: dropping samples (counted)", port)

    def _make_pool(self, nbytes: int) -> shm.SlotPool:
        assert self._prefix is not None and self._bell is not None
        plan = self._plan or SharedMemoryPlan(sum(map(self._bell.readers, self._topics.values())))
        initial = 2 + 2 * plan.local_readers
        most = max(initial, min(SHM_MAX_SLOTS, SHM_POOL_MAX_BYTES // max(1, nbytes + shm.HEADER_BYTES)))
        self._pool = shm.SlotPool(self._prefix, initial_slots=initial, max_slots=most)
        for index, port in plan.all_readers:
            self._pool.expect_all_reader(index, port)
        return self._pool

    def end(self) -> None:
        """Tell subscribers every port is finished (carries the count sent, so tail drops show)."""
        for port, topic in self._topics.items():
            header = encode_header(Header(self._seq[port], 0, KIND_END))
            self._socket.send_multipart([topic, header])
            if self._bell is not None:
                self._send_local(topic, (bell.frame(header),), force=True)

    def close(self, linger_ms: int = LINGER_MS, keep_pool: bool = False) -> None:
        """Close; `linger_ms` lets what is still queued leave first (a normal end), bounded;
        `keep_pool` leaves the shared memory for `close_pool()` once those messages are out."""
        if self._bell is not None:  # waits (up to linger_ms) for slow same-host readers to take the rest
            self._bell.close(linger_ms / 1000)
            self._bell = None
        self._socket.close(linger=linger_ms)
        if self._gatekeeper is not None:  # after the socket: no handshake is left waiting on it
            self._gatekeeper.close()
            self._gatekeeper = None
        if not keep_pool:
            self.close_pool()

    def close_pool(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _start_gatekeeper(context: zmq.Context[Any], security: DataSecurity, logger: logging.Logger,
                      node_id: str) -> Gatekeeper:
    # Before the bind: libzmq admits everyone while no ZAP handler listens in the context.
    try:
        gatekeeper = Gatekeeper(context, lambda: security.credentials, security.passwords, logger,
                                what=f"node {node_id}")
    except zmq.ZMQError as err:  # EADDRINUSE: this context already has a gatekeeper
        raise TransportError(f"node {node_id}: cannot start the gatekeeper of its data socket ({err})",
                             hint="a ZeroMQ context holds one secured publisher; give each its own context") \
            from err
    return gatekeeper.start()


@dataclass
class _Loan:
    """A slot lent to the node for one step."""

    index: int
    nbytes: int
    ref: shm.SlotRef | None = None  # set once it is sent


@dataclass
class _Constant:
    """A value the node sends again and again; pinned into a slot the first time a reader here needs it."""

    array: np.ndarray
    ref: shm.SlotRef | None = None

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)
