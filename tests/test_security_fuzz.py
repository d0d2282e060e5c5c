"""Fuzz of every port a cluster serves (issue 8): 10,000 random and mutated frames, as a member and as a stranger.

One real `cp manager` (its local worker m1, their two archive servers) and one `cp run` whose test_video
node publishes on m1. A seeded generator sends the manager's control port, both archive servers and the
node's publisher valid envelopes with hostile fields (huge sizes, wrong types, `../` paths, unknown
commands), raw frames, wrong frame counts and frames just over the 4 MiB limit, holding the member keys;
then strangers (no keys, wrong keys, raw TCP) knock on the same ports. Nothing may crash or hang, the
manager's memory must stay flat, every malformed message must be counted, and the session recorded
meanwhile must be complete. A failure names the seed: CP_FUZZ_SEED=<seed> replays the same frames.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import zmq
from zmq.utils import z85

from cpcli import __version__
from cpcli.cluster import keys
from cpcli.cluster import messages as m
from cpcli.cluster.archive_server import CHUNK_BYTES
from cpcli.cluster.channel import MAX_MESSAGE_BYTES
from cpcli.cluster.client import cluster_status
from cpcli.cluster.sealed import GONE, MAGIC, OPEN, Seal
from cpcli.cluster.timing import ClusterTiming
from cpcli.errors import CpError, TransportError
from cpcli.transport.curve import Credentials
from cpcli.transport.protocol import PROTOCOL_VERSION, unpack_object

pytestmark = pytest.mark.timeout(90)  # about 10 s on 2 cores; the rest is room for a loaded CI machine

FRAMES = 10_000
# Where the frames go. The warm-up sends the manager's process (control port, both archive servers) the
# same mix as later, 4 MiB frames included, so its allocator and ZeroMQ's buffers have reached their
# working size when the memory baseline is taken.
SHARE = {"warmup_manager": 700, "warmup_archive": 300, "manager": 2_300, "archive": 1_700, "sealed": 400,
         "publisher": 600, "stranger": 1_000, "manager_after": 3_000}
assert sum(SHARE.values()) == FRAMES
# Growth of the manager's RSS from the warm-up to the end: 0 to 18 MiB measured (heap arenas of its
# threads filling up to their high-water marks, the fake workers and the 200 recent events it keeps, some
# holding 100 KB fields), the same with four times the frames. A leak grows with the traffic past this.
RSS_GROWTH_BYTES = 30 << 20
PHASE_S = 10.0  # the longest any one sending phase may take (about 1 s here); it ends early rather than overrun
START_S = 20.0  # interpreter start, imports and the first keys of a cluster, on a slow machine
SETTLE_S = 15.0  # after the last frame, until the manager has counted everything it was sent
ANSWER_S = 5.0  # the manager and its archive servers answer a member within this, fuzz or no fuzz
RUN_STOP_S = 30.0  # Ctrl-C to the end of cp run: drain, close files, the manifest
STOP_S = 10.0  # SIGTERM to the end of cp manager; after that its process group is killed
STRANGER_HOLD_S = 0.2  # a stranger's connections stay this long: their handshakes fail (and count) meanwhile
MEMBER_DEALERS = 16  # fuzz connections per server: many peers, each with its own identity
HUGE = 100_000  # bytes of a "huge" field: far above any real one, far below the 4 MiB limit
# A huge subscription (real topics are `<id>/<port>`). Not HUGE: our own XSUB keeps what it subscribed in a
# trie that libzmq frees recursively, a stack frame per byte, and 1 MiB overflows this process's stack.
HUGE_TOPIC = 32_768
OVERSIZE = MAX_MESSAGE_BYTES + 1
TIMING = ClusterTiming(answer_timeout_s=ANSWER_S)

RECIPE = """\
name: fuzzed
nodes:
  cam:
    type: test_video
    worker: m1
    params: {width: 64, height: 48, rate_hz: 50}
  sink:
    type: discard
    worker: m1
    inputs: [cam]
"""

FAKE_WORKERS = ("fz-0", "fz-1", "fz-2", "fz-3")  # what the fuzz registers as (before mutation)
UNKNOWN_COMMANDS = (b"HELLO", b"register", b"REGISTER\x00", b"", b"\x00", b"../STATUS", b"STATUS " * 100,
                    b"X" * HUGE)
INTS = (0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), MAX_MESSAGE_BYTES, CHUNK_BYTES + 1)
FLOATS = (math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324)
PATHS = ("../../etc/passwd", "/etc/passwd", "..", ".", "", "a/../../b", "m1/../../../x", "logs/../manifest.json",
         "m1//x", "C:\\Windows\\win.ini", "x\x00y", "\x00", "~root/.ssh/id_rsa", "m1/cam/../../..", "%s%s%n",
         "\u202e\ufeff", "a" * 300, "m1/" + "a/" * 200, "fuzzed\n", " ")
FIELD_NAMES = sorted({name for schema in (*m.SCHEMAS.values(), *m.OPTIONAL.values()) for name in schema})
# Raw bodies msgpack cannot take in: nesting past its stack, lengths past the data, a never-used byte,
# keys that cannot be keys, timestamps out of range, trailing data, broken UTF-8.
RAW_BODIES = (b"\x91" * 100_000 + b"\xc0", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc1",
              b"\x81\x90\x01", b"\x81\x80\x01", b"\xc7\x03\xff\x00\x00\x00", b"\xc7\x0c\xff" + b"\xff" * 12,
              b"\x80\x80", b"", b"\xa2\xff\xfe", b"\x81\xd4\x01\x02\x01", b"\x81\xa1v\xd6\xff\x00\x00\x00\x01")
ZMTP_NULL = b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\x00") + bytes(32)
ZMTP_CURVE = b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"CURVE".ljust(20, b"\x00") + bytes(32)


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _rejected(frames: list[bytes]) -> bool:
    """Whether the manager must drop this message: the checks of its Router, from their public parts."""
    if len(frames) != 2:
        return True
    try:
        body = unpack_object(frames[1])
    except (msgpack.UnpackException, ValueError, TypeError):
        return True
    if not isinstance(body, dict):
        return True
    try:
        m.check(frames[0], body)
    except TransportError:
        return True
    return False


class Hostile:
    """Hostile values, realistic bodies and their mutations, all drawn from one seeded generator."""

    def __init__(self, rng: random.Random, session: Callable[[], str], paths: Callable[[], list[str]]) -> None:
        self.rng = rng
        self._session = session  # the running session's name, which any member can read in cp status
        self._paths = paths  # files the archive servers really hold
        self._huge_text = "A" * HUGE
        self._huge_bytes = bytes(HUGE)

    def text(self) -> str:
        r = self.rng
        pick = r.randrange(8)
        if pick == 0:
            return self._huge_text + str(r.random())
        if pick == 1:
            return "".join(chr(r.randrange(1, 0x2FFF)) for _ in range(r.randrange(1, 40)))
        if pick == 2:
            return self.session()
        return str(r.choice(PATHS))

    def session(self) -> str:
        return self._session() if self.rng.random() < 0.5 else str(self.rng.choice(PATHS))

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        pick = r.randrange(12 if depth < 2 else 8)
        if pick == 0:
            return r.choice(INTS)
        if pick == 1:
            return r.choice(FLOATS)
        if pick in (2, 3):
            return self.text()
        if pick == 4:
            return r.randbytes(r.randrange(64)) if r.random() < 0.9 else self._huge_bytes
        if pick == 5:
            return r.choice((True, False, None))
        if pick == 6:
            nested: Any = self.text()
            for _ in range(r.randrange(1, 400)):  # msgpack packs at most 511 levels
                nested = [nested]
            return nested
        if pick == 7:
            return {1: 2, b"key": "bytes key", 1.5: None, None: [], "": {}}
        if pick in (8, 9):
            return [self.value(depth + 1) for _ in range(r.randrange(4))]
        return {self.rng.choice(FIELD_NAMES): self.value(depth + 1) for _ in range(r.randrange(4))}

    def mutate(self, body: dict[str, Any]) -> dict[str, Any]:
        """Change one to three fields, at the top or up to two levels down: mostly a hostile value of the
        type the field had (which passes the schema and reaches the handler), else a drop, a wrong type
        or a field added."""
        r = self.rng
        for _ in range(r.choice((1, 1, 1, 2, 2, 3))):
            target: Any = body
            for _ in range(r.randrange(3)):
                children = [v for v in (target.values() if isinstance(target, dict) else target)
                            if isinstance(v, (dict, list))]
                if not children:
                    break
                target = r.choice(children)
            op = r.randrange(5)
            if isinstance(target, dict):
                key = r.choice(list(target)) if target else None
                if op == 0 and key is not None:
                    del target[key]
                elif op == 1 and key is not None:
                    target[key] = self.value()
                elif op >= 3 and key is not None:
                    target[key] = self.alike(target[key])
                else:
                    target[r.choice((*FIELD_NAMES, "v", "../x", ""))] = self.value()
            elif target:
                i = r.randrange(len(target))
                if op == 0:
                    target.pop(i)
                elif op == 1:
                    target[i] = self.value()
                elif op >= 3:
                    target[i] = self.alike(target[i])
                else:
                    target.append(self.value())
            else:
                target.append(self.value())
        return body

    def alike(self, value: Any) -> Any:
        """A hostile value of `value`'s own type: what a schema check lets through."""
        r = self.rng
        if isinstance(value, bool):
            return not value
        if isinstance(value, int):
            return r.choice(INTS)
        if isinstance(value, float):
            return r.choice(FLOATS)
        if isinstance(value, str):
            return self.text()
        if isinstance(value, bytes):
            return self._huge_bytes if r.random() < 0.1 else r.randbytes(r.randrange(64))
        if isinstance(value, list):
            return [self.alike(v) if r.random() < 0.5 else self.value(1) for v in value] + \
                [self.value(1) for _ in range(r.randrange(3))]
        if isinstance(value, dict):
            return {k: self.alike(v) if r.random() < 0.5 else v for k, v in value.items()}
        return self.value()

    # -- realistic bodies --------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """A worker's STATE: what REGISTER carries for the sessions it still runs."""
        worker = self.rng.choice(FAKE_WORKERS)
        return {"session": self.session(), "phase": self.rng.choice(("running", "stopping", "finished")),
                "nodes": {"cam": {"id": "cam", "type": "test_video", "state": "running", "worker": worker,
                                  "stats": {"samples_out": 5}, "files": [], "info": {}}},
                "files": [{"path": f"{worker}/cam/video.mp4", "kind": "video", "bytes": 10, "sha256": "0" * 64}],
                "clock": [[0, 1, 2, 3]]}

    def manager_body(self, command: bytes) -> dict[str, Any]:
        r, v = self.rng, PROTOCOL_VERSION
        session = self.session()
        if command == m.REGISTER:
            return {"v": v, "name": r.choice(FAKE_WORKERS), "instance": r.choice(("i0", "i1")), "host": "127.0.0.1",
                    "version": __version__, "node_types": ["fz_type"],
                    "sessions": [self.report()] if r.random() < 0.5 else [],
                    "resources": {"cpu_percent": 3.0, "cpu_count": 2, "memory_total": 2**34, "disk_free": 2**40},
                    "devices": [{"kind": "camera", "index": 0, "name": "fz cam"}],
                    "archive_port": r.choice((0, 1, 40000, 65535))}
        if command == m.BEAT:
            return {"resources": {"cpu_percent": 5.0, "memory_available": 2**33},
                    "clock": {"offset_ns": 12, "drift_ppb": 3.5, "uncertainty_ns": 40}}
        if command == m.STATE:
            return self.report()
        if command == m.RUN:
            node = {"id": "a", "type": "fz_type", "entry_point": "", "params": {"rate_hz": 5}, "record": True,
                    "sync": "all", "tolerance_ms": 0.0, "inputs": [["video", "b", "video"]], "outputs": ["video"],
                    "worker": r.choice(("nowhere", "m1", *FAKE_WORKERS))}
            source = dict(node, id="b", inputs=[])
            return {"v": v, "recipe": "fz", "recipe_text": "name: fz\n", "nodes": [node, source],
                    "options": {"duration_s": 1.0, "shared_memory": True, "shm_threshold_bytes": 65536,
                                "min_free": {"bytes": 0, "percent": 0}, "encrypt_data": True},
                    "session_name": r.choice((*PATHS, "fz-session")), "on_worker_lost": "continue",
                    "timing": {"ready_timeout_s": 0.5}}
        known: dict[bytes, dict[str, Any]] = {m.PREPARED: {"session": session, "bound": {"cam": {"endpoint": "tcp://127.0.0.1:1",
                                                                    "shm_prefix": None}}},
                 m.NODE_ENDED: {"session": session, "node": "cam", "sent": {"video": 3}},
                 m.FAILED: {"session": session, "message": "fz", "hint": "fz"},
                 m.ATTACH: {"v": v, "session": session, "token": "0" * 32},
                 m.MARK: {"v": v, "label": "fz", "meta": {"trial": 1, "note": "x"}},
                 m.STATUS: {"v": v}}
        if command in known:
            return known[command]
        return self.archive_body(command) if command in (m.SESSIONS, m.PART, m.FETCH) else self.generic(command)

    def archive_body(self, command: bytes) -> dict[str, Any]:
        if command == m.SESSIONS:
            return {"v": PROTOCOL_VERSION}
        if command == m.PART:
            return {"v": PROTOCOL_VERSION, "session": self.session()}
        paths = self._paths()
        path = self.rng.choice(paths) if paths and self.rng.random() < 0.6 else str(self.rng.choice(PATHS))
        return {"session": self.session(), "path": path, "offset": self.rng.choice((0, 1, 100)),
                "size": self.rng.choice((1, 4096, CHUNK_BYTES))}

    def generic(self, command: bytes) -> dict[str, Any]:
        """Any other command, its fields of the types its schema names."""
        plain: dict[Any, Any] = {int: 1, str: self.session(), list: [], dict: {}}
        body = {}
        for name, kind in m.SCHEMAS[command].items():
            body[name] = PROTOCOL_VERSION if name == "v" else plain.get(kind, 0.5)
        return body

    # -- whole messages ------------------------------------------------------------------------

    def envelope(self, commands: list[bytes], body: Callable[[bytes], dict[str, Any]]) -> list[bytes]:
        """One message: mostly mutated valid envelopes; some sent as they are, raw, or with a wrong frame count."""
        r = self.rng
        kind = r.random()
        if kind < 0.08:
            return [r.choice(UNKNOWN_COMMANDS), _pack(self.mutate(body(r.choice(commands))))]
        if kind < 0.16:
            return [r.choice(commands), r.choice(RAW_BODIES)]
        if kind < 0.22:
            return [r.randbytes(r.randrange(1, 64)) for _ in range(r.randrange(1, 4))]
        command = r.choice(commands)
        frames = [command, _pack(body(command) if kind < 0.4 else self.mutate(body(command)))]
        if kind > 0.95:
            return frames[:1] if r.random() < 0.3 else [*frames, *(r.randbytes(8) for _ in range(r.randrange(1, 3)))]
        return frames


@dataclass
class Tally:
    """What was sent where: frames, those the manager must drop, replies read, connections made."""

    frames: dict[str, int] = field(default_factory=dict)
    manager_rejected: int = 0
    replies: int = 0
    connections: int = 0

    def add(self, where: str, count: int = 1) -> None:
        self.frames[where] = self.frames.get(where, 0) + count

    @property
    def total(self) -> int:
        return sum(self.frames.values())


class Fuzzer:
    """Sockets of a member and of strangers in one ZeroMQ context; sends without waiting for replies."""

    def __init__(self, rng: random.Random, member: Credentials, hostile: Hostile) -> None:
        self.rng, self.member, self.hostile = rng, member, hostile
        self.context: zmq.Context[Any] = zmq.Context()
        self.tally = Tally()
        self._open: list[zmq.Socket[Any]] = []

    def close(self) -> None:
        self.context.destroy(linger=0)

    def _socket(self, kind: int, address: str, curve: Callable[[zmq.Socket[Any]], None] | None) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100)  # what we do not read stays bounded on our side
        if curve is not None:
            curve(sock)
        sock.connect(address)
        self.tally.connections += 1
        self._open.append(sock)
        return sock

    def _drain(self, socks: list[zmq.Socket[Any]]) -> None:
        for sock in socks:
            with contextlib.suppress(zmq.ZMQError):
                while True:
                    sock.recv_multipart(zmq.NOBLOCK)
                    self.tally.replies += 1

    def _send(self, sock: zmq.Socket[Any], frames: list[bytes], deadline: float) -> bool:
        """Send without blocking; a full queue is drained from the other end for at most 1 s."""
        until = min(deadline, time.monotonic() + 1.0)
        while True:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
                return True
            except zmq.Again:
                if time.monotonic() > until:
                    return False
                self._drain([sock])
                sock.poll(10, zmq.POLLOUT)

    def close_sockets(self) -> None:
        for sock in self._open:
            sock.close(linger=0)
        self._open.clear()

    # -- members ---------------------------------------------------------------------------------

    def manager(self, address: str, count: int, oversize: int) -> None:
        """`count` frames to the manager's control port as members, `oversize` of them just over 4 MiB."""
        deadline = time.monotonic() + PHASE_S
        socks = [self._socket(zmq.DEALER, f"tcp://{address}",
                              lambda s: self.member.connect_to(s, manager=True)) for _ in range(MEMBER_DEALERS)]
        commands = sorted(m.SCHEMAS)
        weighted = commands + [c for c in commands if c in (m.REGISTER, m.BEAT, m.STATE, m.RUN, m.STATUS, m.MARK,
                                                             m.ATTACH, m.NODE_ENDED, m.FAILED)] * 3
        oversized = set(self.rng.sample(range(count), oversize))
        for i in range(count):
            if time.monotonic() > deadline:
                break
            if i in oversized:  # on a connection of its own: ZeroMQ cuts the connection that sent it
                big = self._socket(zmq.DEALER, f"tcp://{address}", lambda s: self.member.connect_to(s, manager=True))
                if self._send(big, [m.STATUS, _pack({"v": PROTOCOL_VERSION, "pad": bytes(OVERSIZE)})], deadline):
                    self.tally.add("manager")
                continue
            frames = self.hostile.envelope(weighted, self.hostile.manager_body)
            if self._send(self.rng.choice(socks), frames, deadline):
                self.tally.add("manager")
                self.tally.manager_rejected += _rejected(frames)
            if i % 50 == 0:
                self._drain(socks)
        self._drain(socks)

    def archives(self, addresses: list[str], count: int) -> None:
        deadline = time.monotonic() + PHASE_S
        socks = [self._socket(zmq.DEALER, a, self.member.connect_to) for a in addresses for _ in range(4)]
        commands = [m.SESSIONS, m.PART, m.FETCH, m.FETCH, m.FETCH, m.SEAL, m.STATUS, m.REGISTER]
        for i in range(count):
            if time.monotonic() > deadline:
                break
            if self._send(socks[i % len(socks)], self.hostile.envelope(commands, self.hostile.archive_body), deadline):
                self.tally.add("archive")
            if i % 20 == 0:
                self._drain(socks)
        self._drain(socks)

    def sealed(self, seals: list[tuple[str, Seal]], count: int) -> None:
        """The archive servers' data ports (`cluster/sealed.py`, plain TCP): garbage from anyone, unknown tickets,
        forged MACs, and members' streams with hostile requests; a few good ones among them. One connection each."""
        deadline = time.monotonic() + PHASE_S
        r = self.rng
        for i in range(count):
            if time.monotonic() > deadline:
                break
            host, seal = seals[i % len(seals)]
            pick = r.random()
            if pick < 0.3:
                data = r.randbytes(r.randrange(1, 100))
            elif pick < 0.5:
                data = Seal(seal.port, r.randbytes(16), seal.key, seal.mac_key).hello()
            elif pick < 0.65:
                data = MAGIC + seal.ticket + r.randbytes(16)
            elif pick < 0.9:
                data = seal.hello() + b"".join(
                    seal.request(r.choice((0, 1, 2**62, 2**64 - 1)), r.choice((0, 1, 4096, 2**32 - 1)))
                    for _ in range(r.randrange(1, 4))) + r.randbytes(r.randrange(0, 40))
            else:
                data = seal.hello() + seal.request(0, r.choice((1, 4096)))
            self.tally.connections += 1
            try:
                with socket.create_connection((host, seal.port), timeout=1.0) as conn:
                    conn.sendall(data)
                    conn.shutdown(socket.SHUT_WR)  # all said: the server answers what it will, then ends
                    self.tally.add("sealed")
                    with contextlib.suppress(OSError):
                        if conn.recv(1 << 16):
                            self.tally.replies += 1
            except OSError:
                self.tally.add("sealed")  # cut while sending (the server's streams are bounded): still a frame sent

    def publisher(self, endpoint: str, count: int) -> None:
        """Subscriptions and junk from members' XSUBs: random, real, preview and huge topics, unsubscribes."""
        deadline = time.monotonic() + PHASE_S
        socks = [self._socket(zmq.XSUB, endpoint, self.member.connect_to) for _ in range(4)]
        r = self.rng
        topics = (b"cam/video", b"cam/", b"", b"@cam/video", b"~cam/video", b"~@cam/video", b"sink/", b"\x00" * 8)
        for i in range(count):
            if time.monotonic() > deadline:
                break
            pick = r.random()
            if pick < 0.6:
                topic = r.choice(topics) if r.random() < 0.3 else r.randbytes(r.randrange(64))
                frames = [r.choice((b"\x01", b"\x00")) + topic]
            elif pick < 0.65:
                frames = [b"\x01" + bytes(HUGE_TOPIC)]
            else:
                frames = [r.randbytes(r.randrange(200)) for _ in range(r.randrange(1, 3))]
            if self._send(r.choice(socks), frames, deadline):
                self.tally.add("publisher")
            if i % 20 == 0:
                self._drain(socks)
        self._drain(socks)

    # -- strangers -------------------------------------------------------------------------------

    def strangers(self, targets: list[tuple[str, bool]], count: int, manager_public: bytes) -> None:
        """No keys (NULL), another cluster's keys, a stolen manager key with no secret, raw TCP: `count` frames.

        `targets`: (tcp://host:port, is the manager's control port).
        """
        deadline = time.monotonic() + PHASE_S
        sent = 0
        while sent < count and time.monotonic() < deadline:
            batch: list[zmq.Socket[Any]] = []
            for address, is_manager in targets:
                for kind in ("null", "other-cluster", "no-secret", "raw"):
                    if sent >= count:
                        break
                    if kind == "raw":
                        sent += self._raw(address, count - sent)
                        continue
                    curve = None if kind == "null" else self._stranger_keys(
                        manager_public if kind == "no-secret" and is_manager else None)
                    sock = self._socket(zmq.DEALER, address, curve)
                    batch.append(sock)
                    for _ in range(min(3, count - sent)):
                        frames = self.hostile.envelope([m.STATUS, m.REGISTER, m.FETCH], self.hostile.manager_body)
                        sent += self._send(sock, frames, time.monotonic())
            time.sleep(STRANGER_HOLD_S)
            for sock in batch:
                self._open.remove(sock)
                sock.close(linger=0)
        self.tally.add("stranger", sent)

    def _stranger_keys(self, server_public: bytes | None) -> Callable[[zmq.Socket[Any]], None]:
        """A client key pair of no cluster; the server's key guessed, or (an old token's) the manager's real one."""
        secret = z85.encode(self.rng.randbytes(32))
        server = server_public or zmq.curve_public(z85.encode(self.rng.randbytes(32)))

        def apply(sock: zmq.Socket[Any]) -> None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, server)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, zmq.curve_public(secret))
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        return apply

    def _raw(self, address: str, most: int) -> int:
        host, _, port = address.removeprefix("tcp://").rpartition(":")
        r = self.rng
        chunks = r.choice(([r.randbytes(r.choice((1, 9, 64, 4096)))], [ZMTP_NULL, r.randbytes(256)],
                           [ZMTP_CURVE, r.randbytes(200)], [b"\xff" + bytes(8) + b"\x7f", r.randbytes(64)],
                           [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]))[:most]
        written = 0
        self.tally.connections += 1
        try:
            with socket.create_connection((host, int(port)), timeout=1.0) as conn:
                for chunk in chunks:
                    conn.sendall(chunk)
                    written += 1
        except OSError:
            pass  # the server may hang up on garbage before we are done
        return written


# -- the processes -------------------------------------------------------------------------------


class Processes:
    """`cp` subprocesses, each in its own process group; `end_all()` stops them and kills what remains."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "cpcli", *args], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        self.started.append(proc)
        return proc

    def end_all(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(STOP_S)
            with contextlib.suppress(ProcessLookupError):  # node processes left in its group, or the group's leader
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(STOP_S)


@pytest.fixture
def processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Processes]:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # the manager makes the cluster's keys there
    procs = Processes(dict(os.environ))
    try:
        yield procs
    finally:
        procs.end_all()


def _wait_for(what: str, probe: Callable[[], Any], timeout_s: float, log: Path | None = None) -> Any:
    """The first true value of `probe()` within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.1)
    said = log.read_text(errors="replace")[-3000:] if log is not None else ""
    raise AssertionError(f"no {what} within {timeout_s:g} s\n{said}")


def _listening(log: Path) -> str | None:
    found = re.search(r"listening on (127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
    return found.group(1) if found else None


def _member_request(context: zmq.Context[Any], address: str, member: Credentials, command: bytes,
                    body: dict[str, Any]) -> tuple[bytes, dict[str, Any]] | None:
    """One request to an archive server as a member, its answer within ANSWER_S (None without one)."""
    sock: zmq.Socket[Any] = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    member.connect_to(sock)
    sock.connect(address)
    try:
        sock.send_multipart([command, _pack(body)])
        if not sock.poll(int(ANSWER_S * 1000)):
            return None
        frames = sock.recv_multipart()
        return frames[0], unpack_object(frames[1])
    finally:
        sock.close()


def _seals(context: zmq.Context[Any], archives: list[str], member: Credentials, session: str,
           paths: list[str]) -> list[tuple[str, Seal]]:
    """A member's seal from each archive server, for the first of `paths` it holds; (host, seal) each."""
    seals = []
    for archive in archives:
        for path in paths:
            answer = _member_request(context, archive, member, m.SEAL,
                                     {"v": PROTOCOL_VERSION, "session": session, "path": path})
            if answer is not None and answer[0] == m.SEAL_REPLY:
                seals.append((archive.removeprefix("tcp://").rpartition(":")[0], Seal.from_reply(answer[1])))
                break
    assert len(seals) == len(archives), seals
    return seals


def _sealed_request(host: str, seal: Seal) -> bytes:
    """A member's stream on a data port: the server's first answer (OPEN or GONE; b"" if it cut the stream)."""
    with socket.create_connection((host, seal.port), timeout=ANSWER_S) as conn:
        conn.sendall(seal.hello())
        return conn.recv(1)


def _malformed_workers(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Workers whose record the manager should never have taken: names `cp worker` would refuse, and the like."""
    bad = []
    for worker in status["workers"]:
        archive = worker.get("archive")
        port = re.fullmatch(r"tcp://[0-9.]+:(\d+)", archive) if isinstance(archive, str) else None
        if not (isinstance(worker.get("name"), str) and m.NAME_RE.fullmatch(worker["name"])
                and isinstance(worker.get("host"), str) and re.fullmatch(r"[A-Za-z0-9.:-]{1,253}", worker["host"])
                and worker.get("state") in ("ready", "running", "lost")
                and isinstance(worker.get("node_types"), list) and all(isinstance(t, str) for t in worker["node_types"])
                and (archive is None or (port is not None and 0 < int(port.group(1)) < 65536))):
            bad.append({k: (repr(v)[:80]) for k, v in worker.items() if k in ("name", "host", "archive", "state")})
    return bad


def _state(proc: subprocess.Popen[bytes]) -> str:
    return "runs" if proc.poll() is None else f"exited with {proc.returncode}"


def _said(log: Path) -> str:
    """The tracebacks in a log, else its last lines."""
    text = log.read_text(errors="replace")
    tracebacks = re.findall(r"^(?:Exception in thread[^\n]*\n)?Traceback.*?^\S[^\n]*$", text, re.M | re.S)
    return "\n".join(tracebacks)[-6000:] if tracebacks else text[-3000:]


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


# -- the test ----------------------------------------------------------------------------------------


def test_ten_thousand_hostile_frames_crash_nothing_and_are_all_counted(tmp_path: Path,
                                                                        processes: Processes) -> None:
    seed = int(os.environ.get("CP_FUZZ_SEED") or secrets.randbits(32))
    print(f"fuzz seed {seed} (replay: CP_FUZZ_SEED={seed})")
    started = time.monotonic()
    manager_log, run_log = tmp_path / "manager.log", tmp_path / "run.log"
    manager = processes.start(["manager", "--name", "m1", "--interface", "127.0.0.1", "--port", "0",
                               "--data", str(tmp_path / "data")], manager_log)
    address = _wait_for("manager listening", lambda: _listening(manager_log), START_S, manager_log)
    own = keys.manager_keys("default", create=False)
    assert own is not None
    member = keys.parse_token(keys.encode_token(own))  # what any machine holding the join token knows

    def status() -> dict[str, Any]:
        try:
            return cluster_status(address, TIMING, member)
        except CpError as err:
            raise AssertionError(f"seed {seed}: {err.message}; cp manager {_state(manager)}, it said:\n"
                                 f"{_said(manager_log)}") from err

    _wait_for("local worker m1", lambda: any(w["name"] == "m1" for w in status()["workers"]), START_S, manager_log)
    (tmp_path / "recipe.yaml").write_text(RECIPE, encoding="utf-8")
    run = processes.start(["run", str(tmp_path / "recipe.yaml"), "--json", "--manager", address], run_log)
    session = _wait_for("a running session with cam's publisher bound", lambda: (s := status()["session"]) and
                        s["phase"] == "running" and s["nodes"]["cam"].get("endpoint") and s, START_S, run_log)
    first = status()
    archives = [first["manager"]["archive"], *(w["archive"] for w in first["workers"] if w["name"] == "m1")]
    assert len(archives) == 2 and all(archives), first
    paths = ["manifest.json", "session.json", "recipe.yaml", "events.jsonl", "m1/worker.json", "logs/cam.log",
             "m1/cam/node.json"]
    name = str(session["name"])
    rng = random.Random(seed)
    fuzz = Fuzzer(rng, member, Hostile(rng, lambda: name, lambda: paths))
    try:
        # warm-up, then the memory baseline
        fuzz.manager(address, SHARE["warmup_manager"], oversize=1)
        fuzz.archives(archives, SHARE["warmup_archive"])

        def counted() -> bool:
            return bool(status()["manager"]["turned_away"]["dropped_messages"] >= fuzz.tally.manager_rejected)

        _wait_for("warm-up frames counted", counted, SETTLE_S, manager_log)
        fuzz.close_sockets()
        rss_warm = _rss(manager.pid)

        # members everywhere while the session records, then strangers
        fuzz.manager(address, SHARE["manager"], oversize=2)
        fuzz.archives(archives, SHARE["archive"])
        seals = _seals(fuzz.context, archives, member, name, paths)
        fuzz.sealed(seals, SHARE["sealed"])
        fuzz.publisher(str(session["nodes"]["cam"]["endpoint"]), SHARE["publisher"])
        fuzz.strangers([(f"tcp://{address}", True), *((a, False) for a in archives),
                        (str(session["nodes"]["cam"]["endpoint"]), False)], SHARE["stranger"], own.manager_public)
        _wait_for("fuzz frames counted", counted, SETTLE_S, manager_log)
        fuzz.close_sockets()

        # the session ends in order: Ctrl-C on cp run
        assert manager.poll() is None, f"seed {seed}: cp manager {_state(manager)}:\n{_said(manager_log)}"
        if run.poll() is None:
            os.kill(run.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.wait(RUN_STOP_S)
        said = run_log.read_text(errors="replace")
        assert run.returncode is not None and "{" in said, f"seed {seed}: cp run {_state(run)}:\n{said[-3000:]}"
        result = json.loads(said[said.index("{"):said.rindex("}") + 1])  # its --json result, whatever the end
        manifest_path = Path(result["manifest"])

        # members again, the session finished: RUN reaches placement, late reports name a finished session
        fuzz.manager(address, SHARE["manager_after"], oversize=1)
        _wait_for("the last frames counted", counted, SETTLE_S, manager_log)
        fuzz.close_sockets()
        time.sleep(1.0)  # a second for the manager to finish what the last frames asked of it
        rss_end = _rss(manager.pid)

        # still alive, still answering, still serving
        log = manager_log.read_text(errors="replace")
        assert manager.poll() is None and "Traceback" not in log, f"seed {seed}: cp manager {_state(manager)}:\n" \
            f"{_said(manager_log)}"
        asked = time.monotonic()
        after = status()
        assert time.monotonic() - asked < ANSWER_S, f"seed {seed}: cp status took {time.monotonic() - asked:.1f} s"
        for archive in archives:
            answer = _member_request(fuzz.context, archive, member, m.SESSIONS, {"v": PROTOCOL_VERSION})
            assert answer is not None and answer[0] == m.SESSION_LIST, (seed, archive, answer)
            assert name in {s["name"] for s in answer[1]["sessions"]}, (seed, archive, answer)
        for host, seal in seals:  # the data ports still open a member's stream (or say its seal ended)
            answer = _sealed_request(host, seal)
            assert answer in (OPEN, GONE), (seed, host, answer)

        # all counted
        away = after["manager"]["turned_away"]
        assert away["dropped_messages"] >= fuzz.tally.manager_rejected, (seed, away, fuzz.tally)
        assert away["refused_connections"] > 0 and away["failed_handshakes"] > 0, (seed, away)  # both ways to fail
        assert not _malformed_workers(after), (seed, _malformed_workers(after))
        assert fuzz.tally.total >= FRAMES * 0.95, (seed, fuzz.tally)  # the time bounds cut off no more than 5 %

        # the session recorded through it all, untouched by the fuzz
        manifest = json.loads(manifest_path.read_text())
        assert run.returncode in (0, 130) and manifest["status"] == "complete", \
            f"seed {seed}: cp run ended with {run.returncode}, session {manifest['status']}: {manifest.get('error')}"
        sent = manifest["nodes"]["cam"]["stats"]["samples_out"]
        sink = manifest["nodes"]["sink"]["stats"]
        assert sent > 0 and sink["samples_in"] == {"cam": sent} and sink["dropped_in"] == {"cam": 0}, (seed, sink)

        # memory stable
        growth = rss_end - rss_warm
        print(f"frames {fuzz.tally.frames} (total {fuzz.tally.total}), manager must drop "
              f"{fuzz.tally.manager_rejected}, turned away {away}, replies read {fuzz.tally.replies}, "
              f"connections {fuzz.tally.connections}; manager RSS {rss_warm / 2**20:.1f} -> {rss_end / 2**20:.1f} MiB "
              f"({growth / 2**20:+.1f}); {time.monotonic() - started:.1f} s")
        assert growth < RSS_GROWTH_BYTES, (seed, rss_warm, rss_end)
    finally:
        fuzz.close()
