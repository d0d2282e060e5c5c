"""Clocks: local monotonic time mapped onto the cluster timeline."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ClockMapping:
    """Maps this machine's monotonic clock onto cluster time: cluster = local + offset_ns."""

    offset_ns: int = 0
    uncertainty_ns: int = 0


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
        return time.monotonic_ns() + self._mapping.offset_ns

    def local_ns(self) -> int:
        """This machine's raw monotonic time, kept beside cluster time for re-alignment."""
        return time.monotonic_ns()

    def to_cluster_ns(self, local_ns: int) -> int:
        """Convert a local monotonic timestamp (e.g. a device's capture time) to cluster time."""
        return local_ns + self._mapping.offset_ns
