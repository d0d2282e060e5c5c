"""What a host runs: the plan of one node, and what is known of it while it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from cpcli._recipecheck import ID_PATTERN
from cpcli.runtime.stats import NodeStats


class NodeState(str, Enum):
    STARTING = "starting"  # process spawned, not yet built
    BOUND = "bound"  # built, publisher bound, setting up
    READY = "ready"  # set up and wired; waiting for the session to start
    RUNNING = "running"
    STOPPING = "stopping"
    DONE = "done"
    FAILED = "failed"
    LOST = "lost"  # its worker stopped answering (a cluster session); it may still be recording there


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


def plan_to_dict(plan: NodePlan) -> dict[str, Any]:
    """A plan as plain data for the control plane (the entry point is resolved on the worker)."""
    return {"id": plan.id, "type": plan.type, "params": plan.params, "record": plan.record, "sync": plan.sync,
            "tolerance_ms": plan.tolerance_ms, "inputs": [list(i) for i in plan.inputs],
            "outputs": list(plan.outputs)}


def plan_from_dict(data: dict[str, Any], entry_point: str = "") -> NodePlan:
    """Raises KeyError, TypeError or ValueError when `data` is not a plan.

    Ids become folder names and topics on the machine that runs the node, so one that is not a
    recipe id (`../x`, `/etc`) is refused here, whoever sent it.
    """
    if not all(isinstance(i, (list, tuple)) and len(i) == 3 and all(isinstance(x, str) for x in i)
               for i in data["inputs"]):
        raise TypeError("inputs are not [key, source, port] lists of names")
    inputs = tuple((k, s, p) for k, s, p in data["inputs"])
    if not isinstance(data["params"], dict):
        raise TypeError("params is not a mapping")
    for node_id in (data["id"], *(source for _, source, _ in inputs)):
        if not isinstance(node_id, str) or not ID_PATTERN.fullmatch(node_id):
            raise ValueError(f"{node_id!r} is not a node id")
    return NodePlan(id=str(data["id"]), type=str(data["type"]), entry_point=entry_point, params=dict(data["params"]),
                    record=bool(data["record"]), sync=str(data["sync"]), tolerance_ms=float(data["tolerance_ms"]),
                    inputs=inputs, outputs=tuple(str(o) for o in data["outputs"]))


def status_to_dict(status: NodeStatus) -> dict[str, Any]:
    out: dict[str, Any] = {"id": status.id, "type": status.type, "state": status.state.value,
                           "stats": status.stats.to_dict(), "files": list(status.files), "info": status.info,
                           "worker": status.worker}
    if status.error:
        out["error"] = status.error
    return out


def status_from_dict(data: dict[str, Any]) -> NodeStatus:
    """Raises KeyError, TypeError or ValueError when `data` is not a node status."""
    return NodeStatus(id=str(data["id"]), type=str(data["type"]), state=NodeState(data["state"]),
                      stats=NodeStats.from_dict(dict(data.get("stats") or {})),
                      files=tuple(dict(f) for f in data.get("files") or ()), error=data.get("error"),
                      info=dict(data.get("info") or {}), worker=str(data.get("worker", "")))
