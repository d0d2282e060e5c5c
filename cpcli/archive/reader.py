"""Reading a recorded session back, for analysis: every stream's timestamps (cluster time and UTC) and files.

    from cpcli.archive import open_session

    session = open_session("sessions/2026-11-25T14-03-12_webcam-and-mic")
    cam, mic = session.stream("cam.video"), session.stream("mic.audio")
    frame_times = cam.utc            # numpy datetime64[ns], one per frame
    block_times = mic.t_ns           # int64 ns since the session start, on the cluster clock
    nearest = cam.index_at(block_times)   # the frame shown when each audio block was captured

Every stream of every worker is on one timeline: `t_ns` is nanoseconds since the session's start on
the cluster clock, `cluster_ns` the cluster clock itself, `utc` the session's UTC anchor plus `t_ns`,
and `local_ns` (when the session has it) the recording machine's own monotonic clock, for re-aligning
post hoc with the clock history in `session.manifest["workers"][worker]["clock"]`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cpcli.archive.report import Findings
from cpcli.archive.rows import read_rows
from cpcli.archive.streams import find_streams, not_a_session, read_manifest, read_records, scan_disk

Int64s = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Stream:
    """One recorded output port: `node.port`, what kind of data, where it is, and when each sample was."""

    node: str
    port: str
    worker: str
    kind: str  # video | audio | table | events
    files: tuple[Path, ...]  # the data files present, in order (segments, table parts, JSON Lines)
    missing: tuple[Path, ...]  # files the manifest lists that are not here (not collected yet, or lost)
    timestamps_file: Path | None  # video and audio: the per-frame / per-block timestamps
    index: Int64s  # the sample's sequence number (gaps are samples that never arrived)
    t_ns: Int64s  # ns since the session start, on the cluster clock
    local_ns: Int64s | None  # the recording machine's monotonic clock (None: recorded before cpcli kept it)
    start_cluster_ns: int
    start_utc: np.datetime64

    @property
    def name(self) -> str:
        return f"{self.node}.{self.port}"

    @property
    def cluster_ns(self) -> Int64s:
        """The cluster clock (the manager's monotonic clock) at each sample."""
        return np.asarray(self.t_ns + np.int64(self.start_cluster_ns), dtype=np.int64)

    @property
    def utc(self) -> npt.NDArray[np.datetime64]:
        """UTC at each sample: the session's UTC anchor plus the time since the start."""
        return self.start_utc + self.t_ns.astype("timedelta64[ns]")

    def index_at(self, t_ns: Int64s | int) -> Int64s:
        """For each time (session ns), the row of this stream's latest sample at or before it (-1: none yet)."""
        return np.searchsorted(self.t_ns, np.asarray(t_ns, dtype=np.int64), side="right").astype(np.int64) - 1


@dataclass(frozen=True)
class Session:
    path: Path
    manifest: dict[str, Any]  # empty when the session has none (its cp run was killed)
    start_utc: datetime | None
    start_cluster_ns: int
    streams: dict[str, Stream] = field(default_factory=dict)  # by `node.port`
    events: tuple[dict[str, Any], ...] = ()  # events.jsonl: lifecycle events and `cp mark`s, with `t_ns`

    def stream(self, name: str) -> Stream:
        """The stream `node.port` (or `node` when the node recorded one port)."""
        if name in self.streams:
            return self.streams[name]
        ports = [s for s in self.streams.values() if s.node == name]
        if len(ports) == 1:
            return ports[0]
        raise KeyError(f"session {self.path.name} has no stream {name!r}; it has {', '.join(self.streams) or 'none'}")

    def marks(self) -> list[dict[str, Any]]:
        """The `cp mark` events, each with its label, meta and `t_ns`."""
        return [e for e in self.events if e.get("event") == "mark"]


def open_session(path: str | Path) -> Session:
    """Read a session folder (collected or as `cp run` left it, with or without a manifest).

    Raises:
        ArchiveError: the folder is not a session.
    """
    root = Path(path)
    findings = Findings()
    manifest = read_manifest(root, findings) or {}
    disk = scan_disk(root) if root.is_dir() else {}
    if not manifest and not disk:
        raise not_a_session(root)
    _, expected = read_records(root, manifest or None, disk)
    start_utc = _utc(manifest.get("start_utc"))
    start_cluster = int((manifest.get("clock") or {}).get("start_cluster_ns") or 0)
    anchor = np.datetime64(start_utc.replace(tzinfo=None), "ns") if start_utc else np.datetime64(0, "ns")
    streams = {}
    for recorded in find_streams(root, expected, disk):
        rows = read_rows(root, recorded)
        local = rows.np("local_ns").copy() if rows.has_local else None
        present = tuple(root / p for p in recorded.data if (root / p).is_file())
        missing = tuple(root / p for p in recorded.data if not (root / p).is_file())
        timestamps = root / recorded.timestamps if recorded.timestamps else None
        streams[recorded.name] = Stream(recorded.node, recorded.port, recorded.worker, recorded.kind, present,
                                        missing, timestamps, rows.np("index").copy(), rows.np("t_ns").copy(), local,
                                        start_cluster, anchor)
    return Session(root, manifest, start_utc, start_cluster, dict(sorted(streams.items())), _events(root))


def _utc(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _events(root: Path) -> tuple[dict[str, Any], ...]:
    events = []
    try:
        with (root / "events.jsonl").open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if isinstance(event, dict):
                    events.append(event)
    except OSError:
        pass
    return tuple(events)
