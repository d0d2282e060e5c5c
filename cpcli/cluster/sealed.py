"""Sealed streams: a large file's chunks sent beside Curve, each one sealed with AES-256-GCM under a key of that file.

Curve (libsodium's XSalsa20-Poly1305, behind libzmq's copies) costs about 1 CPU s per GiB across
the two ends of a transfer; AES-256-GCM (AES-NI through OpenSSL, by `cryptography`) about 0.15.
So for a large file an archive server hands a member, over the member's Curve connection, a
*seal*: a ticket id, an AES key and a MAC key (all random, for that file only) and the port of the
server's plain data socket. The member asks that socket for chunks, each request with a MAC under
the MAC key: a request without a valid one is dropped unread, so a stranger on the port makes the
server read nothing. Each reply is the chunk encrypted under the AES key; its nonce is a counter
the server never repeats under that key, and the ticket id and the reply's header (offset, size,
counter) are authenticated with it, so a chunk cannot be altered, replayed into another place or
passed off as another file's. An unknown ticket id is answered SEAL_GONE, so a member whose seal
ended asks for a new one instead of waiting.

A seal ends when it has been idle SEAL_IDLE_S, when the server's keys change (a rotation: whoever
got it under the old keys gets nothing more), when its worker deletes the part, or when the
server stops; at most MAX_SEALS are open (the oldest goes first). A seal holds its file open: the
bytes served are those of the file it was issued for, whatever happens to the path meanwhile.

Wire (DEALER -> ROUTER, ZeroMQ's NULL mechanism: the protection is the seal, not the connection):
  request  [GET, ticket id (16), offset u64 + size u32 (12), MAC (16)]
  reply    [SEALED, ticket id, offset u64 + size u32 + counter u64 (20), ciphertext + tag (size + 16)]
           [SEAL_GONE, ticket id]
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

GET = b"GET"
SEALED = b"SEALED"
SEAL_GONE = b"SEAL_GONE"
TICKET_BYTES = 16  # random: nobody guesses one
KEY_BYTES = 32  # AES-256
MAC_BYTES = 16  # keyed blake2b of a request
CHUNK_BYTES = 4 << 20  # the largest sealed chunk: with the cipher this cheap, each chunk's Python and ZeroMQ
#   round is what costs; 4 MiB chunks took ~20 % less CPU per GiB than 1 MiB ones (both ends, measured)
TAG_BYTES = 16  # AES-GCM's
REQUEST = struct.Struct(">QI")  # offset, size
HEADER = struct.Struct(">QIQ")  # offset, size, counter (the nonce)
SEAL_IDLE_S = 60.0  # a seal nobody asked anything of this long is closed (a collect paused, a laptop asleep)
MAX_SEALS = 64  # open files per archive server at most; a collect uses one per worker at a time
MAX_REQUEST_BYTES = 64  # the largest frame the data socket takes: requests are 48 bytes
HWM = 16  # queued replies (up to 4 MiB each) per peer: a member asks for at most its credit (4) ahead
LINGER_MS = 0  # the data socket's replies are worth nothing once the server stops
SERVE_BATCH = 64  # requests answered per turn of the server's loop, at most


class SealError(Exception):
    """A reply that does not authenticate under its seal (altered on the way, or not from the server)."""


def request_mac(mac_key: bytes, ticket: bytes, fields: bytes) -> bytes:
    return hashlib.blake2b(ticket + fields, key=mac_key, digest_size=MAC_BYTES).digest()


def _nonce(counter: int) -> bytes:
    return bytes(4) + counter.to_bytes(8, "big")


@dataclass
class _Seal:
    ticket: bytes
    fd: int
    path: Path  # the file's real path: deleting it closes its seals
    aes: AESGCM = field(repr=False)
    mac_key: bytes = field(repr=False)
    used: float
    counter: int = 0


class SealedStreams:
    """The archive server's plain data socket and its open seals; used only by the server's thread."""

    def __init__(self, context: zmq.Context[Any], host: str, logger: logging.Logger,
                 idle_s: float = SEAL_IDLE_S) -> None:
        self._log = logger
        self._idle_s = idle_s
        sock: zmq.Socket[Any] = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        try:
            self.port = sock.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError:
            sock.close()
            raise
        self.socket = sock
        self._seals: dict[bytes, _Seal] = {}
        self._buffer = bytearray(0)  # the chunk read, before it is sealed
        self.dropped = 0  # requests dropped unread: malformed, or without a valid MAC
        self.served_bytes = 0

    def issue(self, target: Path) -> dict[str, Any]:
        """Open `target` (already checked by the server) under a new seal; what the member needs, for the reply."""
        self.expire()
        while len(self._seals) >= MAX_SEALS:
            self._close(min(self._seals.values(), key=lambda s: s.used).ticket)
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        key, mac_key, ticket = AESGCM.generate_key(KEY_BYTES * 8), secrets.token_bytes(KEY_BYTES), \
            secrets.token_bytes(TICKET_BYTES)
        self._seals[ticket] = _Seal(ticket, fd, target, AESGCM(key), mac_key, time.monotonic())
        if not self._buffer:
            self._buffer = bytearray(CHUNK_BYTES)  # on first use: a worker nobody collects from never holds it
        return {"port": self.port, "ticket": ticket, "key": key, "mac": mac_key}

    def serve(self) -> None:
        """Answer the requests waiting, at most SERVE_BATCH (non-blocking): the Curve link gets its turn between."""
        for _ in range(SERVE_BATCH):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 5 or frames[1] != GET or len(frames[3]) != REQUEST.size:
                self.dropped += 1
                continue
            peer, _, ticket, fields, mac = frames
            seal = self._seals.get(ticket)
            if seal is None:
                self._send(peer, [SEAL_GONE, ticket[:TICKET_BYTES]])
                continue
            if not hmac.compare_digest(mac, request_mac(seal.mac_key, ticket, fields)):
                self.dropped += 1
                continue
            offset, size = REQUEST.unpack(fields)
            if not 0 < size <= len(self._buffer) or offset >= 1 << 62:
                self.dropped += 1  # a member's own bug: a MAC'd request out of bounds
                continue
            self._answer(peer, seal, offset, size)

    def _answer(self, peer: bytes, seal: _Seal, offset: int, size: int) -> None:
        view = memoryview(self._buffer)[:size]
        try:
            got = os.preadv(seal.fd, [view], offset)
        except OSError as err:
            self._log.warning("cannot read %s for a sealed stream (%s)", seal.path, err.strerror)
            self._close(seal.ticket)
            self._send(peer, [SEAL_GONE, seal.ticket])
            return
        header = HEADER.pack(offset, got, seal.counter)
        sealed = seal.aes.encrypt(_nonce(seal.counter), view[:got], seal.ticket + header)
        seal.counter += 1
        seal.used = time.monotonic()
        if self._send(peer, [SEALED, seal.ticket, header, sealed]):
            self.served_bytes += got

    def _send(self, peer: bytes, frames: list[bytes]) -> bool:
        try:
            self.socket.send_multipart([peer, *frames], zmq.NOBLOCK, copy=False)  # the sealed chunk uncopied
        except zmq.ZMQError:
            return False  # gone, or not reading: it asks again
        return True

    def expire(self) -> None:
        """Close the seals idle longer than `idle_s`; call it every turn of the owner's loop."""
        now = time.monotonic()
        for seal in [s for s in self._seals.values() if now - s.used > self._idle_s]:
            self._close(seal.ticket)

    def drop(self, files: set[Path] | None = None) -> None:
        """Close every seal (None: the keys changed), or the seals of `files` (real paths: a part being deleted)."""
        for seal in list(self._seals.values()):
            if files is None or seal.path in files:
                self._close(seal.ticket)

    def _close(self, ticket: bytes) -> None:
        seal = self._seals.pop(ticket)
        with contextlib.suppress(OSError):
            os.close(seal.fd)

    @property
    def open_seals(self) -> int:
        return len(self._seals)

    def close(self) -> None:
        """Idempotent."""
        self.drop()
        if not self.socket.closed:
            self.socket.close()


@dataclass(frozen=True)
class Seal:
    """A member's end of a seal: what the server handed over Curve for one file."""

    port: int
    ticket: bytes = field(repr=False)
    key: bytes = field(repr=False)
    mac_key: bytes = field(repr=False)

    @classmethod
    def from_reply(cls, body: dict[str, Any]) -> Seal:
        """Raises SealError unless the reply's fields are what a seal is made of."""
        port, ticket, key, mac = body.get("port"), body.get("ticket"), body.get("key"), body.get("mac")
        if not (isinstance(port, int) and 0 < port < 65536 and isinstance(ticket, bytes)
                and len(ticket) == TICKET_BYTES and isinstance(key, bytes) and len(key) == KEY_BYTES
                and isinstance(mac, bytes) and len(mac) == KEY_BYTES):
            raise SealError("a malformed seal")
        return cls(port, ticket, key, mac)

    def request(self, offset: int, size: int) -> list[bytes]:
        fields = REQUEST.pack(offset, size)
        return [GET, self.ticket, fields, request_mac(self.mac_key, self.ticket, fields)]

    def opener(self) -> Opener:
        return Opener(self)


class Opener:
    """Opens the replies of one seal, in place: decrypts a chunk straight into the caller's buffer."""

    def __init__(self, seal: Seal) -> None:
        self.seal = seal
        self._aes = AESGCM(seal.key)

    def header(self, frames: list[Any]) -> tuple[int, int, int] | None:
        """(offset, size, counter) of a SEALED reply of this seal; None for anything else (SEAL_GONE: see gone())."""
        if len(frames) != 4 or bytes(frames[0]) != SEALED or bytes(frames[1]) != self.seal.ticket:
            return None
        raw = bytes(frames[2])
        if len(raw) != HEADER.size:
            return None
        offset, size, counter = HEADER.unpack(raw)
        return offset, size, counter

    def gone(self, frames: list[Any]) -> bool:
        return len(frames) == 2 and bytes(frames[0]) == SEAL_GONE and bytes(frames[1]) == self.seal.ticket

    def open_into(self, frames: list[Any], out: memoryview) -> None:
        """Decrypt a SEALED reply's chunk into `out` (exactly its size); SealError if it does not authenticate."""
        header = bytes(frames[2])
        counter = HEADER.unpack(header)[2]
        sealed = memoryview(frames[3])
        if len(sealed) != len(out) + TAG_BYTES:
            raise SealError("a sealed chunk of the wrong length")
        try:
            self._aes.decrypt_into(_nonce(counter), sealed, self.seal.ticket + header, out)
        except InvalidTag as err:
            raise SealError("a sealed chunk that does not authenticate (altered on the way?)") from err
