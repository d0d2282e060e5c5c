"""Same-host payloads in shared memory: a publisher's pool of slots, written once, read in place.

Each slot is one file in /dev/shm: a 64-byte header (generation, payload bytes) and the payload.
A publisher writes a slot under an exclusive `lockf` lock and bumps its generation; a reader
takes a shared lock for as long as it holds the sample and checks the generation, so a slot is
never rewritten while anyone reads it and a stale reference is detected, never read. POSIX record
locks vanish with their process, so a reader killed with -9 never pins a slot. A small control
file holds, per reader of a `sync: all` input, the last sequence number it released: the
publisher waits for those readers (backpressure) instead of reclaiming what they have not read.

A slot can also be lent to the node before it is written (`lend`: the node builds its value in
place, so nothing is copied), pinned (`pin`: a value sent many times, written once and never
reused) or held while the publisher's own process still uses it (`hold`: a lent array is alive,
in the recorder's queue or kept by the node).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import mmap
import os
import re
import struct
import time
from collections import deque
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cpcli.errors import TransportError

SHM_DIR = Path("/dev/shm")
PREFIX = "cpcli"  # every segment we create starts with it: cleanup never touches anything else
HEADER_BYTES = 64  # generation + payload size, padded so payloads start cache-line aligned
_HEADER = struct.Struct("<QQ")
MAX_READERS = 64  # readers per publisher that the control file has room for
_READER = struct.Struct("<qq")  # (pid, last released sequence number) per reader
_NAME = re.compile(rf"^{PREFIX}_[0-9a-f]+_[a-z0-9_]+_(\d+)_(?:ctl|s\d+)$")
BACKPRESSURE_POLL_S = 0.0005  # how often a blocked publisher looks for a released slot


def available() -> bool:
    """Whether this machine has a POSIX shared-memory folder we can use."""
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def segment_prefix(session_tag: str, node_id: str, pid: int) -> str:
    """Names are per session, node and process, so stale ones can be found and removed."""
    return f"{PREFIX}_{session_tag}_{node_id}_{pid}"


def prefix_pid(prefix: str) -> int | None:
    """The pid of the process a segment prefix belongs to (None if it carries none)."""
    tail = prefix.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def clean_stale_segments(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink segments whose creating process is gone (a node or `cp run` killed with -9)."""
    removed = []
    with contextlib.suppress(OSError):
        for path in shm_dir.iterdir():
            match = _NAME.match(path.name)
            if match and not _pid_alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path.name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_lock(fd: int, exclusive: bool) -> bool:
    try:
        fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB, 1, 0)
    except OSError:
        return False
    return True


def _unlock(fd: int) -> None:
    fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0)


class _Segment:
    """One mapped file in /dev/shm."""

    def __init__(self, path: Path, size: int, create: bool) -> None:
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            self.fd = os.open(path, flags, 0o600)
        except OSError as err:
            raise TransportError(f"cannot open shared memory {path} ({err.strerror})") from err
        try:
            if create:
                os.ftruncate(self.fd, size)
            else:
                size = os.fstat(self.fd).st_size
            self.map = mmap.mmap(self.fd, size)
        except OSError as err:
            os.close(self.fd)
            raise TransportError(f"cannot map shared memory {path} ({err.strerror})") from err
        self.size = size
        self._payload: np.ndarray | None = None

    @property
    def payload(self) -> np.ndarray:
        """The bytes after the header, as one writable uint8 array (made once: a slot is written often)."""
        if self._payload is None:
            self._payload = np.frombuffer(self.map, dtype=np.uint8, offset=HEADER_BYTES)
        return self._payload

    def close(self, unlink: bool) -> None:
        self._payload = None  # a view of the map: it would keep the map from closing
        with contextlib.suppress(BufferError, ValueError):
            self.map.close()  # a view still held elsewhere keeps the mapping; the fd goes anyway
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if unlink:
            with contextlib.suppress(OSError):
                self.path.unlink()


class SlotRef(NamedTuple):
    """What travels instead of the payload (a named tuple: one is made per message)."""

    slot: int
    generation: int


class SlotPool:
    """A publisher's slots: grows from `initial_slots` up to `max_slots`, never reuses a held slot."""

    def __init__(self, prefix: str, *, initial_slots: int = 4, max_slots: int = 16, shm_dir: Path = SHM_DIR) -> None:
        self.prefix = prefix
        self._dir = shm_dir
        self._initial = max(1, initial_slots)
        self._max = max(self._initial, max_slots)
        self._slots: list[_Segment | None] = []
        self._seqs: list[tuple[str, int]] = []  # (stream, sequence number) last written to each slot
        self._holds: list[int] = []  # the publisher's own holds on each slot (lent arrays still alive)
        self._unheld: deque[int] = deque()  # holds let go of on other threads, counted down at the next claim
        self._pinned: set[int] = set()  # slots written once and never reused
        self._lent: dict[int, int] = {}  # slot -> payload bytes, for slots lent out and not yet published
        self._next = 0  # round robin: the oldest slot is tried first
        self._control = _Segment(shm_dir / f"{prefix}_ctl", MAX_READERS * _READER.size, create=True)
        self._readers = np.frombuffer(self._control.map, dtype=np.int64).reshape(MAX_READERS, 2)
        self._readers[:] = -1
        self._all_readers: list[tuple[int, str]] = []  # (reader index, stream) of `sync: all` readers: wait for them
        self._generation = 0  # pool-wide, so a rewritten or replaced slot never repeats one
        self.blocked_s = 0.0  # time spent waiting for `all` readers (backpressure)

    @property
    def control_name(self) -> str:
        return f"{self.prefix}_ctl"

    @property
    def max_slots(self) -> int:
        return self._max

    @property
    def slot_count(self) -> int:
        return len(self._slots)

    def expect_all_reader(self, index: int, stream: str = "") -> None:
        """A reader of a `sync: all` input of `stream` (an output port: sequence numbers count per
        port): its unread samples of that stream are never reclaimed."""
        if not 0 <= index < MAX_READERS:
            raise TransportError(f"reader index {index} is outside 0..{MAX_READERS - 1}")
        self._all_readers.append((index, stream))

    def write(self, payload: np.ndarray, seq: int, timeout_s: float, stream: str = "") -> SlotRef | None:
        """Copy sample `seq` of `stream` into a free slot (the one copy); None if none freed up in time."""
        nbytes = payload.nbytes
        index = self._claim_waiting(nbytes, timeout_s)
        if index is None:
            return None
        segment = self._slots[index]
        assert segment is not None
        self._generation += 1
        generation = self._generation
        try:
            _HEADER.pack_into(segment.map, 0, generation, nbytes)
            np.copyto(segment.payload[:nbytes], payload.reshape(-1).view(np.uint8))
        finally:
            _unlock(segment.fd)
        self._seqs[index] = (stream, seq)
        return SlotRef(index, generation)

    def _claim_waiting(self, nbytes: int, timeout_s: float) -> int | None:
        index = self._claim(nbytes)
        if index is None:  # every slot is held: wait for a reader to let one go (backpressure)
            started = time.monotonic()
            deadline = started + timeout_s
            while index is None:
                if time.monotonic() >= deadline:
                    self.blocked_s += time.monotonic() - started
                    return None
                time.sleep(BACKPRESSURE_POLL_S)
                index = self._claim(nbytes)
            self.blocked_s += time.monotonic() - started
        return index

    def lend(self, nbytes: int, timeout_s: float = 0.0) -> int | None:
        """Lock a free slot for the node to build a payload of `nbytes` in, waiting for one as `write`
        does (None if none freed up in time). Until `publish_lent` or `take_back`, no reader can
        open it, and any reference to what it held before is stale."""
        index = self._claim_waiting(nbytes, timeout_s)
        if index is None:
            return None
        segment = self._slots[index]
        assert segment is not None
        _HEADER.pack_into(segment.map, 0, 0, nbytes)  # generation 0 matches no reference
        self._lent[index] = nbytes
        return index

    def view(self, index: int) -> np.ndarray:
        """The payload bytes of a lent slot, writable."""
        segment = self._slots[index]
        assert segment is not None and index in self._lent
        return segment.payload[: self._lent[index]]

    def publish_lent(self, index: int, seq: int, stream: str = "") -> SlotRef:
        """The node is done building a lent slot, sample `seq` of `stream`: readers may open it now."""
        nbytes = self._lent.pop(index)
        segment = self._slots[index]
        assert segment is not None
        self._generation += 1
        _HEADER.pack_into(segment.map, 0, self._generation, nbytes)
        _unlock(segment.fd)
        self._seqs[index] = (stream, seq)
        return SlotRef(index, self._generation)

    def take_back(self, index: int) -> None:
        """A lent slot the node did not send: free again (what it holds is never read)."""
        if self._lent.pop(index, None) is not None:
            segment = self._slots[index]
            assert segment is not None
            _unlock(segment.fd)

    def pin(self, payload: np.ndarray) -> SlotRef | None:
        """Write a payload once into a slot of its own that is never reused (until `close`), for a
        value sent many times; None if the pool has no room for it."""
        nbytes = payload.nbytes
        index = self._add_slot(nbytes, pinned=True)
        if index is None:
            return None
        segment = self._slots[index]
        assert segment is not None
        self._generation += 1
        _HEADER.pack_into(segment.map, 0, self._generation, nbytes)
        np.copyto(segment.payload[:nbytes], payload.reshape(-1).view(np.uint8))
        _unlock(segment.fd)
        self._pinned.add(index)
        return SlotRef(index, self._generation)

    def hold(self, index: int) -> None:
        """The publisher's process still uses this slot (a lent array is alive): never reuse it until `unhold`."""
        self._holds[index] += 1

    def unhold(self, index: int) -> None:
        """Let go of a `hold`; safe from any thread (counted down by the publisher's next claim)."""
        self._unheld.append(index)

    @property
    def held(self) -> int:
        """Slots the publisher itself holds."""
        self._drain_unheld()
        return sum(1 for count in self._holds if count > 0)

    def _drain_unheld(self) -> None:
        while self._unheld:
            self._holds[self._unheld.popleft()] -= 1

    def all_readers_within(self, seq: int, lag: int, stream: str = "") -> bool:
        """Whether every live `sync: all` reader of `stream` has released sample `seq - lag` (a pinned
        slot is never reclaimed, so this is what bounds their backlog instead)."""
        for reader, read in self._all_readers:
            if read != stream:
                continue
            pid, released = int(self._readers[reader, 0]), int(self._readers[reader, 1])
            if released < seq - lag and (pid < 0 or _pid_alive(pid)):
                return False
        return True

    def _claim(self, nbytes: int) -> int | None:
        """Lock a slot that no reader holds and no `all` reader still needs; grow if none.

        The pool first grows to its initial size, then goes round robin: a reference a reader has
        not opened yet stays good for that many writes (a node writing several ports in one step
        never overwrites the sample it has just sent)."""
        self._drain_unheld()
        count = len(self._slots)
        reusable = count - len(self._pinned)
        if reusable < self._initial:
            return self._add_slot(nbytes)
        for offset in range(count):
            index = (self._next + offset) % count
            segment = self._slots[index]
            if (segment is None or segment.size - HEADER_BYTES < nbytes or self._holds[index]
                    or index in self._pinned or index in self._lent or not self._released_by_all(index)):
                continue
            if _try_lock(segment.fd, exclusive=True):  # no reader holds it: unread references go stale
                self._next = (index + 1) % count
                return index
        if reusable < self._max or any(s is not None and s.size - HEADER_BYTES < nbytes for s in self._slots):
            return self._add_slot(nbytes)
        return None

    def _add_slot(self, nbytes: int, pinned: bool = False) -> int | None:
        """A new slot, or a too-small one replaced by a larger one."""
        size = HEADER_BYTES + nbytes
        for index, segment in enumerate(self._slots):
            if (segment is not None and segment.size < size and not pinned and not self._holds[index]
                    and index not in self._pinned and index not in self._lent
                    and _try_lock(segment.fd, exclusive=True)):
                segment.close(unlink=True)  # readers holding it keep their mapping until they let go
                self._slots[index] = None
        index = next((i for i, s in enumerate(self._slots) if s is None), len(self._slots))
        if index == len(self._slots) and not pinned and len(self._slots) - len(self._pinned) >= self._max:
            return None
        segment = _Segment(self._dir / f"{self.prefix}_s{index}", size, create=True)
        if not _try_lock(segment.fd, exclusive=True):  # nobody can know it yet; cannot fail
            segment.close(unlink=True)
            return None
        if index == len(self._slots):
            self._slots.append(segment)
            self._seqs.append(("", -1))
            self._holds.append(0)
        else:
            self._slots[index] = segment
            self._seqs[index] = ("", -1)
            self._holds[index] = 0
        return index

    def _released_by_all(self, index: int) -> bool:
        stream, seq = self._seqs[index]
        if seq < 0 or not self._all_readers:
            return True
        for reader, read in self._all_readers:
            if read != stream:
                continue  # another port's reader: its sequence numbers are not this slot's
            pid, released = int(self._readers[reader, 0]), int(self._readers[reader, 1])
            if released < seq and (pid < 0 or _pid_alive(pid)):
                return False  # an `all` reader (or one still starting up) has not read it yet
        return True

    def close(self) -> None:
        """Unlink every segment (readers keep their mappings until they close them)."""
        del self._readers
        for segment in self._slots:
            if segment is not None:
                segment.close(unlink=True)
        self._slots.clear()
        self._control.close(unlink=True)


class SlotReader:
    """A subscriber's side: maps a publisher's slots on first use, holds shared locks for leases."""

    def __init__(self, prefix: str, reader_index: int | None, shm_dir: Path = SHM_DIR) -> None:
        self._prefix = prefix
        self._dir = shm_dir
        self._segments: dict[int, _Segment] = {}
        self._held: dict[int, int] = {}  # seq -> slot index, for samples not yet released
        self._index = reader_index
        self._control: _Segment | None = None  # mapped with the first sample: the pool exists by then
        self._released = -1
        self.stale = 0  # references whose slot had already been rewritten: counted as drops

    def open(self, ref: SlotRef, seq: int, dtype: np.dtype, shape: tuple[int, ...],
             remapped: bool = False) -> np.ndarray | None:
        """A read-only view on the payload, held until `release(seq)`; None if it went stale."""
        if self._index is not None and self._control is None:
            self._control = _Segment(self._dir / f"{self._prefix}_ctl", 0, create=False)
            _READER.pack_into(self._control.map, self._index * _READER.size, os.getpid(), self._released)
        segment = self._segments.get(ref.slot)
        if segment is None:
            segment = self._map(ref.slot)
            if segment is None:
                self.stale += 1
                return None
        if not _try_lock(segment.fd, exclusive=False):  # the publisher is rewriting it right now
            self.stale += 1
            return None
        generation, nbytes = _HEADER.unpack_from(segment.map, 0)
        expected = math.prod(shape) * dtype.itemsize  # math.prod: np.prod costs ~0.2 ms per call here
        if generation < ref.generation and not remapped:  # the slot was replaced by a larger file
            _unlock(segment.fd)
            segment.close(unlink=False)
            del self._segments[ref.slot]
            return self.open(ref, seq, dtype, shape, remapped=True)
        if generation != ref.generation:
            _unlock(segment.fd)
            self.stale += 1
            return None
        if nbytes != expected:
            _unlock(segment.fd)
            raise TransportError(f"shared-memory slot holds {nbytes} bytes, header says {expected}")
        view = np.frombuffer(segment.map, dtype=dtype, count=expected // dtype.itemsize,
                             offset=HEADER_BYTES).reshape(shape)
        view.flags.writeable = False
        self._held[seq] = ref.slot
        return view

    def _map(self, slot: int) -> _Segment | None:
        try:
            segment = _Segment(self._dir / f"{self._prefix}_s{slot}", 0, create=False)
        except TransportError:
            return None  # unlinked already: the publisher replaced or closed it
        self._segments[slot] = segment
        return segment

    def release(self, seq: int) -> None:
        """Let the publisher reuse the slot of a sample this reader is done with."""
        slot = self._held.pop(seq, None)
        if slot is not None and slot in self._segments:
            _unlock(self._segments[slot].fd)
        if seq > self._released:
            self._released = seq
            if self._control is not None and self._index is not None:
                _READER.pack_into(self._control.map, self._index * _READER.size, os.getpid(), seq)

    def close(self) -> None:
        for seq in list(self._held):
            self.release(seq)
        for segment in self._segments.values():
            segment.close(unlink=False)
        self._segments.clear()
        if self._control is not None:
            self._control.close(unlink=False)
            self._control = None
