"""The `cp inspect` report: findings, file checks, per-stream timing, drops and media, the session verdict."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any


class Severity(str, Enum):
    """A problem makes `cp inspect` exit 1; a warning is worth reading but the data is whole."""

    PROBLEM = "problem"
    WARNING = "warning"


@dataclass(frozen=True)
class Finding:
    """One thing wrong or worth knowing: what, and where (a stream `node.port`, a node or a file)."""

    severity: Severity
    where: str
    what: str

    @property
    def line(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass(frozen=True)
class FileCheck:
    """One file against its record: status ok, missing, size mismatch, hash mismatch, unlisted or unverified."""

    path: str
    kind: str
    status: str
    bytes: int | None
    expected_bytes: int | None


@dataclass(frozen=True)
class Gaps:
    """Intervals over GAP_PERIODS (streamcheck.py) median intervals; the longest, and when it began (session time)."""

    count: int = 0
    longest_ms: float = 0.0
    longest_at_s: float | None = None


@dataclass(frozen=True)
class Drops:
    """A node's losses: inputs lost in transport, recorder queue full, shared memory full (its stats),
    and what its device lost (`blocks_dropped`/`frames_dropped` in the info a node reports)."""

    dropped_in: int = 0
    record_dropped: int = 0
    dropped_out: int = 0
    device_dropped: int = 0

    @property
    def total(self) -> int:
        return self.dropped_in + self.record_dropped + self.dropped_out + self.device_dropped


@dataclass(frozen=True)
class AudioCheck:
    """What the WAV segments hold against the timestamps, and how much of it is clipped."""

    samplerate_hz: int | None
    channels: int | None
    sample_format: str
    frames_wav: int
    frames_timestamps: int
    clipped_samples: int
    clipped_share: float


@dataclass(frozen=True)
class VideoCheck:
    """Frames in the MP4 segments (decoded, or counted from headers past the budget) against timestamp rows."""

    segments: int
    frames_decoded: int
    frames_from_headers: int
    timestamp_rows: int


@dataclass(frozen=True)
class StreamReport:
    """One recorded port of one node: its timing, losses, files and media checks."""

    name: str
    worker: str
    node: str
    port: str
    kind: str
    samples: int
    first_t_ns: int | None
    last_t_ns: int | None
    duration_s: float
    rate_hz: float | None
    nominal_rate_hz: float | None
    nominal_from: str
    gaps: Gaps
    drops: Drops
    jitter_p99_ms: float | None
    index_missing: int
    non_monotonic: int
    files: tuple[FileCheck, ...]
    audio: AudioCheck | None = None
    video: VideoCheck | None = None
    notes: tuple[str, ...] = ()

    @property
    def files_ok(self) -> int:
        return sum(f.status == "ok" for f in self.files)


@dataclass(frozen=True)
class SessionReport:
    """The whole report: session facts, every stream, the session's own files, and the findings."""

    path: str
    session: str
    recipe: str | None
    start_utc: str | None
    duration_s: float | None
    status: str
    has_manifest: bool
    streams: tuple[StreamReport, ...]
    session_files: tuple[FileCheck, ...]
    findings: tuple[Finding, ...]

    @property
    def problems(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity is Severity.PROBLEM)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity is Severity.WARNING)

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["findings"] = [{"severity": f.severity.value, "where": f.where, "what": f.what} for f in self.findings]
        data["problems"] = [f.line for f in self.problems]
        data["warnings"] = [f.line for f in self.warnings]
        data["exit_code"] = self.exit_code
        return data


class Findings:
    """The findings of one inspection, in the order the checks make them."""

    def __init__(self) -> None:
        self.items: list[Finding] = []

    def problem(self, where: str, what: str) -> None:
        self.items.append(Finding(Severity.PROBLEM, where, what))

    def warning(self, where: str, what: str) -> None:
        self.items.append(Finding(Severity.WARNING, where, what))

    @property
    def problem_count(self) -> int:
        return sum(f.severity is Severity.PROBLEM for f in self.items)
