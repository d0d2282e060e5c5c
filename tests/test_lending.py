"""Values built in place: lent output buffers and constants, sent to same-host readers with no copy."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from cpcli.clock import Clock
from cpcli.errors import NodeError, TransportError
from cpcli.node import NodeContext, Sample
from cpcli.registry import Registry
from cpcli.transport import bell, shm
from cpcli.transport.pubsub import SHM_MAX_SLOTS, Publisher, SharedMemoryPlan, topic_for
from cpcli.transport.subscriber import Subscriber
from tests.conftest import wait_until
from tests.test_shm import _rows, _run, segments

log = logging.getLogger("test")
pytestmark = pytest.mark.skipif(not (bell.available() and shm.available()), reason="needs Linux and /dev/shm")
FRAME = (480, 640, 3)


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def pool() -> Iterator[shm.SlotPool]:
    prefix = shm.segment_prefix(uuid.uuid4().hex[:8], "lend", os.getpid())
    slots = shm.SlotPool(prefix, initial_slots=2, max_slots=4)
    yield slots
    slots.close()
    assert not list(shm.SHM_DIR.glob(f"{prefix}_*")), "the pool left segments behind"


def _reader(pool: shm.SlotPool) -> shm.SlotReader:
    return shm.SlotReader(pool.prefix, None)


# -- the pool ------------------------------------------------------------------------------------


def test_a_lent_slot_is_invisible_until_published_then_read_as_built(pool: shm.SlotPool) -> None:
    reader = _reader(pool)
    try:
        index = pool.lend(16)
        assert index is not None
        pool.view(index)[:] = np.arange(16, dtype=np.uint8)
        ref = pool.publish_lent(index, seq=0)
        view = reader.open(ref, 0, np.dtype(np.uint8), (16,))
        assert view is not None and view.tolist() == list(range(16))
        reader.release(0)
        again = pool.lend(16)  # the slot may be lent again once released: the old reference goes stale
        assert again is not None
        if again == index:
            assert reader.open(ref, 1, np.dtype(np.uint8), (16,)) is None
            assert reader.stale == 1
        pool.take_back(again)
    finally:
        reader.close()


def test_a_slot_lent_over_an_unread_sample_makes_its_reference_stale_even_if_taken_back(pool: shm.SlotPool) -> None:
    reader = _reader(pool)
    try:
        refs = [pool.write(np.full(16, i, np.uint8), i, 0.1) for i in range(2)]  # the initial two slots
        assert all(refs)
        lent = [pool.lend(16) for _ in range(2)]  # round robin: slot 0 then slot 1 are lent
        for index in lent:
            assert index is not None
            pool.view(index)[:] = 255  # scribbled over, never sent
            pool.take_back(index)
        for seq, ref in enumerate(refs):
            assert ref is not None
            assert reader.open(ref, seq, np.dtype(np.uint8), (16,)) is None, "read a slot scribbled over"
        assert reader.stale == 2
    finally:
        reader.close()


def test_pinned_slots_are_never_reused_and_do_not_count_against_the_pool(pool: shm.SlotPool) -> None:
    reader = _reader(pool)
    try:
        pins = [pool.pin(np.full(32, 100 + i, np.uint8)) for i in range(6)]  # more than max_slots (4)
        assert all(pins)
        for seq in range(50):  # the pool cycles its own slots around the pinned ones
            assert pool.write(np.full(32, seq % 200, np.uint8), seq, 0.1) is not None
        for i, ref in enumerate(pins):
            assert ref is not None
            view = reader.open(ref, 1000 + i, np.dtype(np.uint8), (32,))
            assert view is not None and set(view.tolist()) == {100 + i}
            reader.release(1000 + i)
        assert pool.slot_count - len(pins) <= pool.max_slots
    finally:
        reader.close()


def test_a_held_slot_waits_for_its_holder_on_another_thread(pool: shm.SlotPool) -> None:
    index = pool.lend(8)
    assert index is not None
    pool.publish_lent(index, 0)
    pool.hold(index)
    claimed = []
    for seq in range(1, 20):
        next_index = pool.lend(8)
        assert next_index is not None
        claimed.append(next_index)
        pool.publish_lent(next_index, seq)
    assert index not in claimed, "a slot the recorder still reads was lent again"
    assert pool.held == 1
    threading.Thread(target=pool.unhold, args=(index,)).start()
    wait_until(lambda: pool.held == 0)
    assert index in {pool.publish_lent(i, 100 + n).slot for n, i in enumerate([pool.lend(8) for _ in range(4)])
                     if i is not None}


# -- the publisher -------------------------------------------------------------------------------


def _pair(context: zmq.Context[Any], *, tcp_too: bool = False) -> tuple[Publisher, Subscriber, Subscriber | None]:
    prefix = shm.segment_prefix(uuid.uuid4().hex[:8], "cam", os.getpid())
    pub = Publisher(context, "cam", ["video", "other"])
    assert pub.open_local(prefix)
    pub.share_memory(SharedMemoryPlan(1))
    local = Subscriber(context, "cam", pub.endpoint, topic_for("cam", "video"), log, shared_memory=(prefix, None))
    remote = Subscriber(context, "cam", pub.endpoint, topic_for("cam", "video"), log) if tcp_too else None
    wait_until(lambda: pub.subscribers("video") == (2 if tcp_too else 1), pub.handle_subscriptions)
    return pub, local, remote


def _take(pub: Publisher, sub: Subscriber, count: int) -> list[Sample]:
    got: list[Sample] = []

    def pump() -> None:
        pub.handle_subscriptions()
        while (sample := sub.receive()) is not None:
            got.append(Sample(np.array(sample.value), sample.t_ns, sample.rate_hz, sample.seq))
            sub.release(sample)

    wait_until(lambda: len(got) >= count, pump)
    return got


def test_a_lent_frame_reaches_shared_memory_and_tcp_readers_intact_after_its_slot_is_reused(
        context: zmq.Context[Any]) -> None:
    pub, local, remote = _pair(context, tcp_too=True)
    assert remote is not None
    try:
        for n in range(40):  # many more than the pool's slots: every slot is lent again and again
            frame = pub.lend("video", FRAME, np.dtype(np.uint8))
            frame.fill(n % 251)
            pub.publish("video", frame, n, 30.0)
            pub.end_step()
            if n % 2 == 1:  # two at a time: within the pool's initial slots, so none goes stale unread
                got = _take(pub, local, 2)
                assert [s.seq for s in got] == [n - 1, n]
                assert all(np.all(s.value == s.seq % 251) for s in got)
        assert pub.lent_sent == 40
        over_tcp = _take(pub, remote, 40)
        assert [s.seq for s in over_tcp] == list(range(40))
        assert all(np.all(s.value == s.seq % 251) for s in over_tcp), "ZeroMQ sent a slot after it was rewritten"
    finally:
        for sub in (local, remote):
            sub.close()
        pub.close()


def test_a_lend_that_waited_in_vain_for_a_sync_all_reader_is_not_waited_for_twice(context: zmq.Context[Any]) -> None:
    prefix = shm.segment_prefix(uuid.uuid4().hex[:8], "cam", os.getpid())
    pub = Publisher(context, "cam", ["video"])
    assert pub.open_local(prefix)
    pub.share_memory(SharedMemoryPlan(1, ((0, "video"),)))
    stuck = Subscriber(context, "cam", pub.endpoint, topic_for("cam", "video"), log, shared_memory=(prefix, 0))
    try:
        wait_until(lambda: pub.subscribers("video") == 1, pub.handle_subscriptions)
        for n in range(SHM_MAX_SLOTS):  # the reader releases nothing: every slot stays its
            pub.publish("video", pub.lend("video", FRAME, np.dtype(np.uint8)), n)
            pub.end_step()
        assert pub.lent_sent == SHM_MAX_SLOTS and pub._pool is not None  # noqa: SLF001
        waited_before = pub._pool.blocked_s  # noqa: SLF001
        frame = pub.lend("video", FRAME, np.dtype(np.uint8))  # waits for the reader, in vain
        assert frame.base is None, "no slot was free: plain memory"
        pub.publish("video", frame, SHM_MAX_SLOTS)  # dropped at once, counted
        pub.end_step()
        assert pub.pool_dropped == 1
        waited = pub._pool.blocked_s - waited_before  # noqa: SLF001
        assert 0.9 <= waited < 1.5, f"the source waited {waited:.2f} s: once for the lend and again to send"
    finally:
        stuck.close()
        pub.close()


def test_a_buffer_nobody_reads_here_is_plain_memory(context: zmq.Context[Any]) -> None:
    pub = Publisher(context, "cam", ["video"])
    try:
        frame = pub.lend("video", FRAME, np.dtype(np.uint8))  # no same-host socket, no reader
        assert frame.flags.writeable and frame.shape == FRAME and frame.base is None
        pub.publish("video", frame, 0)
        pub.end_step()
        assert pub.lent_sent == 0
    finally:
        pub.close()


def test_unreturned_buffers_are_taken_back_and_never_reach_a_reader(context: zmq.Context[Any]) -> None:
    pub, local, _ = _pair(context)
    try:
        for n in range(30):
            pub.lend("video", FRAME, np.dtype(np.uint8)).fill(255)  # kept back: must never be read
            frame = pub.lend("video", FRAME, np.dtype(np.uint8))
            frame.fill(n % 251)
            pub.publish("video", frame, n)
            pub.end_step()
            got = _take(pub, local, 1)
            assert got[0].seq == n and np.all(got[0].value == n % 251)
        assert pub.lent_sent == 30
        assert pub._pool is not None and pub._pool.slot_count <= 4  # noqa: SLF001 - no slot leaked per step
    finally:
        local.close()
        pub.close()


def test_a_lent_frame_goes_out_of_its_slot_once_and_is_copied_for_a_second_port(context: zmq.Context[Any]) -> None:
    pub, local, _ = _pair(context)
    other = Subscriber(context, "cam", pub.endpoint, topic_for("cam", "other"), log,
                       shared_memory=(pub._prefix or "", None))  # noqa: SLF001 - the same publisher's prefix
    try:
        wait_until(lambda: pub.subscribers("other") == 1, pub.handle_subscriptions)
        for n in range(12):
            frame = pub.lend("video", FRAME, np.dtype(np.uint8))
            frame.fill(n)
            pub.publish("video", frame, n)
            pub.publish("other", frame, n)  # the same frame on a second port: copied into a slot of its own
            pub.publish("video", frame[:240], n)  # half of it: an ordinary array, copied too
            pub.end_step()
            got = _take(pub, local, 2) + _take(pub, other, 1)
            assert [s.value.shape for s in got] == [FRAME, (240, 640, 3), FRAME]
            assert all(np.all(s.value == n) for s in got), "a slot was reused within the step"
        assert pub.lent_sent == 12
    finally:
        local.close()
        other.close()
        pub.close()


def test_a_constant_is_pinned_once_and_sent_again_and_again(context: zmq.Context[Any]) -> None:
    pub, local, remote = _pair(context, tcp_too=True)
    assert remote is not None
    try:
        stills = [pub.constant(np.full(FRAME, i, np.uint8)) for i in range(3)]
        assert not any(s.flags.writeable for s in stills)
        for n in range(30):
            pub.publish("video", stills[n % 3], n)
            pub.end_step()
        got = _take(pub, local, 30)
        assert [s.seq for s in got] == list(range(30))
        assert all(np.all(s.value == s.seq % 3) for s in got)
        assert pub.lent_sent == 30
        assert pub._pool is not None and pub._pool.slot_count == 3  # noqa: SLF001 - written once each
        assert all(np.all(s.value == s.seq % 3) for s in _take(pub, remote, 30))
    finally:
        local.close()
        remote.close()
        pub.close()


def test_a_lent_buffer_asked_for_an_unknown_port_or_shape_is_a_clear_error(context: zmq.Context[Any]) -> None:
    pub = Publisher(context, "cam", ["video"])
    try:
        ctx = NodeContext(node_id="cam", clock=Clock(), _lender=pub)
        with pytest.raises(NodeError, match="no output port 'audio'.*video"):
            ctx.output_buffer("audio", (4, 4))
        with pytest.raises(NodeError, match="shape"):
            ctx.output_buffer("video", (4, -1))
        with pytest.raises(NodeError, match="dtype"):
            ctx.output_buffer("video", (4, 4), "no such type")
        with pytest.raises(NodeError, match="plain numbers"):
            ctx.output_buffer("video", (4,), object)
        assert ctx.output_buffer("video", 5, "float32").shape == (5,)
        with pytest.raises(TransportError):
            pub.lend("nope", (1,), np.dtype(np.uint8))
    finally:
        pub.close()


def test_without_a_runtime_buffers_and_constants_are_plain_arrays() -> None:
    ctx = NodeContext(node_id="unit", clock=Clock())
    frame = ctx.output_buffer("video", (2, 3, 3))
    assert frame.shape == (2, 3, 3) and frame.dtype == np.uint8 and frame.flags.writeable
    source = np.ones((2, 2))
    still = ctx.constant(source)
    source[:] = 5
    assert not still.flags.writeable and np.all(still == 1)


def _wav_floats(path: Path) -> np.ndarray:
    """The samples of a float32 WAV file (RIFF chunks walked, not assumed)."""
    data = path.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    at = 12
    while at + 8 <= len(data):
        chunk, size = data[at:at + 4], int.from_bytes(data[at + 4:at + 8], "little")
        if chunk == b"fmt ":
            assert int.from_bytes(data[at + 8:at + 10], "little") in (3, 0xFFFE)  # IEEE float (or extensible)
        if chunk == b"data":
            return np.frombuffer(data[at + 8:at + 8 + size], dtype="<f4")
        at += 8 + size + (size & 1)
    raise AssertionError(f"{path} has no data chunk")


# -- sessions: real node processes ---------------------------------------------------------------

LENT = """
name: lent
nodes:
  src: {{type: pattern, params: {{width: 640, height: 480, rate_hz: 0, lend: true, spoil: true}}}}
  fast: {{type: verify, inputs: [src], record: true, sync: {sync}}}
  slow: {{type: verify, params: {{delay_ms: 15}}, inputs: [src], record: true, sync: {sync}}}
"""


@pytest.mark.parametrize("sync", ["latest", "all"])
def test_every_lent_frame_is_read_intact_and_in_order(sync: str, registry: Registry, tmp_path: Path) -> None:
    before = segments()
    result = _run(tmp_path, registry, LENT.format(sync=sync))
    assert not result.failures
    source = result.manifest["nodes"]["src"]["stats"]
    assert source["sent_in_place"] == source["samples_out"] > 20, "frames were copied, not sent from their buffers"
    for node in ("fast", "slow"):
        rows = _rows(result, node)
        assert len(rows) > 10
        assert all(r["ok"] == "true" for r in rows), f"{node} saw a torn, overwritten or spoiled frame"
        seqs = [int(r["seq"]) for r in rows]
        assert seqs == sorted(set(seqs)) and all(int(r["n"]) == int(r["seq"]) for r in rows)
        if sync == "all":
            assert seqs == list(range(source["samples_out"])), "a sync: all reader missed a sample"
    assert segments() == before, "shared memory leaked"


def test_recorded_lent_blocks_are_written_before_their_slots_are_reused(registry: Registry, tmp_path: Path) -> None:
    text = """
name: held
nodes:
  src: {type: blocks, params: {frames: 4096, channels: 8}, record: true}
  sink: {type: discard, inputs: [src], sync: latest}
"""
    before = segments()
    result = _run(tmp_path, registry, text, duration_s=2.0)
    assert not result.failures
    stats = result.manifest["nodes"]["src"]["stats"]
    assert stats["sent_in_place"] > 100  # the reader was there: blocks went out of their lent slots
    wavs = sorted((result.session_dir / "lab" / "src").glob("*.wav"))
    assert wavs
    blocks = np.concatenate([_wav_floats(p) for p in wavs]).reshape(-1, 4096, 8)
    values = blocks[:, 0, 0]
    assert all(np.all(block == block[0, 0]) for block in blocks), "a recorded block was overwritten"
    assert np.all(np.diff(values) >= 1) and len(values) == stats["samples_out"] - stats["record_dropped"]
    assert segments() == before, "shared memory leaked"


def test_constants_reach_readers_intact_without_copies(registry: Registry, tmp_path: Path) -> None:
    text = """
name: stills
nodes:
  src: {type: stills, params: {count: 3, rate_hz: 200}, record: true}
  latest: {type: still_check, params: {count: 3}, inputs: [src], record: true, sync: latest}
  all: {type: still_check, params: {count: 3}, inputs: [src], record: true, sync: all}
"""
    before = segments()
    result = _run(tmp_path, registry, text)
    assert not result.failures
    source = result.manifest["nodes"]["src"]["stats"]
    assert source["sent_in_place"] == source["samples_out"] > 100
    for node in ("latest", "all"):
        rows = _rows(result, node)
        assert rows and all(r["ok"] == "true" for r in rows)
        seqs = [int(r["seq"]) for r in rows]
        assert seqs == sorted(set(seqs))
    assert len(_rows(result, "all")) == source["samples_out"]
    assert segments() == before, "shared memory leaked"


def test_lent_frames_over_tcp_alone_are_plain_memory(registry: Registry, tmp_path: Path) -> None:
    result = _run(tmp_path, registry, LENT.format(sync="all"), shared_memory=False)
    assert not result.failures
    assert result.manifest["nodes"]["src"]["stats"]["sent_in_place"] == 0
    rows = _rows(result, "slow")
    assert rows and all(r["ok"] == "true" for r in rows)


def test_buffers_a_node_keeps_are_never_lent_again_while_it_has_them(registry: Registry, tmp_path: Path) -> None:
    text = """
name: kept
nodes:
  src: {type: pattern, params: {width: 640, height: 480, rate_hz: 0, lend: true, keep: true}}
  fast: {type: verify, inputs: [src], record: true, sync: latest}
"""
    before = segments()
    result = _run(tmp_path, registry, text)
    assert not result.failures, "a buffer the node kept was lent again and written over"
    source = result.manifest["nodes"]["src"]["stats"]
    assert source["samples_out"] > 50 and source["sent_in_place"] > 0
    rows = _rows(result, "fast")
    assert rows and all(r["ok"] == "true" for r in rows)
    assert segments() == before, "shared memory leaked"
