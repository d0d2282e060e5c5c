"""`cp collect`'s end of one archive server: requests, and files pulled in chunks with a bounded credit.

One `ArchiveLink` (one DEALER) belongs to one thread. A file is streamed into `<file>.part`, hashed
as it arrives, and continues from the part's size on the next run (the part re-hashed first); at
most CREDIT chunks are requested ahead, so memory stays at CREDIT chunks whatever the file size.
The link holds the member key; a server whose gatekeeper refuses it raises NotMemberError at once.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

from cpcli.cluster import messages as m
from cpcli.cluster.archive_server import CHUNK_BYTES, sha256_prefix
from cpcli.errors import AccessError, TransportError
from cpcli.transport.curve import Credentials, HandshakeWatch, refusal_message
from cpcli.transport.protocol import PROTOCOL_VERSION, pack_object, unpack_object

CREDIT = 8  # chunks in flight per server: enough to fill a LAN link's round trip, 8 MiB of memory at most
MAX_REPLY_BYTES = 64 << 20  # a PART listing of a long session stays far below this
LINGER_MS = 0  # a link given up on drops what it still queued
PART_SUFFIX = ".part"
WATCH_MS = 100  # while waiting for an answer, whether the server refused us is checked this often


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

    def receive(self) -> tuple[bytes, dict[str, Any], memoryview]:
        """The next valid reply (command, body, raw data); garbage is skipped, silence raises Unreachable.

        Raises NotMemberError as soon as the server refuses this machine's keys.
        """
        deadline = time.monotonic() + self.timeout_s
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
        raise Unreachable(f"{self.address} did not answer within {self.timeout_s:g} s")

    def request(self, command: bytes, body: dict[str, Any], reply: bytes) -> dict[str, Any]:
        self.send(command, dict(body, v=PROTOCOL_VERSION))
        while True:
            got, answer, _ = self.receive()
            if got == reply:
                return answer

    def fetch(self, session: str, path: str, size: int, part: Path, on_bytes: Callable[[int], None]) -> str:
        """Pull `path` into `part` (continuing a partial one) and return the whole file's sha256."""
        offset, digest = sha256_prefix(part) if part.exists() else (0, hashlib.sha256())
        if offset > size:  # longer than the file it should become: not a prefix of it
            part.unlink()
            offset, digest = 0, hashlib.sha256()
        asked = offset
        pending: deque[tuple[int, int]] = deque()
        try:
            with open(part, "ab") as fh:
                while offset < size:
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
                    fh.write(data)
                    digest.update(data)
                    offset += n
                    on_bytes(n)
                fh.flush()
                os.fsync(fh.fileno())
        except Refused:
            self.reset()  # the chunks still in flight must not reach the next file
            raise
        return digest.hexdigest()
