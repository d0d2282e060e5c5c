"""Same-host delivery without ZeroMQ: one Unix SEQPACKET connection per local reader of a port.

A ZeroMQ hop between two processes of one machine wakes four threads per message (the sender's
I/O thread, the receiver's I/O thread, then the receiving node's own thread). On a 2-core laptop
those wake-ups, not the bytes, are what a 30 fps frame costs once its payload is in shared
memory. Here the publisher's own thread writes each message straight into one socket per reader
and the reader's thread is the only one woken: half the latency and CPU of the ZeroMQ hop.

The listening socket lives in Linux's abstract namespace under the publisher's shared-memory
prefix (session, node, pid): nothing to unlink, it vanishes with the process, even on `kill -9`.
Both ends check the other's credentials (SO_PEERCRED): a reader is admitted only if it runs as
the publisher's user, and a reader talks only to the process whose pid the name carries.

Each connection carries one topic. Messages are `[2-byte header length, header, payload]`, one
per SEQPACKET record. A reader that does not keep up gets a user-space backlog of up to `hwm`
messages (as ZeroMQ's high-water mark), after which new messages are dropped for that reader and
counted; the reader sees the gap in sequence numbers.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import select
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Collection
from typing import Any

from cpcli.errors import TransportError

HELLO = b"CPBELL1 "  # a reader's first record: this, then the topic it reads
MAX_HELLO_BYTES = 1024
INLINE_MAX_BYTES = 64 * 1024  # a payload larger than this goes through the shared-memory pool instead
MAX_RECORD_BYTES = INLINE_MAX_BYTES + 8192  # header (<= 4096) + length prefix, with room to spare
MAX_NAME_BYTES = 100  # an abstract Unix socket name: sun_path holds 107 bytes after its leading NUL
_LENGTH = struct.Struct("<H")
_UCRED = struct.Struct("3i")  # pid, uid, gid
_SEND_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)
PENDING_HELLO_S = 5.0  # a connection that has not named its topic by then is closed


def available() -> bool:
    """Abstract Unix sockets and SO_PEERCRED are Linux's."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_PEERCRED")


def _address(name: str) -> bytes:
    """The abstract socket address of `name`: a NUL, then the name, hashed when too long to fit."""
    raw = name.encode()
    if len(raw) > MAX_NAME_BYTES:  # node ids have no length limit; sun_path has
        raw = b"cpcli_" + hashlib.blake2b(raw, digest_size=16).hexdigest().encode()
    return b"\0" + raw


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


def frame(header: bytes) -> bytes:
    """The prefix of a record: the header's length, then the header."""
    return _LENGTH.pack(len(header)) + header


def split(record: bytes) -> tuple[memoryview, memoryview]:
    """A received record's header and payload (no copy)."""
    view = memoryview(record)
    if len(view) < _LENGTH.size:
        raise TransportError(f"local record of {len(view)} bytes is too short")
    (length,) = _LENGTH.unpack_from(view)
    end = _LENGTH.size + length
    if end > len(view):
        raise TransportError(f"local record says its header has {length} bytes, but it has {len(view)} in all")
    return view[_LENGTH.size:end], view[end:]


def _owned(parts: tuple[Any, ...]) -> tuple[bytes, ...]:
    """A record kept for later must not change with the node's own buffers: copy what is not bytes."""
    return tuple(p if isinstance(p, bytes) else bytes(p) for p in parts)


class _Reader:
    """The publisher's end of one reader's connection."""

    __slots__ = ("sock", "fd", "topic", "backlog")

    def __init__(self, sock: socket.socket, topic: bytes) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.topic = topic
        self.backlog: deque[tuple[bytes, ...]] = deque()


class BellServer:
    """A publisher's listening socket and its readers, all driven from the publisher's thread.

    `fileno()` is an epoll descriptor that turns readable whenever something here needs a look
    (a reader connects, names its topic, leaves, or has room again for its backlog): register it in
    the node's poller and call `handle()` when it is readable.
    """

    def __init__(self, name: str, topics: Collection[bytes], logger: logging.Logger, hwm: int) -> None:
        self.name = name
        self._topics = frozenset(topics)
        self._log = logger
        self._hwm = max(1, hwm)
        self._uid = os.getuid()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK
                                       | socket.SOCK_CLOEXEC)
        try:
            self._listener.bind(_address(name))
            self._listener.listen(128)
        except OSError as err:
            self._listener.close()
            raise TransportError(f"cannot open the same-host socket {name} ({err.strerror})") from err
        self._epoll = select.epoll()
        self._epoll.register(self._listener.fileno(), select.EPOLLIN)
        self._pending: dict[int, tuple[socket.socket, float]] = {}  # fd -> (socket, hello deadline)
        self._readers: dict[int, _Reader] = {}
        self._by_topic: dict[bytes, list[_Reader]] = {t: [] for t in self._topics}
        self.refused = 0  # connections from another user or with a bad hello
        self.dropped = 0  # messages dropped because a reader's backlog was full (all readers)

    def fileno(self) -> int:
        return self._epoll.fileno()

    def readers(self, topic: bytes) -> int:
        return len(self._by_topic.get(topic, ()))

    def handle(self) -> None:
        """Accept readers, read their hellos, flush backlogs that have room, forget readers that left."""
        for fd, events in self._epoll.poll(0):
            if fd == self._listener.fileno():
                self._accept()
            elif fd in self._pending:
                self._hello(fd)
            elif (reader := self._readers.get(fd)) is not None:
                closing = select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP | select.EPOLLIN
                if events & closing and self._gone(reader):
                    continue
                if events & select.EPOLLOUT:
                    self._flush(reader)
        if self._pending:
            now = time.monotonic()
            for fd, (sock, deadline) in list(self._pending.items()):
                if now > deadline:
                    self._refuse(fd, sock, "named no topic in time")

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE and the like: the reader sees its connection fail
                self._log.warning("same-host socket %s: cannot accept a reader (%s)", self.name, err.strerror)
                return
            sock.setblocking(False)
            pid, uid, _gid = peer_credentials(sock)
            if uid != self._uid and uid != 0:
                self.refused += 1
                if self.refused == 1:
                    self._log.warning("same-host socket %s: refused a reader of user %d (pid %d): not this "
                                      "node's user", self.name, uid, pid)
                sock.close()
                continue
            self._pending[sock.fileno()] = (sock, time.monotonic() + PENDING_HELLO_S)
            self._epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
            self._hello(sock.fileno())

    def _hello(self, fd: int) -> None:
        sock, _deadline = self._pending[fd]
        try:
            record = sock.recv(MAX_HELLO_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            record = b""
        topic = record[len(HELLO):] if record.startswith(HELLO) else None
        if topic is None or topic not in self._topics:
            self._refuse(fd, sock, "left before naming a topic" if not record else "named no topic of ours")
            return
        del self._pending[fd]
        reader = _Reader(sock, topic)
        self._readers[fd] = reader
        self._by_topic[topic].append(reader)

    def _refuse(self, fd: int, sock: socket.socket, why: str) -> None:
        self._pending.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        sock.close()
        if why != "left before naming a topic":
            self.refused += 1
            if self.refused == 1:
                self._log.warning("same-host socket %s: closed a connection that %s", self.name, why)

    def _gone(self, reader: _Reader) -> bool:
        """A reader's socket is readable only when it closed (readers never send after the hello)."""
        try:
            data = reader.sock.recv(MAX_HELLO_BYTES, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if data:
            return False  # ignore chatter; a reader has nothing more to say
        self._drop_reader(reader)
        return True

    def _drop_reader(self, reader: _Reader) -> None:
        self._readers.pop(reader.fd, None)
        with contextlib.suppress(ValueError):
            self._by_topic[reader.topic].remove(reader)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(reader.fd)
        reader.sock.close()

    def send(self, topic: bytes, parts: tuple[Any, ...], force: bool = False) -> None:
        """One record to every reader of `topic`; `force` queues it even past the high-water mark
        (the end of a stream, which must not be the message that is dropped)."""
        for reader in tuple(self._by_topic.get(topic, ())):
            if reader.backlog:
                self._flush(reader)
            if reader.backlog:
                if len(reader.backlog) >= self._hwm and not force:
                    self.dropped += 1
                else:
                    reader.backlog.append(_owned(parts))
                continue
            if self._try_send(reader, parts) is False:
                reader.backlog.append(_owned(parts))
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.modify(reader.fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLOUT)

    def _try_send(self, reader: _Reader, parts: tuple[Any, ...]) -> bool | None:
        """True: sent; False: its socket is full; None: the reader has gone."""
        try:
            reader.sock.sendmsg(parts, (), _SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as err:
            if err.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                self._drop_reader(reader)  # it went away: like a ZeroMQ subscriber, it just stops getting data
                return None
            raise TransportError(f"same-host socket {self.name}: cannot send a {sum(map(len, parts))}-byte "
                                 f"record ({err.strerror})") from err
        return True

    def _flush(self, reader: _Reader) -> None:
        while reader.backlog:
            sent = self._try_send(reader, reader.backlog[0])
            if sent is None:
                return
            if not sent:
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.modify(reader.fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLOUT)
                return
            reader.backlog.popleft()
        with contextlib.suppress(OSError, ValueError):
            self._epoll.modify(reader.fd, select.EPOLLIN | select.EPOLLRDHUP)

    def backlog(self) -> int:
        return sum(len(r.backlog) for r in self._readers.values())

    def close(self, linger_s: float = 0.0) -> None:
        """Close everything; what readers have not taken yet gets up to `linger_s` to go first."""
        deadline = time.monotonic() + linger_s
        while self.backlog() and time.monotonic() < deadline:
            for reader in list(self._readers.values()):
                self._flush(reader)
            if self.backlog():
                self._epoll.poll(min(0.01, max(0.0, deadline - time.monotonic())))
                self.handle()
        for reader in list(self._readers.values()):
            self._drop_reader(reader)
        for sock, _deadline in self._pending.values():
            sock.close()
        self._pending.clear()
        self._listener.close()
        self._epoll.close()


class BellClient:
    """A reader's end: connects to a publisher of this machine and reads the records of one topic."""

    def __init__(self, name: str, topic: bytes, publisher_pid: int | None) -> None:
        self.name = name
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._sock.settimeout(2.0)
            self._sock.connect(_address(name))
            pid, uid, _gid = peer_credentials(self._sock)
            if publisher_pid is not None and pid != publisher_pid:
                raise TransportError(f"same-host socket {name} is held by pid {pid}, not by the node's "
                                     f"process {publisher_pid}")
            if uid != os.getuid() and uid != 0:
                raise TransportError(f"same-host socket {name} belongs to user {uid}, not to this node's user")
            self._sock.sendall(HELLO + topic)
        except OSError as err:
            self._sock.close()
            raise TransportError(f"cannot reach the upstream node's same-host socket {name} "
                                 f"({err.strerror or err})") from err
        except TransportError:
            self._sock.close()
            raise
        self._sock.setblocking(False)
        self.closed = False  # the publisher closed its end (it finished or died)

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv(self) -> bytes | None:
        """The next record, or None when none is waiting (or the publisher has gone)."""
        if self.closed:
            return None
        try:
            record = self._sock.recv(MAX_RECORD_BYTES)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            record = b""
        if not record:
            self.closed = True
            return None
        return record

    def pending(self) -> bool:
        """Whether a record waits to be read."""
        if self.closed:
            return False
        try:
            return bool(self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return False

    def close(self) -> None:
        self._sock.close()
