"""Every timing number of the cluster in one object, passed in, so tests can shrink them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from cpcli.errors import CpError


@dataclass(frozen=True)
class ClusterTiming:
    """Intervals and deadlines (seconds) of the control plane between manager, workers and clients."""

    beat_s: float = 0.75  # heartbeat interval, both ways
    missed_beats: int = 3  # a peer silent for this many beats is lost (2.25 s with the defaults)
    register_timeout_s: float = 2.0  # a worker waits this long for WELCOME before trying again
    backoff_min_s: float = 0.25  # first reconnect delay after the manager was lost, doubled each try
    backoff_max_s: float = 4.0  # ... up to this
    discovery_s: float = 3.0  # one mDNS search for the manager
    answer_timeout_s: float = 5.0  # a client waits this long for the manager to answer a request
    progress_s: float = 0.25  # how often the manager sends progress to the `cp run` client
    reattach_s: float = 20.0  # a manager back mid-session waits this long for its `cp run` to reattach
    finish_margin_s: float = 5.0  # after the workers' own drain and exit deadlines, before giving up on them

    @property
    def lost_after_s(self) -> float:
        return self.beat_s * self.missed_beats

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterTiming:
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {k: (int(v) if k == "missed_beats" else float(v))
                                  for k, v in data.items() if k in known}
        return cls(**values)

    @classmethod
    def from_env(cls, value: str | None) -> ClusterTiming:
        """The `CP_CLUSTER_TIMING` override, JSON like `{"beat_s": 0.2}` (tests and benchmarks)."""
        if not value:
            return cls()
        try:
            data = json.loads(value)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise CpError(f"CP_CLUSTER_TIMING is not valid ({err}): {value[:80]}",
                          hint='set it to JSON like {"beat_s": 0.5}, or unset it') from err
