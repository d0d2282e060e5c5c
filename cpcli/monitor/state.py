"""What `cp monitor` shows, as plain data: frozen snapshots of the cluster that the view renders."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Severity = Literal["info", "mark", "warn", "error"]

CLOCK_WARN_NS = 1_000_000  # a worker clock less certain than 1 ms (as the manifest's warning)
PREVIEW_STALE_S = 3.0  # a preview older than this (previews come twice a second) is shown as stale
DISK_LOW_BYTES = 2 * 1024**3  # free disk below this is shown in red


@dataclass(frozen=True)
class TypeInfo:
    """What the monitor knows of a node type installed here: its output ports, its parameter defaults."""

    outputs: tuple[str, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Problem:
    text: str
    severity: Severity = "warn"


@dataclass(frozen=True)
class ClockView:
    offset_ns: int
    uncertainty_ns: int
    drift_ppm: float


@dataclass(frozen=True)
class WorkerView:
    name: str
    host: str
    state: str  # ready | running | lost
    cpu_percent: float | None = None
    cpu_count: int | None = None
    memory_total: int | None = None
    memory_available: int | None = None
    disk_free: int | None = None
    heartbeat_s: float | None = None
    clock: ClockView | None = None


@dataclass(frozen=True)
class NodeView:
    id: str
    type: str
    worker: str
    state: str
    samples_out: int = 0
    rate_hz: float | None = None  # current output rate; None before it is known
    nominal_hz: float | None = None
    samples_in: Mapping[str, int] = field(default_factory=dict)
    dropped_in: Mapping[str, int] = field(default_factory=dict)
    latency_ms: tuple[float, float] | None = None  # p50, p99; None for a source
    record_backlog: int = 0
    record_bytes: int = 0
    record_dropped: int = 0
    dropped_out: int = 0
    source_lost: int = 0
    error: str | None = None
    problems: tuple[Problem, ...] = ()
    outputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class EventView:
    t_s: float  # session time
    text: str
    severity: Severity = "info"


@dataclass(frozen=True)
class FramePreview:
    rgb: np.ndarray  # H x W x 3 uint8, red-green-blue


@dataclass(frozen=True)
class LevelPreview:
    rms_db: tuple[float, ...]
    peak_db: tuple[float, ...]  # held for HOLD_S
    clipped: bool  # within the last CLIP_SHOW_S


@dataclass(frozen=True)
class ValuesPreview:
    values: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class EventsPreview:
    values: tuple[Any, ...]  # oldest first


PreviewContent = FramePreview | LevelPreview | ValuesPreview | EventsPreview


@dataclass(frozen=True)
class PortPreview:
    node: str
    port: str
    content: PreviewContent
    age_s: float

    @property
    def stale(self) -> bool:
        return self.age_s > PREVIEW_STALE_S


@dataclass(frozen=True)
class ManagerView:
    name: str
    cluster: str
    address: str
    version: str
    uptime_s: float


@dataclass(frozen=True)
class DiskView:
    """The worker of the session whose disk fills first."""

    worker: str
    free_bytes: int
    time_left_s: float | None  # at the current recording rate of that worker


@dataclass(frozen=True)
class SessionView:
    name: str
    phase: str
    elapsed_s: float
    lost: tuple[str, ...] = ()
    recorded_bytes: int = 0
    record_rate_bps: float | None = None
    disk: DiskView | None = None


@dataclass(frozen=True)
class UiState:
    """What the person at the terminal chose: the selected node, previews on or off, a mark being typed."""

    selected: str | None = None
    previews_on: bool = True
    prompt: str | None = None  # the mark's label so far, while typing it
    message: str | None = None
    message_error: bool = False


@dataclass(frozen=True)
class Snapshot:
    manager: ManagerView | None = None
    workers: tuple[WorkerView, ...] = ()
    session: SessionView | None = None
    nodes: tuple[NodeView, ...] = ()
    events: tuple[EventView, ...] = ()
    previews: tuple[PortPreview, ...] = ()
    notice: str | None = None  # e.g. the manager is unreachable
    ui: UiState = field(default_factory=UiState)
