"""Every timing number of the runtime in one place, so tests can shrink them by argument."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Timing:
    """Deadlines and intervals (seconds) of the node runtime."""

    stats_interval_s: float = 0.5  # how often a node reports statistics (live progress)
    ready_timeout_s: float = 30.0  # start-up of every node (imports, devices) before we give up
    drain_timeout_s: float = 2.0  # after STOP, how long downstream nodes may drain their inputs
    exit_timeout_s: float = 5.0  # after that, how long a node may take to close files and exit
    parent_check_s: float = 0.25  # how often a node checks that its supervisor is alive
    flush_interval_s: float = 1.0  # recordings reach the disk at least this often

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Timing:
        known = {f.name for f in fields(cls)}
        return cls(**{k: float(v) for k, v in data.items() if k in known})
