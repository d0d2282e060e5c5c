"""`cp collect`'s link to one archive server: its requests, and one file pulled into a `.part` and hashed.

One `ArchiveLink` (one DEALER) belongs to one thread. A file is streamed into `<file>.part`, hashed
as it arrives, and continues from the part's size on the next run (the part re-hashed first); at
most CREDIT chunks are requested ahead, so memory stays at CREDIT chunks whatever the file size.
A large file's chunks come through a seal (`cluster/sealed.py`: AES-GCM beside the Curve link,
decrypted straight into the file's write buffer) and are written past the page cache
(`archive/direct.py`); a server whose data port stays silent sends the rest over Curve.
The link holds the member key; a server whose gatekeeper refuses it raises NotMemberError at once.
What a whole part of a session makes of these files is `cluster/parts.py`'s.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

from cpcli.archive.direct import DirectFile
from cpcli.cluster import messages as m
from cpcli.cluster.archive_server import CHUNK_BYTES, listing_digest
from cpcli.cluster.sealed import CHUNK_BYTES as SEALED_CHUNK_BYTES
from cpcli.cluster.sealed import GONE, HEADER, OPEN, TAG_BYTES, Opener, Seal, SealError, receive_exactly
from cpcli.errors import AccessError, TransportError
from cpcli.transport.curve import Credentials, HandshakeWatch, refusal_message
from cpcli.transport.protocol import PROTOCOL_VERSION, pack_object, unpack_object

CREDIT = 8  # chunks in flight per server: enough to fill a LAN link's round trip, 8 MiB of memory at most
MAX_REPLY_BYTES = 64 << 20  # a PART listing of a long session stays far below this
LINGER_MS = 0  # a link given up on drops what it still queued
WATCH_MS = 100  # while waiting for an answer, whether the server refused us is checked this often
HASH_BYTES_PER_S = 50e6  # a slow laptop disk: before deleting, a server hashes the files no record lists again

SEAL_MIN_BYTES = 4 << 20  # smaller files go over Curve: a seal costs a round trip and an open there
SEALED_CREDIT = 4  # sealed chunks in flight per server: 16 MiB, as many bytes ahead as CREDIT's twice over
RESEALS = 3  # a seal that ends mid-file (idle too long, keys rotated) is asked for again this often


class Unreachable(Exception):
    """The server did not answer in time (machine off, link down): what is left stays missing."""


class Refused(Exception):
    """The server answered with a refusal (path outside the session, file gone)."""


class NotMemberError(AccessError):
    """The server's gatekeeper refused this machine's keys: nothing it holds can be fetched with them."""


class ArchiveLink:
    """A DEALER to one archive server; `reset()` after an aborted transfer drops late replies with it."""

    def __init__(self, context: zmq.Context[Any], address: str, timeout_s: float, credentials: Credentials) -> None:
        self.context, self.address, self.timeout_s = context, address, timeout_s
        self.credentials = credentials
        self.received_bytes = 0
        self.sealing = True  # False once this server's data port stayed silent: Curve carries the rest
        self._sealed: bytearray | None = None  # a sealed chunk as it arrives (made on the first large file)
        self._socket, self._watch = self._open()

    def _open(self) -> tuple[zmq.Socket[Any], HandshakeWatch]:
        sock: zmq.Socket[Any] = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.setsockopt(zmq.SNDHWM, CREDIT * 4)
        sock.setsockopt(zmq.RCVHWM, CREDIT * 4)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
        sock.setsockopt(zmq.SNDTIMEO, int(self.timeout_s * 1000))
        self.credentials.connect_to(sock)  # archive servers hold the member key, not the manager's
        watch = HandshakeWatch(sock)
        try:
            sock.connect(self.address)
        except zmq.ZMQError as err:
            watch.close()
            sock.close()
            raise Unreachable(f"cannot connect to {self.address} ({zmq.strerror(err.errno or 0)})") from err
        return sock, watch

    def reset(self) -> None:
        self.close()
        self._socket, self._watch = self._open()

    def close(self) -> None:
        self._watch.close()
        self._socket.close()

    def _check_refused(self) -> None:
        kind = self._watch.check()
        if kind is not None:
            raise NotMemberError(*refusal_message(kind, f"archive server at {self.address}", self.credentials.cluster))

    def send(self, command: bytes, body: dict[str, Any]) -> None:
        try:
            self._socket.send_multipart([command, pack_object(body)])
        except zmq.Again as err:
            raise Unreachable(f"{self.address} did not take a request within {self.timeout_s:g} s") from err

    def receive(self, timeout_s: float | None = None) -> tuple[bytes, dict[str, Any], memoryview]:
        """The next valid reply (command, body, raw data); garbage is skipped, silence raises Unreachable.

        Raises NotMemberError as soon as the server refuses this machine's keys.
        """
        timeout_s = timeout_s or self.timeout_s
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self._socket.poll(min(int(left * 1000) + 1, WATCH_MS)):
                self._check_refused()
                continue
            frames = self._socket.recv_multipart(copy=False)  # a chunk's bytes go to disk and hash uncopied
            if len(frames) not in (2, 3):
                continue
            command = frames[0].bytes
            try:
                body = unpack_object(frames[1].buffer)
                if not isinstance(body, dict):
                    continue
                m.check(command, body)
            except (msgpack.UnpackException, ValueError, TypeError, TransportError):
                continue
            if command == m.REFUSED:
                raise Refused(str(body["message"]))
            data = frames[2].buffer if len(frames) == 3 else memoryview(b"")
            self.received_bytes += len(data)
            return command, body, data
        raise Unreachable(f"{self.address} did not answer within {timeout_s:g} s")

    def request(self, command: bytes, body: dict[str, Any], reply: bytes,
                timeout_s: float | None = None) -> dict[str, Any]:
        self.send(command, dict(body, v=PROTOCOL_VERSION))
        while True:
            got, answer, _ = self.receive(timeout_s)
            if got == reply:
                return answer

    def delete(self, session: str, verified: dict[str, str], probe: str, rehash_bytes: int) -> dict[str, Any]:
        """Ask the worker to delete its part of `session`, which `verified` lists (path: sha256) as verified here.

        The server checks the listing against its own (it hashes `rehash_bytes` again, its unrecorded
        files, so the wait grows with them) and answers with what it deleted; raises Refused if it did not.
        """
        body = {"session": session, "count": len(verified), "listing": listing_digest(verified), "probe": probe}
        return self.request(m.DELETE_PART, body, m.DELETED, self.timeout_s + rehash_bytes / HASH_BYTES_PER_S)

    def fetch(self, session: str, path: str, size: int, part: Path, on_bytes: Callable[[int], None]) -> str:
        """Pull `path` into `part` (continuing a partial one) and return the whole file's sha256."""
        if part.exists() and part.stat().st_size > size:  # longer than the file it should become: no prefix of it
            part.unlink()
        try:
            # past the page cache: the bytes are not read here again
            with DirectFile(part, max(CHUNK_BYTES, SEALED_CHUNK_BYTES)) as out:
                digest = _hash_prefix(part) if out.offset else hashlib.sha256()
                if self.sealing and size - out.offset >= SEAL_MIN_BYTES:
                    self._pull_sealed(session, path, size, out, digest, on_bytes)
                self._pull(session, path, size, out, digest, on_bytes)
        except Refused:
            self.reset()  # the chunks still in flight must not reach the next file
            raise
        return digest.hexdigest()

    def _pull(self, session: str, path: str, size: int, out: DirectFile, digest: Any,
              on_bytes: Callable[[int], None]) -> None:
        """What is left of `path`, chunk by chunk over the Curve link."""
        asked = out.offset
        pending: deque[tuple[int, int]] = deque()
        while out.offset < size:
            while len(pending) < CREDIT and asked < size:
                n = min(CHUNK_BYTES, size - asked)
                self.send(m.FETCH, {"session": session, "path": path, "offset": asked, "size": n})
                pending.append((asked, n))
                asked += n
            command, header, data = self.receive()
            if command != m.CHUNK:
                continue
            want, n = pending.popleft()
            if header["path"] != path or header["offset"] != want or len(data) != n:
                raise Refused(f"{path} changed on the worker (a short or misplaced chunk at {want})")
            out.write(data)
            digest.update(data)
            on_bytes(n)

    def _pull_sealed(self, session: str, path: str, size: int, out: DirectFile, digest: Any,
                     on_bytes: Callable[[int], None]) -> None:
        """What is left of `path` through seals; returns early, the rest for Curve, if the data port is silent."""
        for _attempt in range(RESEALS):
            reply = self.request(m.SEAL, {"session": session, "path": path}, m.SEAL_REPLY)
            try:
                seal = Seal.from_reply(reply)
            except SealError as err:
                raise Refused(f"{path}: {err}") from err
            try:
                if self._pull_through(seal, path, size, out, digest, on_bytes):
                    return
            except Unreachable:  # its data port is not reachable from here (a firewall?): Curve carries on
                self.sealing = False
                return

    def _pull_through(self, seal: Seal, path: str, size: int, out: DirectFile, digest: Any,
                      on_bytes: Callable[[int], None]) -> bool:
        """Pull chunks through one seal's stream until the file is whole (True) or the seal ended (False).

        Raises Unreachable when the data port cannot be reached or falls silent for timeout_s.
        """
        host = self.address.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
        try:
            sock = socket.create_connection((host, seal.port), timeout=self.timeout_s)
        except OSError as err:
            raise Unreachable(f"cannot reach the data port {seal.port} of {self.address} ({err})") from err
        if self._sealed is None:
            self._sealed = bytearray(SEALED_CHUNK_BYTES + TAG_BYTES)
        opener = Opener(seal)
        header = bytearray(HEADER.size)
        asked = out.offset
        pending: deque[tuple[int, int]] = deque()
        with sock:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # requests leave at once
                sock.sendall(seal.hello())
                status = bytearray(1)
                if not receive_exactly(sock, memoryview(status)) or bytes(status) == GONE:
                    return False
                if bytes(status) != OPEN:
                    raise Unreachable(f"the data port of {self.address} answered {bytes(status)!r}")
            except OSError as err:
                raise Unreachable(f"the data port of {self.address}: {err}") from err
            while out.offset < size:
                try:
                    while len(pending) < SEALED_CREDIT and asked < size:
                        n = min(SEALED_CHUNK_BYTES, size - asked)
                        sock.sendall(seal.request(asked, n))
                        pending.append((asked, n))
                        asked += n
                    if not receive_exactly(sock, memoryview(header)):
                        return False  # the stream was cut: the seal ended (idle, keys changed, file deleted)
                    want, n = pending.popleft()
                    offset, got, _counter = HEADER.unpack(header)
                    if offset != want or got != n:
                        raise Refused(f"{path} changed on the worker (a short or misplaced chunk at {want})")
                    sealed = memoryview(self._sealed)[:n + TAG_BYTES]
                    if not receive_exactly(sock, sealed):
                        return False
                except OSError as err:  # a timeout too: the data port fell silent
                    raise Unreachable(f"the data port of {self.address}: {err}") from err
                with out.buffer(n) as view:  # decrypted where it is written from; a full disk is its own OSError
                    try:
                        opener.open_into(bytes(header), sealed, view)
                    except SealError as err:
                        raise Refused(f"{path}: {err} at {want}") from err
                    digest.update(view)
                out.write_buffer(n)
                self.received_bytes += n
                on_bytes(n)
        return True


def _hash_prefix(part: Path) -> Any:
    """The running sha256 of a partial file, to continue hashing as its remaining chunks arrive."""
    digest = hashlib.sha256()
    with part.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest
