"""Same-host path: readers of the publisher's machine read its Unix socket, with shared memory for large payloads."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from cpcli.errors import TransportError
from cpcli.node import Sample
from cpcli.transport import bell, shm
from cpcli.transport.pubsub import DATA_HWM, Publisher, SharedMemoryPlan, topic_for
from cpcli.transport.subscriber import Subscriber
from tests.conftest import wait_until as _until

WAIT_S = 5.0
log = logging.getLogger("test")
pytestmark = pytest.mark.skipif(not (bell.available() and shm.available()), reason="needs Linux and /dev/shm")


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _prefix(node: str = "cam") -> str:
    return shm.segment_prefix(uuid.uuid4().hex[:8], node, os.getpid())


def _drain(sub: Subscriber, pub: Publisher, until: Callable[[list[Sample]], bool]) -> list[Sample]:
    got: list[Sample] = []

    def pump() -> None:
        pub.handle_subscriptions()  # flushes what waits for the reader
        while (sample := sub.receive()) is not None:
            got.append(sample)
            sub.release(sample)

    _until(lambda: until(got), pump)
    return got


def _local_publisher(context: zmq.Context[Any], port: str) -> tuple[str, Publisher]:
    """A publisher of node `cam` with its same-host socket open."""
    prefix = _prefix()
    pub = Publisher(context, "cam", [port])
    assert pub.open_local(prefix)
    return prefix, pub


def _pair(context: zmq.Context[Any], port: str = "video", reader: int | None = None,
          threshold: int = 64 * 1024) -> tuple[Publisher, Subscriber]:
    prefix = _prefix()
    pub = Publisher(context, "cam", [port])
    assert pub.open_local(prefix)
    pub.share_memory(SharedMemoryPlan(1, () if reader is None else ((reader, port),), threshold))
    sub = Subscriber(context, "cam", pub.endpoint, topic_for("cam", port), log, shared_memory=(prefix, reader))
    _until(lambda: pub.subscribers(port) == 1, pub.handle_subscriptions)
    return pub, sub


def test_small_and_large_arrays_and_objects_arrive_in_order_by_the_right_path(context: zmq.Context[Any]) -> None:
    pub, sub = _pair(context)
    try:
        small = np.arange(100, dtype=np.int16)  # inline in the record
        frame = np.arange(480 * 640 * 3, dtype=np.uint8).reshape(480, 640, 3)  # in a shared-memory slot
        row = {"db": -3.5, "label": "x"}
        big = {"values": list(range(40_000))}  # msgpack > 64 KiB: through a slot too, never truncated
        for value in (small, frame, row, big):
            pub.publish("video", value, 7, 30.0)
        got = _drain(sub, pub, lambda g: len(g) == 4)
        assert [s.seq for s in got] == [0, 1, 2, 3]
        assert np.array_equal(got[0].value, small) and not got[0].value.flags.writeable
        assert np.array_equal(got[1].value, frame) and not got[1].value.flags.writeable
        assert got[2].value == row and got[3].value == big
        assert got[1].t_ns == 7 and got[1].rate_hz == 30.0
        assert pub._pool is not None and pub._pool.slot_count >= 1  # noqa: SLF001 - the frame took a slot
        assert sub.dropped == 0 and sub.malformed == 0
        pub.end()
        _until(lambda: sub.receive() is None and sub.ended)
    finally:
        sub.close()
        pub.close()


def test_a_reader_that_does_not_read_gets_a_bounded_backlog_then_counted_gaps_never_reordering(
        context: zmq.Context[Any]) -> None:
    pub, sub = _pair(context, "level")
    try:
        sent = 2_000  # far more than the socket buffer and the backlog hold
        payload = b"x" * 2_000
        for i in range(sent):
            pub.publish("level", {"i": i, "pad": payload}, i)
        assert pub._bell is not None  # noqa: SLF001
        dropped_at_publisher = pub._bell.dropped  # noqa: SLF001
        assert 0 < dropped_at_publisher < sent
        assert pub._bell.backlog() == DATA_HWM  # noqa: SLF001 - what waits in user space is bounded
        pub.end()  # the end always gets through, even past a full backlog
        got = _drain(sub, pub, lambda g: sub.ended)
        seqs = [s.seq for s in got]
        assert seqs == sorted(seqs) and [s.value["i"] for s in got] == seqs
        assert len(got) + sub.dropped == sent and sub.dropped == dropped_at_publisher
        assert seqs[-DATA_HWM:] == list(range(seqs[-DATA_HWM], seqs[-DATA_HWM] + DATA_HWM))  # the backlog came in full
    finally:
        sub.close()
        pub.close()


def test_a_sync_all_reader_holds_back_the_pool_and_gets_every_frame(context: zmq.Context[Any]) -> None:
    pub, sub = _pair(context, reader=0)
    try:
        frames = [np.full((240, 320, 3), i, np.uint8) for i in range(12)]
        seen: list[int] = []
        for i, frame in enumerate(frames):
            pub.publish("video", frame, i)
            if i % 3 == 2:  # the reader takes three at a time; the publisher never reuses what it holds
                for sample in _drain(sub, pub, lambda g: len(g) == 3):
                    seen.append(int(sample.value[0, 0, 0]))  # read before it is released
        assert seen == list(range(12)) and pub.pool_dropped == 0 and sub.stale == 0
    finally:
        sub.close()
        pub.close()


def test_a_reader_that_goes_away_is_forgotten_and_the_publisher_keeps_going(context: zmq.Context[Any]) -> None:
    pub, sub = _pair(context, "level")
    sub.close()
    try:
        _until(lambda: pub.subscribers("level") == 0, pub.handle_subscriptions)
        for i in range(10):
            pub.publish("level", i, i)  # nobody reads: nothing is sent, nothing fails
        assert pub.sent("level") == 10
    finally:
        pub.close()


def test_strangers_are_closed_and_counted_and_a_reader_checks_whom_it_reached(context: zmq.Context[Any]) -> None:
    prefix, pub = _local_publisher(context, "video")
    try:
        with pytest.raises(TransportError, match="held by pid"):
            bell.BellClient(prefix, b"cam/video", os.getpid() + 1)  # not the process the name says
        with pytest.raises(TransportError, match="cannot reach the upstream node's same-host socket"):
            bell.BellClient(prefix + "9", b"cam/video", None)
        unknown = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        unknown.connect("\0" + prefix)
        unknown.sendall(bell.HELLO + b"cam/secret")  # no topic of ours
        _until(lambda: _closed(unknown), pub.handle_subscriptions)
        assert pub._bell is not None and pub._bell.refused == 1  # noqa: SLF001
        assert pub.subscribers("video") == 0
    finally:
        unknown.close()
        pub.close()


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        return sock.recv(16) == b""
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:
        return True


AS_NOBODY = ("import logging, os, socket, sys\nfrom cpcli.transport import bell\n"  # imports first: then drop to nobody
             "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n")
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")


@root_only
def test_a_reader_of_another_user_is_refused(context: zmq.Context[Any]) -> None:
    prefix, pub = _local_publisher(context, "video")
    code = AS_NOBODY + (
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        f"s.connect({chr(0) + prefix!r})\n"
        "s.sendall(b'CPBELL1 cam/video')\n"
        "s.settimeout(5)\n"
        "try:\n"
        "    print('closed' if s.recv(16) == b'' else 'open', flush=True)\n"
        "except ConnectionResetError:\n"
        "    print('closed', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert pub._bell is not None  # noqa: SLF001
        _until(lambda: pub._bell.refused == 1 or proc.poll() is not None, pub.handle_subscriptions)  # noqa: SLF001
        out, _ = proc.communicate(timeout=10)
        assert out.strip() == "closed" and pub.subscribers("video") == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        pub.close()


@root_only
def test_a_reader_refuses_a_publisher_of_another_user() -> None:
    prefix = _prefix("other")
    code = AS_NOBODY + (
        f"server = bell.BellServer({prefix!r}, [b'cam/video'], logging.getLogger('t'), 8)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with pytest.raises(TransportError, match="belongs to user 65534"):
            bell.BellClient(prefix, b"cam/video", proc.pid)
    finally:
        proc.communicate(timeout=10)


def test_a_node_writing_two_large_ports_in_one_step_never_overwrites_the_first(context: zmq.Context[Any]) -> None:
    prefix = _prefix()
    pub = Publisher(context, "cam", ["color", "depth"])
    assert pub.open_local(prefix)
    pub.share_memory(SharedMemoryPlan(2))
    subs = [Subscriber(context, "cam", pub.endpoint, topic_for("cam", p), log, shared_memory=(prefix, None))
            for p in ("color", "depth")]
    try:
        _until(lambda: pub.subscribers("color") == pub.subscribers("depth") == 1, pub.handle_subscriptions)
        held: list[Sample] = []  # as `latest` inputs do: each keeps its newest sample until the next one
        for step in range(20):
            pub.publish("color", np.full((480, 640, 3), step, np.uint8), step)
            pub.publish("depth", np.full((480, 640), step, np.uint16), step)
            for sub, sample in zip(subs, held):  # noqa: B905 - nothing held before the first step
                sub.release(sample)
            held = [_one(sub) for sub in subs]
            assert [int(s.value.flat[0]) for s in held] == [step, step]
        assert [s.stale for s in subs] == [0, 0] and pub.pool_dropped == 0
    finally:
        for sub in subs:
            sub.close()
        pub.close()


def _one(sub: Subscriber) -> Sample:
    found: list[Sample] = []
    _until(lambda: bool(found) or ((s := sub.receive()) is not None and not found.append(s)))
    return found[0]


def test_a_node_id_too_long_for_a_socket_name_still_gets_the_same_host_path(context: zmq.Context[Any]) -> None:
    prefix = shm.segment_prefix(uuid.uuid4().hex[:8], "n" * 150, os.getpid())  # ids have no length limit
    pub = Publisher(context, "n" * 150, ["out"])
    assert pub.open_local(prefix)
    sub = Subscriber(context, "in", pub.endpoint, topic_for("n" * 150, "out"), log, shared_memory=(prefix, None))
    try:
        _until(lambda: pub.subscribers("out") == 1, pub.handle_subscriptions)
        assert sub._bell is not None  # noqa: SLF001 - not the TCP fallback
        pub.publish("out", np.ones((300, 300), np.float64), 1)
        assert np.array_equal(_one(sub).value, np.ones((300, 300)))
    finally:
        sub.close()
        pub.close()


def test_a_reader_that_cannot_reach_the_socket_reads_over_tcp_unless_the_pool_waits_for_it(
        context: zmq.Context[Any], caplog: pytest.LogCaptureFixture) -> None:
    prefix, pub = _local_publisher(context, "level")
    wrong = shm.segment_prefix("0" * 8, "cam", os.getpid())  # a socket nobody listens on
    try:
        with caplog.at_level(logging.WARNING, logger="test"):
            sub = Subscriber(context, "cam", pub.endpoint, topic_for("cam", "level"), log, shared_memory=(wrong, None))
        assert "reading it over TCP instead" in caplog.text
        try:
            _until(lambda: pub.subscribers("level") == 1, pub.handle_subscriptions)
            pub.publish("level", {"db": -3.0}, 1)
            assert _one(sub).value == {"db": -3.0}
        finally:
            sub.close()
        with pytest.raises(TransportError, match="cannot reach"):  # `sync: all`: the pool would wait for it
            Subscriber(context, "cam", pub.endpoint, topic_for("cam", "level"), log, shared_memory=(wrong, 0))
    finally:
        pub.close()


def test_a_reader_killed_with_9_mid_stream_costs_the_publisher_nothing(context: zmq.Context[Any]) -> None:
    prefix, pub = _local_publisher(context, "level")
    code = (
        "import sys, time\n"
        "from cpcli.transport import bell\n"
        f"client = bell.BellClient({prefix!r}, b'cam/level', {os.getpid()})\n"
        "print('connected', flush=True)\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "connected"
        _until(lambda: pub.subscribers("level") == 1, pub.handle_subscriptions)
        for i in range(200):  # it never reads: these fill its socket and the backlog
            pub.publish("level", {"i": i, "pad": "x" * 1000}, i)
        proc.kill()
        proc.wait(5)
        for i in range(200, 400):
            pub.publish("level", {"i": i}, i)
            pub.handle_subscriptions()
        _until(lambda: pub.subscribers("level") == 0, pub.handle_subscriptions)
        assert pub._bell is not None and pub._bell.backlog() == 0  # noqa: SLF001 - nothing kept for the dead
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        pub.close()
