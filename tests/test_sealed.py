"""Sealed streams: a large file's chunks beside Curve, AES-GCM under a key of that file, handed over Curve.

Real archive servers on 127.0.0.1 with a member's keys; strangers speak to the plain data port (TCP).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from cpcli.archive.direct import DirectFile
from cpcli.cluster import keys
from cpcli.cluster import messages as m
from cpcli.cluster.archive_server import CHUNK_BYTES, ArchiveServer
from cpcli.cluster.sealed import CHUNK_BYTES as SEALED_CHUNK_BYTES
from cpcli.cluster.sealed import GONE, HEADER, MAGIC, MAX_SEALS, MAX_STREAMS, OPEN, TAG_BYTES, Opener, Seal, SealError
from cpcli.cluster.transfer import SEAL_MIN_BYTES, ArchiveLink, Refused
from cpcli.transport.curve import Credentials

log = logging.getLogger("test")
WAIT_S = 5.0
QUIET_S = 0.5  # what "no answer" waits for
BIG = 5 * CHUNK_BYTES + 12345  # through a seal: above SEAL_MIN_BYTES, with a short last chunk
MARKER = b"PARTICIPANT-07-AUDIO "  # a recording's bytes a stranger on the wire must never see


@pytest.fixture
def member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Credentials:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    creds = keys.manager_keys("lab", create=True)
    assert creds is not None
    return keys.parse_token(keys.encode_token(creds))


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _session(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A worker's data folder with one big and one small recorded file; their contents by path."""
    data = tmp_path / "data"
    folder = data / "s1" / "w9" / "mic"
    folder.mkdir(parents=True)
    big = (MARKER * (BIG // len(MARKER) + 1))[:BIG - 64] + secrets.token_bytes(64)
    files = {"w9/mic/audio.wav": big, "w9/mic/audio.timestamps.csv": b"index,t_ns\n0,0\n1,100\n"}
    for path, content in files.items():
        (data / "s1" / path).write_bytes(content)
    return data, files


def _fetch(link: ArchiveLink, path: str, size: int, tmp_path: Path) -> tuple[str, bytes]:
    part = tmp_path / "out" / (path.replace("/", "_") + ".part")
    part.parent.mkdir(exist_ok=True)
    got = link.fetch("s1", path, size, part, lambda n: None)
    return got, part.read_bytes()


def _connect(port: int) -> socket.socket:
    """A TCP connection to a data port with no keys at all: anyone on the network."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    sock.settimeout(WAIT_S)
    return sock


def _read(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes, or fewer if the server cut the stream first."""
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def _opened(port: int, seal: Seal) -> tuple[socket.socket, bytes]:
    """A stream of `seal` and the server's first answer (OPEN, GONE, or b"" if it cut the stream)."""
    sock = _connect(port)
    sock.sendall(seal.hello())
    return sock, _read(sock, 1)


def _chunk(sock: socket.socket, seal: Seal, offset: int, size: int) -> tuple[bytes, bytes]:
    """Ask an open stream for one chunk: its header and its sealed bytes."""
    sock.sendall(seal.request(offset, size))
    header = _read(sock, HEADER.size)
    got = HEADER.unpack(header)[1]
    return header, _read(sock, got + TAG_BYTES)


def _cut(sock: socket.socket) -> bool:
    """Whether the server ended the stream without another byte (within QUIET_S)."""
    sock.settimeout(QUIET_S)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _until(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, f"no {what} within {WAIT_S} s"
        time.sleep(0.01)


def test_a_large_file_comes_through_a_seal_and_a_small_one_over_curve(
        tmp_path: Path, member: Credentials, context: zmq.Context[Any]) -> None:
    data, files = _session(tmp_path)
    with ArchiveServer(data, "127.0.0.1", "w9", log, lambda: member) as server:
        link = ArchiveLink(context, server.address, 3.0, member)
        try:
            for path, content in files.items():
                got, held = _fetch(link, path, len(content), tmp_path)
                assert held == content and got == hashlib.sha256(content).hexdigest()
        finally:
            link.close()
        assert server.sealed.served_bytes == len(files["w9/mic/audio.wav"]) > SEAL_MIN_BYTES
        assert server.served_bytes == len(files["w9/mic/audio.timestamps.csv"])  # the small one, over Curve
        assert link.sealing and server.sealed.dropped == 0


def test_a_partial_file_continues_through_a_seal_from_where_it_stopped(
        tmp_path: Path, member: Credentials, context: zmq.Context[Any]) -> None:
    data, files = _session(tmp_path)
    content = files["w9/mic/audio.wav"]
    part = tmp_path / "audio.wav.part"
    part.write_bytes(content[:CHUNK_BYTES + 777])  # a killed run's prefix, not on a block boundary
    with ArchiveServer(data, "127.0.0.1", "w9", log, lambda: member) as server:
        link = ArchiveLink(context, server.address, 3.0, member)
        try:
            got = link.fetch("s1", "w9/mic/audio.wav", len(content), part, lambda n: None)
        finally:
            link.close()
        assert part.read_bytes() == content and got == hashlib.sha256(content).hexdigest()
        # the prefix was kept; written past the page cache (whole blocks), its last 777 bytes came again
        with DirectFile(tmp_path / "probe", CHUNK_BYTES) as probe:
            kept = CHUNK_BYTES if probe.direct else CHUNK_BYTES + 777
        assert server.sealed.served_bytes == len(content) - kept


class _Relay:
    """A TCP relay to the data port that keeps every byte it passes server -> client (what a sniffer sees)."""

    def __init__(self, port: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._target = port
        self.seen = bytearray()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        server = socket.create_connection(("127.0.0.1", self._target))
        self._socks += [client, server]
        for src, dst, keep in ((client, server, False), (server, client, True)):
            thread = threading.Thread(target=self._pipe, args=(src, dst, keep), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _pipe(self, src: socket.socket, dst: socket.socket, keep: bool) -> None:
        try:
            while chunk := src.recv(1 << 16):
                if keep:
                    self.seen += chunk
                dst.sendall(chunk)
        except OSError:
            pass

    def close(self) -> None:
        self._listener.close()
        for sock in self._socks:
            sock.close()
        for thread in [self._accept, *self._threads]:
            thread.join(2)


def test_sealed_chunks_on_the_wire_are_ciphertext_that_opens_only_unaltered(
        tmp_path: Path, member: Credentials, context: zmq.Context[Any]) -> None:
    data, files = _session(tmp_path)
    content = files["w9/mic/audio.wav"]
    with ArchiveServer(data, "127.0.0.1", "w9", log, lambda: member) as server:
        link = ArchiveLink(context, server.address, 3.0, member)
        relay = _Relay(server.sealed.port)
        try:
            seal = Seal.from_reply(link.request(m.SEAL, {"session": "s1", "path": "w9/mic/audio.wav"}, m.SEAL_REPLY))
            sock, status = _opened(relay.port, seal)
            with sock:
                assert status == OPEN
                header, sealed = _chunk(sock, seal, 0, CHUNK_BYTES)
        finally:
            relay.close()
            link.close()
    assert HEADER.unpack(header) == (0, CHUNK_BYTES, 0)
    opener = Opener(seal)
    out = bytearray(CHUNK_BYTES)
    opener.open_into(header, memoryview(sealed), memoryview(out))
    assert bytes(out) == content[:CHUNK_BYTES]
    assert len(relay.seen) > CHUNK_BYTES and MARKER not in relay.seen  # the chunk crossed, none of it readable
    altered = bytes([sealed[0] ^ 1]) + sealed[1:]
    with pytest.raises(SealError, match="does not authenticate"):
        opener.open_into(header, memoryview(altered), memoryview(out))
    moved = (CHUNK_BYTES).to_bytes(8, "big") + header[8:]  # the same chunk passed off as the next one
    with pytest.raises(SealError):
        opener.open_into(moved, memoryview(sealed), memoryview(out))
    other = Seal(seal.port, seal.ticket, secrets.token_bytes(32), seal.mac_key)
    with pytest.raises(SealError):
        Opener(other).open_into(header, memoryview(sealed), memoryview(out))


def test_a_stranger_on_the_data_port_gets_nothing_and_the_server_goes_on(
        tmp_path: Path, member: Credentials, context: zmq.Context[Any]) -> None:
    data, files = _session(tmp_path)
    with ArchiveServer(data, "127.0.0.1", "w9", log, lambda: member) as server:
        port = server.sealed.port
        link = ArchiveLink(context, server.address, 3.0, member)
        try:
            seal = Seal.from_reply(link.request(m.SEAL, {"session": "s1", "path": "w9/mic/audio.wav"}, m.SEAL_REPLY))
            unknown = Seal(port, secrets.token_bytes(16), seal.key, seal.mac_key)
            sock, status = _opened(port, unknown)
            sock.close()
            assert status == GONE  # no such seal: nothing read
            forged = Seal(port, seal.ticket, seal.key, secrets.token_bytes(32))  # a sniffed ticket, not its MAC key
            sock, status = _opened(port, forged)
            sock.close()
            assert status == b""  # cut unanswered
            for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(16), MAGIC + bytes(8), bytes(64)):
                with _connect(port) as sock:
                    sock.sendall(garbage)
                    sock.shutdown(socket.SHUT_WR)
                    assert _cut(sock), garbage
            with _opened(port, seal)[0] as sock:  # a member's stream, then a request with a bad MAC
                good = seal.request(0, 100)
                sock.sendall(good[:-1] + bytes([good[-1] ^ 1]))
                assert _cut(sock)
            with _opened(port, seal)[0] as sock:  # and one asking for more than a chunk
                sock.sendall(seal.request(0, SEALED_CHUNK_BYTES + 1))
                assert _cut(sock)
            _until(lambda: server.sealed.dropped == 6 and server.sealed.open_streams == 0, "6 streams cut")
            assert server.sealed.served_bytes == 0
            content = files["w9/mic/audio.wav"]
            assert _fetch(link, "w9/mic/audio.wav", len(content), tmp_path)[1] == content  # members still served
        finally:
            link.close()


def test_at_most_max_streams_run_at_once(tmp_path: Path, member: Credentials, context: zmq.Context[Any]) -> None:
    data, _files = _session(tmp_path)
    with ArchiveServer(data, "127.0.0.1", "w9", log, lambda: member) as server:
        link = ArchiveLink(context, server.address, 3.0, member)
        streams: list[socket.socket] = []
        try:
            seal = Seal.from_reply(link.request(m.SEAL, {"session": "s1", "path": "w9/mic/audio.wav"}, m.SEAL_REPLY))
            for _ in range(MAX_STREAMS):
                sock, status = _opened(server.sealed.port, seal)
                streams.append(sock)
                assert status == OPEN
            one_more = _connect(server.sealed.port)
            streams.append(one_more)
            assert _cut(one_more)  # cut before a word: the server's threads are bounded
            streams.pop().close()
            streams.pop(0).close()  # one ends: room for the next
            _until(lambda: server.sealed.open_streams == MAX_STREAMS - 1, "a stream gone")
            sock, status = _opened(server.sealed.port, seal)
            streams.append(sock)
            assert status == OPEN
        finally:
            for sock in streams:
                sock.close()
            link.close()


def test_a_seal_idle_too_long_ends(tmp_path: Path, member: Credentials, context: zmq.Context[Any]) -> None:
    data, _files = _session(tmp_path)
    with ArchiveServer(data, "127.0.0.1", "w9", log, lambda: member, seal_idle_s=0.3) as server:
        link = ArchiveLink(context, server.address, 3.0, member)
        try:
            seal = Seal.from_reply(link.request(m.SEAL, {"session": "s1", "path": "w9/mic/audio.wav"}, m.SEAL_REPLY))
            sock, status = _opened(server.sealed.port, seal)
            with sock:
                assert status == OPEN
                header, _sealed = _chunk(sock, seal, 0, 100)
                assert HEADER.unpack(header)[1] == 100
                _until(lambda: server.sealed.open_seals == 0, "the idle seal closed")
                assert _cut(sock)  # its stream with it
            sock, status = _opened(server.sealed.port, seal)
            sock.close()
            assert status == GONE
        finally:
            link.close()


def test_seals_end_past_the_limit_and_when_the_keys_change(tmp_path: Path, member: Credentials,
                                                           context: zmq.Context[Any]) -> None:
    data, _files = _session(tmp_path)
    holder = [member]
    body = {"session": "s1", "path": "w9/mic/audio.wav"}
    with ArchiveServer(data, "127.0.0.1", "w9", log, lambda: holder[0]) as server:
        link = ArchiveLink(context, server.address, 3.0, member)
        try:
            seals = [Seal.from_reply(link.request(m.SEAL, body, m.SEAL_REPLY)) for _ in range(MAX_SEALS + 1)]
            assert server.sealed.open_seals == MAX_SEALS
            sock, status = _opened(server.sealed.port, seals[0])  # the oldest made room for the newest
            sock.close()
            assert status == GONE
            sock, status = _opened(server.sealed.port, seals[-1])
            with sock:
                assert status == OPEN
                holder[0] = keys.parse_token(keys.encode_token(Credentials(
                    "lab", member.manager_public, secrets.token_bytes(keys.SECRET_BYTES))))
                _until(lambda: server.credentials is holder[0], "the server listening with the new keys")
                assert _cut(sock)  # got under the old keys: its open stream ends too
            sock, status = _opened(server.sealed.port, seals[-1])
            sock.close()
            assert status == GONE and server.sealed.open_seals == 0
        finally:
            link.close()


def test_a_fetch_whose_seals_keep_ending_finishes_over_curve(tmp_path: Path, member: Credentials,
                                                             context: zmq.Context[Any]) -> None:
    data, files = _session(tmp_path)
    content = files["w9/mic/audio.wav"]
    with ArchiveServer(data, "127.0.0.1", "w9", log, lambda: member, seal_idle_s=0.0) as server:
        link = ArchiveLink(context, server.address, 3.0, member)
        try:
            got, held = _fetch(link, "w9/mic/audio.wav", len(content), tmp_path)
        finally:
            link.close()
        assert held == content and got == hashlib.sha256(content).hexdigest()
        # each seal ended at the server's next turn: what it had not sent by then came over Curve
        assert server.served_bytes > 0 and server.served_bytes + server.sealed.served_bytes >= len(content)


def test_a_seal_for_a_path_outside_the_part_is_refused(tmp_path: Path, member: Credentials,
                                                       context: zmq.Context[Any]) -> None:
    data, _files = _session(tmp_path)
    (tmp_path / "secret.bin").write_bytes(b"x" * SEAL_MIN_BYTES)
    (data / "s1" / "w9" / "mic" / "link.bin").symlink_to(tmp_path / "secret.bin")
    with ArchiveServer(data, "127.0.0.1", "w9", log, lambda: member) as server:
        link = ArchiveLink(context, server.address, 3.0, member)
        try:
            for bad in ("../../secret.bin", "w9/mic/link.bin", "/etc/passwd", "other/x.bin"):
                with pytest.raises(Refused):
                    link.request(m.SEAL, {"session": "s1", "path": bad}, m.SEAL_REPLY)
        finally:
            link.close()
        assert server.sealed.open_seals == 0
