"""Per-node statistics: what a node reports while it runs and what the manifest keeps."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

LATENCY_WINDOW = 4096  # latest latencies kept for the percentiles: recent behaviour, bounded memory


@dataclass(frozen=True)
class NodeStats:
    """A snapshot of one node's counters (the manifest's `stats`, plus live-only fields)."""

    samples_out: int = 0
    samples_in: dict[str, int] = field(default_factory=dict)
    dropped_in: dict[str, int] = field(default_factory=dict)
    skipped_in: dict[str, int] = field(default_factory=dict)
    rate_hz: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=lambda: {"p50": 0.0, "p99": 0.0})
    record_backlog: int = 0
    record_dropped: int = 0
    record_bytes: int = 0
    dropped_out: int = 0  # samples the node could not hand to same-host readers (pool full)
    source_lost: int = 0  # samples the node itself lost (its `info["lost"]`: device overflows, full queues)
    first_in_ns: int | None = None  # session time of the first sample received (start-up latency)
    first_out_ns: int | None = None  # session time of the first sample sent
    sent_in_place: int = 0  # samples same-host readers read where the node built them (lent or constant): no copy

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples_out": self.samples_out,
            "samples_in": dict(self.samples_in),
            "dropped_in": dict(self.dropped_in),
            "skipped_in": dict(self.skipped_in),
            "rate_hz": round(self.rate_hz, 3),
            "latency_ms": dict(self.latency_ms),
            "record_backlog": self.record_backlog,
            "record_dropped": self.record_dropped,
            "record_bytes": self.record_bytes,
            "dropped_out": self.dropped_out,
            "source_lost": self.source_lost,
            "first_in_ns": self.first_in_ns,
            "first_out_ns": self.first_out_ns,
            "sent_in_place": self.sent_in_place,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeStats:
        def counts(key: str) -> dict[str, int]:
            value = data.get(key) or {}
            return {str(k): int(v) for k, v in value.items()} if isinstance(value, dict) else {}

        latency = data.get("latency_ms") or {}
        return cls(
            samples_out=int(data.get("samples_out", 0)),
            samples_in=counts("samples_in"),
            dropped_in=counts("dropped_in"),
            skipped_in=counts("skipped_in"),
            rate_hz=float(data.get("rate_hz", 0.0)),
            latency_ms={"p50": float(latency.get("p50", 0.0)), "p99": float(latency.get("p99", 0.0))},
            record_backlog=int(data.get("record_backlog", 0)),
            record_dropped=int(data.get("record_dropped", 0)),
            record_bytes=int(data.get("record_bytes", 0)),
            dropped_out=int(data.get("dropped_out", 0)),
            source_lost=int(data.get("source_lost", 0)),
            first_in_ns=None if data.get("first_in_ns") is None else int(data["first_in_ns"]),
            first_out_ns=None if data.get("first_out_ns") is None else int(data["first_out_ns"]),
            sent_in_place=int(data.get("sent_in_place", 0)),
        )

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped_in.values()) + self.record_dropped + self.dropped_out + self.source_lost


class RateMeter:
    """Counts output steps and their rate over the node's active time."""

    def __init__(self) -> None:
        self.count = 0
        self._first_ns = 0
        self._last_ns = 0

    def tick(self, now_ns: int) -> None:
        if self.count == 0:
            self._first_ns = now_ns
        self._last_ns = now_ns
        self.count += 1

    @property
    def rate_hz(self) -> float:
        span = self._last_ns - self._first_ns
        return (self.count - 1) * 1e9 / span if self.count > 1 and span > 0 else 0.0


class LatencyMeter:
    """Capture-to-step latency over a bounded window of recent samples."""

    def __init__(self, window: int = LATENCY_WINDOW) -> None:
        self._values: deque[int] = deque(maxlen=window)

    def add(self, latency_ns: int) -> None:
        self._values.append(latency_ns)

    def percentiles_ms(self) -> dict[str, float]:
        if not self._values:
            return {"p50": 0.0, "p99": 0.0}
        import numpy as np  # node processes have it loaded; the control plane never gets here

        # np.percentile's linear interpolation on a sorted copy: np.percentile itself costs several
        # times more per call and loads numpy.ma (0.1 CPU s) the first time, in every node process.
        ordered = np.sort(np.fromiter(self._values, dtype=np.int64))
        return {"p50": round(_quantile(ordered, 0.50) / 1e6, 3), "p99": round(_quantile(ordered, 0.99) / 1e6, 3)}


def _quantile(ordered: Any, q: float) -> float:
    """The `q` quantile of sorted values, interpolated linearly as np.percentile does by default."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low]) + (float(ordered[high]) - float(ordered[low])) * (position - low)
