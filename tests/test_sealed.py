"""Sealed streams: a large file's chunks beside Curve, AES-GCM under a key of that file, handed over Curve.

Real archive servers on 127.0.0.1 with a member's keys; strangers speak to the plain data port.
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
from cpcli.cluster.sealed import GET, MAX_SEALS, SEAL_GONE, SEALED, Opener, Seal, SealError
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


def _plain(context: zmq.Context[Any], port: int) -> zmq.Socket[Any]:
    """A DEALER on the data port with no keys at all: anyone on the network."""
    sock: zmq.Socket[Any] = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def _answer(sock: zmq.Socket[Any], timeout_s: float = WAIT_S) -> list[bytes] | None:
    return sock.recv_multipart() if sock.poll(int(timeout_s * 1000)) else None


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
        sock = _plain(context, relay.port)
        try:
            seal = Seal.from_reply(link.request(m.SEAL, {"session": "s1", "path": "w9/mic/audio.wav"}, m.SEAL_REPLY))
            sock.send_multipart(seal.request(0, CHUNK_BYTES))
            frames = _answer(sock)
            assert frames is not None and frames[0] == SEALED
        finally:
            sock.close()
            relay.close()
            link.close()
    opener = Opener(seal)
    assert opener.header(frames) == (0, CHUNK_BYTES, 0)
    out = bytearray(CHUNK_BYTES)
    opener.open_into(frames, memoryview(out))
    assert bytes(out) == content[:CHUNK_BYTES]
    assert len(relay.seen) > CHUNK_BYTES and MARKER not in relay.seen  # the chunk crossed, none of it readable
    altered = list(frames)
    altered[3] = bytes([frames[3][0] ^ 1]) + frames[3][1:]
    with pytest.raises(SealError, match="does not authenticate"):
        opener.open_into(altered, memoryview(out))
    moved = list(frames)
    moved[2] = (CHUNK_BYTES).to_bytes(8, "big") + frames[2][8:]  # the same chunk passed off as the next one
    with pytest.raises(SealError):
        opener.open_into(moved, memoryview(out))
    other = Seal(seal.port, seal.ticket, secrets.token_bytes(32), seal.mac_key)
    with pytest.raises(SealError):
        Opener(other).open_into(frames, memoryview(out))


def test_a_stranger_on_the_data_port_gets_nothing_and_the_server_goes_on(
        tmp_path: Path, member: Credentials, context: zmq.Context[Any]) -> None:
    data, files = _session(tmp_path)
    with ArchiveServer(data, "127.0.0.1", "w9", log, lambda: member) as server:
        link = ArchiveLink(context, server.address, 3.0, member)
        stranger = _plain(context, server.sealed.port)
        try:
            seal = Seal.from_reply(link.request(m.SEAL, {"session": "s1", "path": "w9/mic/audio.wav"}, m.SEAL_REPLY))
            unknown = secrets.token_bytes(16)
            stranger.send_multipart(Seal(seal.port, unknown, seal.key, seal.mac_key).request(0, 100))
            assert _answer(stranger) == [SEAL_GONE, unknown]  # no such seal: nothing read
            forged = seal.request(0, 100)
            forged[3] = secrets.token_bytes(16)  # a sniffed ticket id, without the MAC key
            stranger.send_multipart(forged)
            for garbage in ([b"x"], [GET, seal.ticket, b"short", b"mac"], [GET] * 9, [b"\x00" * 60] * 4):
                stranger.send_multipart(garbage)
            assert _answer(stranger, QUIET_S) is None
            _until(lambda: server.sealed.dropped == 5, "5 requests dropped")
            assert server.sealed.served_bytes == 0
            content = files["w9/mic/audio.wav"]
            assert _fetch(link, "w9/mic/audio.wav", len(content), tmp_path)[1] == content  # members still served
        finally:
            stranger.close()
            link.close()


def test_a_seal_idle_too_long_ends(tmp_path: Path, member: Credentials, context: zmq.Context[Any]) -> None:
    data, _files = _session(tmp_path)
    with ArchiveServer(data, "127.0.0.1", "w9", log, lambda: member, seal_idle_s=0.3) as server:
        link = ArchiveLink(context, server.address, 3.0, member)
        sock = _plain(context, server.sealed.port)
        try:
            seal = Seal.from_reply(link.request(m.SEAL, {"session": "s1", "path": "w9/mic/audio.wav"}, m.SEAL_REPLY))
            sock.send_multipart(seal.request(0, 100))
            frames = _answer(sock)
            assert frames is not None and frames[0] == SEALED
            _until(lambda: server.sealed.open_seals == 0, "the idle seal closed")
            sock.send_multipart(seal.request(0, 100))
            assert _answer(sock) == [SEAL_GONE, seal.ticket]
        finally:
            sock.close()
            link.close()


def test_seals_end_past_the_limit_and_when_the_keys_change(tmp_path: Path, member: Credentials,
                                                           context: zmq.Context[Any]) -> None:
    data, _files = _session(tmp_path)
    holder = [member]
    body = {"session": "s1", "path": "w9/mic/audio.wav"}
    with ArchiveServer(data, "127.0.0.1", "w9", log, lambda: holder[0]) as server:
        link = ArchiveLink(context, server.address, 3.0, member)
        sock = _plain(context, server.sealed.port)
        try:
            seals = [Seal.from_reply(link.request(m.SEAL, body, m.SEAL_REPLY)) for _ in range(MAX_SEALS + 1)]
            assert server.sealed.open_seals == MAX_SEALS
            sock.send_multipart(seals[0].request(0, 100))  # the oldest made room for the newest
            assert _answer(sock) == [SEAL_GONE, seals[0].ticket]
            sock.send_multipart(seals[-1].request(0, 100))
            frames = _answer(sock)
            assert frames is not None and frames[0] == SEALED
            holder[0] = keys.parse_token(keys.encode_token(Credentials(
                "lab", member.manager_public, secrets.token_bytes(keys.SECRET_BYTES))))
            _until(lambda: server.credentials is holder[0], "the server listening with the new keys")
            sock.send_multipart(seals[-1].request(0, 100))  # got under the old keys: nothing more
            assert _answer(sock) == [SEAL_GONE, seals[-1].ticket]
            assert server.sealed.open_seals == 0
        finally:
            sock.close()
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
        assert server.served_bytes == len(content)  # each seal ended before its first chunk: Curve carried it


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
