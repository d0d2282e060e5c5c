"""`Tracker`: follows the cluster through the manager's status replies and the nodes' previews.

It keeps what a single reply cannot tell: current rates, drops that are growing, the recording
rate and the disk's time left, the event log, an audio meter's held peak and its last clip.
`snapshot()` freezes it into what the view renders. No I/O: times are passed in (monotonic seconds).
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cpcli.monitor.health import (
    RATE_WINDOW_S,
    STALL_S,
    Report,
    as_float,
    as_int,
    counts,
    current_rate,
    event_view,
    node_problems,
    nominal_rate,
    with_problems,
)
from cpcli.monitor.state import (
    ClockView,
    DiskView,
    EventsPreview,
    EventView,
    FramePreview,
    LevelPreview,
    ManagerView,
    NodeView,
    PortPreview,
    PreviewContent,
    SessionView,
    Snapshot,
    TypeInfo,
    UiState,
    ValuesPreview,
    WorkerView,
)

BYTES_WINDOW_S = 5.0  # recording rate (and the disk's time left) over this long
HOLD_S = 1.5  # an audio meter holds its peak this long
CLIP_SHOW_S = 3.0  # and shows a clip this long after it happened
EVENT_LOG = 100  # events kept for the log
EVENT_VALUES = 6  # last values of an event port kept for its preview
LIVE_STATES = ("ready", "running", "stopping")  # a node in these has a rate and previews


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _rgb(frame: np.ndarray) -> np.ndarray | None:
    """A preview frame as H x W x 3 red-green-blue; frames travel in OpenCV's blue-green-red order."""
    if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or frame.size == 0:
        return None
    if frame.ndim == 2:
        return np.repeat(frame[:, :, None], 3, axis=2)
    if frame.shape[2] == 1:
        return np.repeat(frame, 3, axis=2)
    if frame.shape[2] == 3:
        return np.ascontiguousarray(frame[:, :, ::-1])
    return None


@dataclass
class _NodeHistory:
    reports: deque[Report] = field(default_factory=lambda: deque(maxlen=64))
    drops: deque[tuple[float, dict[str, int]]] = field(default_factory=lambda: deque(maxlen=64))
    bytes: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))


@dataclass
class _PortState:
    content: PreviewContent | None = None
    at: float = 0.0
    values: deque[Any] = field(default_factory=lambda: deque(maxlen=EVENT_VALUES))
    peaks: deque[tuple[float, tuple[float, ...]]] = field(default_factory=deque)
    clipped_at: float | None = None


class Tracker:
    """Follows the cluster through status replies and previews; `snapshot()` gives what to show."""

    def __init__(self, types: Mapping[str, TypeInfo] | None = None) -> None:
        self._types = dict(types or {})
        self._status: dict[str, Any] | None = None
        self._session: str | None = None
        self._nodes: dict[str, _NodeHistory] = {}
        self._ports: dict[tuple[str, str], _PortState] = {}
        self._events: deque[EventView] = deque(maxlen=EVENT_LOG)
        self._seen: deque[str] = deque(maxlen=EVENT_LOG * 2)
        self._unreachable: tuple[float, str] | None = None

    # -- input ---------------------------------------------------------------------------

    def update(self, status: Mapping[str, Any], now: float) -> None:
        """A status reply of the manager (`cp status --json`), received at `now`."""
        self._status = dict(status)
        self._unreachable = None
        session = status.get("session") if isinstance(status.get("session"), dict) else None
        name = str(session.get("name")) if session else None
        if name != self._session and name is not None:
            self._nodes.clear()
            self._ports.clear()
            self._events.clear()
        self._session = name if name is not None else self._session
        for node_id, node in ((session or {}).get("nodes") or {}).items():
            if isinstance(node, dict):
                self._follow(str(node_id), node, now)
        for event in status.get("events") or []:
            if isinstance(event, dict) and (name is None or event.get("session") in (name, None)):  # this session's
                key = json.dumps(event, sort_keys=True, default=str)
                if key not in self._seen:
                    self._seen.append(key)
                    self._events.append(event_view(event))

    def unreachable(self, why: str, now: float) -> None:
        """The manager did not answer; what was last known stays on screen."""
        since = self._unreachable[0] if self._unreachable else now
        self._unreachable = (since, why)

    def add_preview(self, node: str, port: str, value: Any, now: float) -> None:
        """A preview from a node's publisher: a small frame, an audio level, a table row or an event."""
        state = self._ports.setdefault((node, port), _PortState())
        state.at = now
        if isinstance(value, np.ndarray):
            rgb = _rgb(value)
            if rgb is not None:
                state.content = FramePreview(rgb)
            return
        if isinstance(value, dict) and isinstance(value.get("rms_db"), list) and isinstance(value.get("peak_db"), list):
            rms = tuple(float(v) for v in value["rms_db"])
            peak = tuple(float(v) for v in value["peak_db"]) or rms
            state.peaks.append((now, peak))
            while state.peaks and now - state.peaks[0][0] > HOLD_S:
                state.peaks.popleft()
            held = tuple(max(p[i] for _, p in state.peaks if len(p) > i) for i in range(len(peak)))
            if value.get("clipped"):
                state.clipped_at = now
            state.content = LevelPreview(rms, held, False)
            return
        if isinstance(value, dict) and value and all(_is_scalar(v) for v in value.values()):
            state.content = ValuesPreview(tuple((str(k), v) for k, v in value.items()))
            return
        state.values.append(value)
        state.content = EventsPreview(tuple(state.values))

    # -- what to subscribe to ------------------------------------------------------------

    def preview_ports(self) -> dict[str, tuple[tuple[str, str], ...]]:
        """Per publisher endpoint, the (node, port) pairs a monitor can watch."""
        wanted: dict[str, list[tuple[str, str]]] = {}
        for node_id, node in self._raw_nodes().items():
            endpoint = node.get("endpoint")
            if not isinstance(endpoint, str) or node.get("state") not in ("ready", "running"):
                continue
            for port in self._outputs(node):
                wanted.setdefault(endpoint, []).append((node_id, port))
        return {e: tuple(p) for e, p in wanted.items()}

    def node_ids(self) -> tuple[str, ...]:
        return tuple(self._raw_nodes())

    # -- output --------------------------------------------------------------------------

    def snapshot(self, now: float, ui: UiState | None = None) -> Snapshot:
        ui = ui or UiState()
        notice = None
        if self._unreachable is not None:
            since, why = self._unreachable
            notice = f"manager unreachable, retrying ({now - since:.0f} s): {why}"
        status = self._status
        if status is None:
            return Snapshot(notice=notice, ui=ui)
        manager = status.get("manager") or {}
        workers = tuple(_worker_view(w) for w in status.get("workers") or [] if isinstance(w, dict))
        raw_session = status.get("session") if isinstance(status.get("session"), dict) else None
        nodes: tuple[NodeView, ...] = ()
        session = None
        if raw_session is not None:
            phase, elapsed = str(raw_session.get("phase", "")), as_float(raw_session.get("elapsed_s")) or 0.0
            nodes = tuple(self._node_view(node_id, node, now, phase, elapsed)
                          for node_id, node in self._raw_nodes().items())
            session = SessionView(str(raw_session.get("name", "")), phase, elapsed,
                                  tuple(str(w) for w in raw_session.get("lost") or []),
                                  sum(n.record_bytes for n in nodes),
                                  self._bytes_rate(None, now) if phase in ("running", "stopping") else None,
                                  self._disk(workers, nodes, now))
        live = {n.id for n in nodes if n.state in LIVE_STATES}
        previews = tuple(PortPreview(node, port, state.content, now - state.at)
                         for (node, port), state in self._ports.items() if state.content is not None and node in live)
        previews = tuple(self._with_clip(p, now) for p in previews)
        return Snapshot(ManagerView(str(manager.get("name", "?")), str(manager.get("cluster", "?")),
                                    str(manager.get("address", "?")), str(manager.get("version", "?")),
                                    as_float(manager.get("uptime_s")) or 0.0),
                        workers, session, nodes, tuple(self._events), previews, notice, ui)

    # -- inside --------------------------------------------------------------------------

    def _raw_nodes(self) -> dict[str, dict[str, Any]]:
        session = (self._status or {}).get("session")
        nodes = session.get("nodes") if isinstance(session, dict) else None
        return {str(k): v for k, v in nodes.items() if isinstance(v, dict)} if isinstance(nodes, dict) else {}

    def _outputs(self, node: Mapping[str, Any]) -> tuple[str, ...]:
        given = node.get("outputs")
        if isinstance(given, list):
            return tuple(str(p) for p in given)
        info = self._types.get(str(node.get("type")))
        return info.outputs if info else ()

    def _follow(self, node_id: str, node: Mapping[str, Any], now: float) -> None:
        history = self._nodes.setdefault(node_id, _NodeHistory())
        stats = _stats(node)
        ports = max(1, len(self._outputs(node)))
        count = (as_int(stats.get("samples_out")) or 0) // ports
        if not history.reports or history.reports[-1].count != count:
            history.reports.append(Report(now, count, as_float(stats.get("rate_hz")) or 0.0))
        drops = counts(stats.get("dropped_in"))
        if not history.drops or history.drops[-1][1] != drops:
            history.drops.append((now, drops))
        recorded = as_int(stats.get("record_bytes")) or 0
        if not history.bytes or history.bytes[-1][1] != recorded:
            history.bytes.append((now, recorded))

    def _node_view(self, node_id: str, node: Mapping[str, Any], now: float, phase: str, elapsed: float) -> NodeView:
        stats = _stats(node)
        history = self._nodes.get(node_id, _NodeHistory())
        node_type = str(node.get("type", "?"))
        info = self._types.get(node_type)
        params = node.get("params")
        nominal = nominal_rate(params, info.defaults if info else None) if isinstance(params, dict) else None
        samples_in = counts(stats.get("samples_in"))
        latency = stats.get("latency_ms")
        latency = latency if isinstance(latency, dict) else {}
        state = str(node.get("state", "?"))
        rate = current_rate(list(history.reports), now)
        if rate is None and history.reports:
            rate = as_float(stats.get("rate_hz"))
        if state not in LIVE_STATES:
            rate = None  # done, failed or lost: no rate now

        def number(key: str) -> int:
            return as_int(stats.get(key)) or 0

        view = NodeView(
            id=node_id, type=node_type, worker=str(node.get("worker", "")), state=state,
            samples_out=number("samples_out"), rate_hz=rate, nominal_hz=nominal, samples_in=samples_in,
            dropped_in=counts(stats.get("dropped_in")),
            latency_ms=(as_float(latency.get("p50")) or 0.0, as_float(latency.get("p99")) or 0.0) if samples_in
            else None,
            record_backlog=number("record_backlog"), record_bytes=number("record_bytes"),
            record_dropped=number("record_dropped"), dropped_out=number("dropped_out"),
            source_lost=number("source_lost"), error=str(node["error"]) if node.get("error") else None,
            outputs=self._outputs(node))
        stalled = None
        if len(history.reports) >= 2 and now - history.reports[-1].t > STALL_S:
            stalled = now - history.reports[-1].t
        return with_problems(view, node_problems(view, elapsed, phase, _dropping(history, now), stalled))

    def _bytes_rate(self, worker: str | None, now: float) -> float | None:
        """Recording rate (bytes/s) of the session, or of one worker's nodes, over BYTES_WINDOW_S."""
        total = 0.0
        known = False
        for node_id, node in self._raw_nodes().items():
            if worker is not None and node.get("worker") != worker:
                continue
            points = self._nodes.get(node_id, _NodeHistory()).bytes
            if len(points) < 2:
                continue
            known = True
            if now - points[-1][0] > BYTES_WINDOW_S:
                continue
            recent = [p for p in points if p[0] >= now - BYTES_WINDOW_S]
            first = recent[0] if len(recent) >= 2 else points[-2]
            dt = points[-1][0] - first[0]
            if dt > 0:
                total += (points[-1][1] - first[1]) / dt
        return total if known else None

    def _disk(self, workers: Iterable[WorkerView], nodes: Sequence[NodeView], now: float) -> DiskView | None:
        used = {n.worker for n in nodes}
        worst: DiskView | None = None
        for worker in workers:
            if worker.name not in used or worker.disk_free is None or worker.state == "lost":
                continue
            rate = self._bytes_rate(worker.name, now)
            left = worker.disk_free / rate if rate else None
            candidate = DiskView(worker.name, worker.disk_free, left)
            if worst is None or _sooner(candidate, worst):
                worst = candidate
        return worst

    def _with_clip(self, preview: PortPreview, now: float) -> PortPreview:
        state = self._ports.get((preview.node, preview.port))
        content = preview.content
        if isinstance(content, LevelPreview) and state is not None and state.clipped_at is not None:
            content = LevelPreview(content.rms_db, content.peak_db, now - state.clipped_at <= CLIP_SHOW_S)
        return PortPreview(preview.node, preview.port, content, preview.age_s)


def _sooner(a: DiskView, b: DiskView) -> bool:
    left_a = a.time_left_s if a.time_left_s is not None else math.inf
    left_b = b.time_left_s if b.time_left_s is not None else math.inf
    return (left_a, a.free_bytes) < (left_b, b.free_bytes)


def _dropping(history: _NodeHistory, now: float) -> dict[str, int]:
    """Inputs whose drop count grew in the last RATE_WINDOW_S, and by how much (the first look is the base)."""
    if len(history.drops) < 2:
        return {}
    base = history.drops[0][1]
    for t, drops in history.drops:
        if t < now - RATE_WINDOW_S:
            base = drops
    latest = history.drops[-1][1]
    return {k: v - base.get(k, 0) for k, v in latest.items() if v > base.get(k, 0)}


def _stats(node: Mapping[str, Any]) -> Mapping[str, Any]:
    stats = node.get("stats")
    return stats if isinstance(stats, dict) else {}


def _worker_view(data: Mapping[str, Any]) -> WorkerView:
    clock = data.get("clock")
    clock_view = None
    if isinstance(clock, dict) and as_int(clock.get("offset_ns")) is not None:
        clock_view = ClockView(as_int(clock.get("offset_ns")) or 0, as_int(clock.get("uncertainty_ns")) or 0,
                               as_float(clock.get("drift_ppm")) or 0.0)
    return WorkerView(str(data.get("name", "?")), str(data.get("host", "?")), str(data.get("state", "?")),
                      as_float(data.get("cpu_percent")), as_int(data.get("cpu_count")),
                      as_int(data.get("memory_total")), as_int(data.get("memory_available")),
                      as_int(data.get("disk_free")), as_float(data.get("last_heartbeat_s")), clock_view)
