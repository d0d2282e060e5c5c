"""The per-node recorder: takes a node's outputs without blocking and writes them on its own thread."""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from cpcli.archive.files import FileRecord, PortFiles, StreamWriter
from cpcli.archive.media import VideoSegments, WavSegments
from cpcli.archive.tables import EventsWriter, TableWriter, classify, kind_of
from cpcli.errors import ArchiveError

__all__ = ["FileRecord", "NodeRecorder", "RecorderStats", "RecordingError", "StreamWriter", "classify"]

QUEUE_MAX_BYTES = 512 << 20  # a backlog of big frames is bounded by memory too (~85 frames of 1080p)
DROP_LOG_INTERVAL_S = 1.0  # a full queue is logged at most this often, with the count since the last line
MEDIA_KINDS = frozenset({"video", "audio"})  # they share `<port>.timestamps.csv`, so a port holds one of them


@dataclass(frozen=True)
class RecorderStats:
    """A snapshot of a recorder: samples queued, written and dropped (queue full), bytes written."""

    backlog: int
    written: int
    dropped: int
    bytes: int


class RecordingError(ArchiveError):
    """A recording that failed; `files` lists what was still finished and can be kept."""

    def __init__(self, message: str, files: list[FileRecord], hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.files = files


class _Item(NamedTuple):
    port: str
    seq: int
    t_ns: int  # on the session timeline
    local_ns: int  # the recording machine's raw monotonic time of the same instant, for re-alignment
    value: Any
    rate_hz: float | None
    nbytes: int  # what the queued value holds in memory (arrays), for the byte bound


class NodeRecorder:
    """Records one node's outputs into `session_dir/<worker>/<node_id>/`, on one writer thread.

    `record()` never blocks: it queues the sample, or counts a drop when the queue is full. The
    writer thread picks each port's files by its first sample's kind (see `classify`), flushes
    every `flush_interval_s` (also when idle) and cuts video and audio into `video_segment_s`
    segments, so a crash loses at most about a second. Values must not be changed after they
    are handed to `record()`.
    """

    def __init__(
        self,
        session_dir: Path,
        worker: str,
        node_id: str,
        *,
        start_ns: int,
        queue_size: int = 256,
        queue_max_bytes: int = QUEUE_MAX_BYTES,
        flush_interval_s: float = 1.0,
        video_segment_s: float = 1.0,
        logger: logging.Logger | None = None,
    ) -> None:
        if queue_size < 1 or flush_interval_s <= 0 or video_segment_s <= 0:
            raise ArchiveError(
                f"recorder of node {node_id}: queue_size, flush_interval_s and "
                f"video_segment_s must be above 0, got {queue_size}, {flush_interval_s}, "
                f"{video_segment_s}"
            )
        self._dir = Path(session_dir) / worker / node_id
        self._rel_dir = f"{worker}/{node_id}"
        self._node_id, self._start_ns = node_id, start_ns
        self._flush_interval_s, self._segment_s = flush_interval_s, video_segment_s
        self._log = logger or logging.getLogger("cpcli.archive")
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()  # guards the counters and `_closing`
        self._backlog = self._written = self._dropped = self._bytes = 0
        self._queue_max_bytes, self._queued_bytes = queue_max_bytes, 0
        self._unlogged_drops, self._drop_logged_s = 0, -DROP_LOG_INTERVAL_S
        self._closing = False
        self._sentinel_sent = False
        self._thread: threading.Thread | None = None
        # owned by the writer thread until it ends
        self._writers: dict[tuple[str, str], StreamWriter] = {}
        self._failed_ports: set[str] = set()
        self._error: ArchiveError | None = None
        self._records: list[FileRecord] = []

    def start(self) -> None:
        """Create the node's folder and start the writer thread (once)."""
        if self._thread is not None:
            return
        if self._closing:
            raise ArchiveError(f"the recorder of node {self._node_id} was stopped and cannot start again")
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ArchiveError(f"cannot create the recording folder {self._dir} ({err.strerror})") from err
        self._thread = threading.Thread(target=self._run, name=f"cpcli-recorder-{self._node_id}", daemon=True)
        self._thread.start()

    def record(self, port: str, index: int, t_ns: int, value: Any, rate_hz: float | None, local_ns: int) -> None:
        """Queue one sample of `port` (`index` its sequence number, `t_ns` cluster time); never blocks.

        `local_ns` is the same instant on this machine's monotonic clock (`time.monotonic_ns()`);
        it is written beside `t_ns` so the stream can be re-aligned after the session.

        Raises:
            ArchiveError: an earlier sample could not be written (the recording is failing).
        """
        error = self._error
        if error is not None:
            raise ArchiveError(error.message, error.hint) from error
        nbytes = int(getattr(value, "nbytes", 0))
        item = _Item(port, index, t_ns - self._start_ns, int(local_ns), value, rate_hz, nbytes)
        with self._lock:
            fits = self._backlog == 0 or self._queued_bytes + nbytes <= self._queue_max_bytes
            if not self._closing and fits:
                try:
                    self._queue.put_nowait(item)
                    self._backlog += 1
                    self._queued_bytes += nbytes
                    return
                except queue.Full:
                    pass
            self._dropped += 1
            self._unlogged_drops += 1
        self._log_drops(time.monotonic())

    def _log_drops(self, now: float) -> None:
        """Log the drops not logged yet, at most once per DROP_LOG_INTERVAL_S."""
        with self._lock:
            if not self._unlogged_drops or now - self._drop_logged_s < DROP_LOG_INTERVAL_S:
                return
            count, total = self._unlogged_drops, self._dropped
            self._unlogged_drops, self._drop_logged_s = 0, now
        self._log.warning(
            "recorder of node %s dropped %d samples (%d in all): its queue of %d was full or it had stopped",
            self._node_id,
            count,
            total,
            self._queue.maxsize,
        )

    @property
    def stats(self) -> RecorderStats:
        with self._lock:
            return RecorderStats(self._backlog, self._written, self._dropped, self._bytes)

    def stop(self, timeout_s: float = 5.0) -> list[FileRecord]:
        """Write what is queued, finish every file and end the thread; again returns the same list.

        Raises:
            ArchiveError: the thread did not finish within `timeout_s`.
            RecordingError: a sample or file could not be written; its `files` lists the rest.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._closing = True
        thread = self._thread
        if thread is None:  # never started: what was queued is dropped, and counted
            with self._lock:
                self._dropped, self._backlog = self._dropped + self._backlog, 0
            return []
        if not self._sentinel_sent:
            try:
                self._queue.put(None, timeout=timeout_s)
                self._sentinel_sent = True
            except queue.Full:
                raise self._too_slow(timeout_s) from None
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            raise self._too_slow(timeout_s)
        self._log_drops(math.inf)
        if self._error is not None:
            raise RecordingError(self._error.message, list(self._records), self._error.hint) from self._error
        return list(self._records)

    def _too_slow(self, timeout_s: float) -> ArchiveError:
        return ArchiveError(
            f"the recorder of node {self._node_id} did not finish writing within "
            f"{timeout_s:g} s ({self.stats.backlog} samples still queued)",
            hint="the disk may be too slow or full",
        )

    # -- the writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        next_flush_s = time.monotonic() + self._flush_interval_s
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, next_flush_s - time.monotonic()))
            except queue.Empty:
                pass
            else:
                if item is None:
                    break
                self._write(item)
            if time.monotonic() >= next_flush_s:
                self._each_writer("flush")
                self._log_drops(time.monotonic())
                next_flush_s = time.monotonic() + self._flush_interval_s
        self._each_writer("close")
        self._records.sort(key=lambda r: r.path)
        with self._lock:
            self._bytes = sum(r.bytes for r in self._records)

    def _write(self, item: _Item) -> None:
        written = False
        if item.port not in self._failed_ports:
            try:
                writer = self._writer_for(item.port, kind_of(item.value))
                writer.write(item.seq, item.t_ns, item.local_ns, item.value, item.rate_hz)
                written = True
            except Exception as err:  # the thread's boundary: every failure must reach record() and stop()
                self._fail(item.port, err)
        total = sum(w.bytes_written for w in self._writers.values())
        with self._lock:
            self._backlog -= 1
            self._queued_bytes -= item.nbytes
            self._bytes = total
            if written:
                self._written += 1
            else:
                self._dropped += 1

    def _writer_for(self, port: str, kind: str) -> StreamWriter:
        writer = self._writers.get((port, kind))
        if writer is not None:
            return writer
        files = PortFiles(self._dir, self._rel_dir, self._node_id, port)
        if not port or port.startswith(".") or any(c in port for c in "/\\\0"):
            raise ArchiveError(f"{files.where}: the port name cannot be a file name")
        others = sorted(k for p, k in self._writers if p == port)
        if others and (kind in MEDIA_KINDS or MEDIA_KINDS & set(others)):
            raise ArchiveError(
                f"{files.where} sends {kind} after {others[0]}; a port records one kind of media",
                hint="send each kind on its own output port",
            )
        if others:
            self._log.info("%s sends %s besides %s samples; they go to their own file", files.where, kind, others[0])
        if kind == "video":
            writer = VideoSegments(files, self._segment_s, self._log)
        elif kind == "audio":
            writer = WavSegments(files, self._segment_s)
        elif kind == "table":
            writer = TableWriter(files, self._log)
        else:
            writer = EventsWriter(files)
        self._writers[(port, kind)] = writer
        return writer

    def _each_writer(self, action: str) -> None:
        for (port, _), writer in self._writers.items():
            try:
                if action == "flush":
                    writer.flush()
                else:
                    self._records += writer.close()
            except Exception as err:  # one failed file must not keep the others from finishing
                self._fail(port, err)
        if action == "flush":
            self._sync_folder()

    def _sync_folder(self) -> None:
        """fsync the folder so that files created since the last flush survive a power loss."""
        try:
            fd = os.open(self._dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            self._fail("", ArchiveError(f"cannot sync the recording folder {self._rel_dir} ({err.strerror})"))

    def _fail(self, port: str, err: Exception) -> None:
        self._failed_ports.add(port)
        if self._error is not None:
            return
        if isinstance(err, ArchiveError):
            self._error = err
        else:
            self._error = ArchiveError(
                f"recording port {port} of node {self._node_id} failed: {type(err).__name__}: {err}"
            )
            self._error.__cause__ = err
