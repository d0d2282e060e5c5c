"""What a host runs: the plan of one node, and what is known of it while it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from cpcli.runtime.stats import NodeStats


class NodeState(str, Enum):
    STARTING = "starting"  # process spawned, not yet built
    BOUND = "bound"  # built, publisher bound, setting up
    READY = "ready"  # set up and wired; waiting for the session to start
    RUNNING = "running"
    STOPPING = "stopping"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class NodePlan:
    """What one host needs to run one node of a recipe."""

    id: str
    type: str
    entry_point: str  # "module:Class" of the node type installed here
    params: dict[str, Any]
    record: bool
    sync: str
    tolerance_ms: float
    inputs: tuple[tuple[str, str, str], ...]  # (key, upstream node id, upstream port)
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class NodeStatus:
    """What the supervisor knows of one node, for progress displays and the manifest."""

    id: str
    type: str
    state: NodeState
    pid: int | None = None
    stats: NodeStats = field(default_factory=NodeStats)
    files: tuple[dict[str, Any], ...] = ()
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    worker: str = ""  # where it runs (a cluster session spans workers)
