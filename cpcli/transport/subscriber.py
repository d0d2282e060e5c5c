"""The reading end of a node's input: one upstream topic, over TCP or its publisher's same-host socket.

Sequence numbers make drops visible: a gap is counted, never hidden; a stream that ends says how
many samples were sent, so what never arrived counts too. Shared-memory samples are held (the
slot cannot be reused) until the node is done with them (`release`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import zmq

from cpcli.errors import TransportError
from cpcli.node import Sample
from cpcli.transport import bell, shm
from cpcli.transport.curve import DataSecurity
from cpcli.transport.protocol import (
    KIND_ARRAY,
    KIND_END,
    KIND_SHM_OBJECT,
    SHM_KINDS,
    array_from_payload,
    decode_header,
    unpack_object,
)
from cpcli.transport.pubsub import DATA_HWM, LINGER_MS


@functools.lru_cache(maxsize=64)
def _dtype(name: str) -> np.dtype[Any]:
    """numpy parses a dtype string on every call; a stream has one or two."""
    return np.dtype(name)


class Subscriber:
    """One input of a node: the upstream node's topic, with gaps in sequence numbers counted.

    From another machine it reads a ZeroMQ SUB socket. With `shared_memory` (prefix, reader
    index: the publisher is on this machine) it reads the publisher's same-host socket instead and
    holds each shared-memory sample until `release(seq)`. `security` must match the publisher's
    (a mismatch is refused at the handshake: nothing arrives, the publisher never sees us subscribe).
    """

    def __init__(self, context: zmq.Context[Any], key: str, endpoint: str, topic: bytes,
                 logger: logging.Logger, shared_memory: tuple[str, int | None] | None = None,
                 security: DataSecurity | None = None) -> None:
        self.key = key
        self.source, _, self.port = topic.decode().partition("/")
        self._log = logger
        self._topic = topic
        self._reader: shm.SlotReader | None = None
        self._bell: bell.BellClient | None = None
        self._socket: zmq.Socket[Any] | None = None
        if shared_memory is not None:
            prefix, index = shared_memory
            try:
                self._bell = bell.BellClient(prefix, topic, shm.prefix_pid(prefix))
                self._reader = shm.SlotReader(prefix, index)
            except TransportError as err:
                if index is not None:  # a `sync: all` reader the pool waits for: it must read the pool
                    raise
                # the publisher serves TCP too: slower, but nothing is lost
                self._log.warning("input %s: %s; reading it over TCP instead", key, err)
        if self._bell is None:
            self._socket = context.socket(zmq.SUB)
            self._socket.setsockopt(zmq.LINGER, LINGER_MS)
            self._socket.setsockopt(zmq.RCVHWM, DATA_HWM)
            self._socket.setsockopt(zmq.SUBSCRIBE, topic)
            if security is not None:
                security.connect_to(self._socket)
            self._socket.connect(endpoint)
        self.received = 0
        self._dropped_on_wire = 0
        self.malformed = 0
        self.ended = False
        self._next_seq = 0
        self._final_seq: int | None = None  # how many the publisher sent, once it has finished

    @property
    def socket(self) -> zmq.Socket[Any] | int:
        """What to poll for this input: its ZeroMQ socket, or the file descriptor of its same-host socket."""
        if self._bell is not None:
            return self._bell.fileno()
        assert self._socket is not None
        return self._socket

    @property
    def dropped(self) -> int:
        """Samples lost on the way (sequence gaps): the publisher or the network dropped them."""
        return self._dropped_on_wire

    def expect_end(self, sent: int) -> None:
        """The publisher finished after sending `sent` samples (told by the supervisor: its own
        end-of-stream message may have been dropped by a full queue)."""
        self._final_seq = sent
        if self._next_seq >= sent:
            self.ended = True

    def settle(self) -> None:
        """Once the publisher has finished, an input with nothing left in its socket has ended:
        what never came was dropped on the way (counted by `count_unreceived`)."""
        if self._final_seq is not None and not self.ended and not self._pending():
            self.ended = True

    def _pending(self) -> bool:
        if self._bell is not None:
            return self._bell.pending()
        assert self._socket is not None
        return bool(self._socket.poll(0))

    def count_unreceived(self) -> int:
        """At the end: samples the publisher sent that never arrived here count as dropped."""
        if self._final_seq is None or self._next_seq >= self._final_seq:
            return 0
        missing = self._final_seq - self._next_seq
        self._dropped_on_wire += missing
        self._next_seq = self._final_seq
        return missing

    @property
    def stale(self) -> int:
        """Shared-memory samples whose slot the publisher reused before this input read them."""
        return self._reader.stale if self._reader is not None else 0

    def receive(self) -> Sample | None:
        """The next sample waiting, or None when there is none (or the stream has ended)."""
        while True:
            if self._bell is not None:
                record = self._bell.recv()
                if record is None:
                    return None
                sample = self._decode_record(record)
            else:
                assert self._socket is not None
                try:
                    frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return None
                sample = self._decode(frames)
            if sample is not None:
                return sample
            if self.ended:
                return None

    def release(self, sample: Sample) -> None:
        """This input is done with a sample: its shared-memory slot may be reused."""
        if self._reader is not None:
            self._reader.release(sample.seq)

    def _decode(self, frames: list[zmq.Frame]) -> Sample | None:
        if len(frames) < 2 or frames[0].bytes != self._topic:
            return None  # another port of the same node that shares our topic prefix
        if len(frames) > 3:
            return self._malformed(TransportError(f"{len(frames)} frames in a data message"))
        return self._read(frames[1].buffer, frames[2].buffer if len(frames) == 3 else None)

    def _decode_record(self, record: bytes) -> Sample | None:
        try:
            header, payload = bell.split(record)
        except TransportError as err:
            return self._malformed(err)
        return self._read(header, payload)

    def _read(self, raw_header: memoryview, payload: memoryview | None) -> Sample | None:
        """One message: its header and its payload (None: the message had no payload part)."""
        try:
            header = decode_header(raw_header)
            if header.kind == KIND_END:
                self._count_gap(header.seq)
                self.ended = True
                return None
            if header.kind in SHM_KINDS:
                if self._reader is None or payload:
                    raise TransportError("a shared-memory reference reached a TCP input")
                self._count_gap(header.seq)
                self._next_seq = header.seq + 1
                value = self._reader.open(shm.SlotRef(header.slot, header.generation), header.seq,
                                          _dtype(header.dtype), header.shape)
                if value is None:
                    return None  # stale: counted by the reader
                if header.kind == KIND_SHM_OBJECT:
                    try:
                        value = unpack_object(value.data)
                    finally:
                        self._reader.release(header.seq)  # unpacked: the slot is free again
                self.received += 1
                return Sample(value, t_ns=header.t_ns, rate_hz=header.rate_hz, seq=header.seq)
            if payload is None:
                raise TransportError("a data message without its payload")
            value = array_from_payload(header, payload) if header.kind == KIND_ARRAY else unpack_object(payload)
        except (TransportError, ValueError, TypeError) as err:
            return self._malformed(err)
        self._count_gap(header.seq)
        self._next_seq = header.seq + 1
        self.received += 1
        return Sample(value, t_ns=header.t_ns, rate_hz=header.rate_hz, seq=header.seq)

    def _malformed(self, err: Exception) -> Sample | None:
        """Count and (once) log a message that is not ours to read; nothing to step on."""
        self.malformed += 1
        if self.malformed == 1:
            self._log.warning("input %s: dropped a malformed message (%s)", self.key, err)
        return None

    def _count_gap(self, seq: int) -> None:
        if seq > self._next_seq:
            self._dropped_on_wire += seq - self._next_seq
            self._next_seq = seq
        if self._final_seq is not None and seq + 1 >= self._final_seq:
            self.ended = True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=LINGER_MS)
        if self._bell is not None:
            self._bell.close()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
