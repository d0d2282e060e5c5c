"""Clocks: local monotonic time mapped onto the cluster timeline (the manager's monotonic clock)."""

from __future__ import annotations

import time
from dataclasses import dataclass

CLOCK_WARN_NS = 1_000_000  # a machine's clock uncertainty above this (1 ms) is a warning in summaries


@dataclass(frozen=True)
class ClockMapping:
    """Maps this machine's monotonic clock onto cluster time.

    cluster = local + offset_ns + drift_ppb * (local - ref_ns) / 1e9: an offset measured at local time
    `ref_ns`, and how many nanoseconds per second the cluster clock runs ahead of this one (drift).
    """

    offset_ns: int = 0
    uncertainty_ns: int = 0
    drift_ppb: float = 0.0
    ref_ns: int = 0

    def to_cluster_ns(self, local_ns: int) -> int:
        return local_ns + self.offset_ns + round(self.drift_ppb * (local_ns - self.ref_ns) / 1e9)

    def to_local_ns(self, cluster_ns: int) -> int:
        """The inverse, to a nanosecond."""
        since_ref = cluster_ns - self.offset_ns - self.ref_ns  # (local - ref) * (1 + drift)
        drift = self.drift_ppb / 1e9
        return self.ref_ns + since_ref - round(since_ref * drift / (1 + drift))

    def to_dict(self) -> dict[str, float | int]:
        return {"offset_ns": self.offset_ns, "uncertainty_ns": self.uncertainty_ns, "drift_ppb": self.drift_ppb,
                "ref_ns": self.ref_ns}

    @classmethod
    def from_dict(cls, data: dict[str, float | int]) -> ClockMapping:
        """Raises KeyError, TypeError or ValueError when `data` is not a mapping."""
        return cls(int(data["offset_ns"]), int(data["uncertainty_ns"]), float(data.get("drift_ppb", 0.0)),
                   int(data.get("ref_ns", 0)))


class Clock:
    """The cluster clock as seen from one process; `now_ns()` is cluster time in nanoseconds.

    Every timestamp comes from `time.monotonic_ns()`, never the wall clock, so an NTP step
    or a changed system time cannot bend the timeline.
    """

    def __init__(self, mapping: ClockMapping | None = None) -> None:
        self._mapping = mapping or ClockMapping()

    @property
    def mapping(self) -> ClockMapping:
        return self._mapping

    def update(self, mapping: ClockMapping) -> None:
        """Adopt a newer estimate of the offset to cluster time."""
        self._mapping = mapping

    def now_ns(self) -> int:
        """Cluster time now."""
        return self._mapping.to_cluster_ns(time.monotonic_ns())

    def local_ns(self) -> int:
        """This machine's raw monotonic time, kept beside cluster time for re-alignment."""
        return time.monotonic_ns()

    def to_cluster_ns(self, local_ns: int) -> int:
        """Convert a local monotonic timestamp (e.g. a device's capture time) to cluster time."""
        return self._mapping.to_cluster_ns(local_ns)
