"""Who subscribes to whom: the CONNECT message of every node, from where each publisher is bound.

One function for both cases: a session on one machine (every node on one worker) and a session
spread over a cluster (the manager knows every worker's endpoints). Edges between nodes of the same
worker go through the publisher's shared memory when it has a pool; edges between workers over TCP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cpcli.runtime.plan import NodePlan
from cpcli.transport.protocol import topic_for


@dataclass(frozen=True)
class Bound:
    """Where a node's publisher listens, on which worker, and its shared-memory prefix (None: none)."""

    worker: str
    endpoint: str
    shm_prefix: str | None = None


def wiring(plans: Mapping[str, NodePlan], bound: Mapping[str, Bound]) -> dict[str, dict[str, Any]]:
    """The CONNECT body of every node: its inputs (endpoint, topic, shared memory) and its subscribers."""
    subscribers: dict[str, dict[str, int]] = {n: {} for n in plans}
    all_readers: dict[str, list[tuple[int, str]]] = {n: [] for n in plans}  # (reader index, port read)
    local_readers = dict.fromkeys(plans, 0)
    inputs: dict[str, list[dict[str, Any]]] = {n: [] for n in plans}
    for plan in plans.values():
        for key, source, port in plan.inputs:
            subscribers[source][port] = subscribers[source].get(port, 0) + 1
            upstream = bound[source]
            edge: dict[str, Any] = {"key": key, "endpoint": upstream.endpoint,
                                    "topic": topic_for(source, port).decode()}
            if upstream.shm_prefix and upstream.worker == bound[plan.id].worker:
                local_readers[source] += 1  # same machine: large payloads through shared memory
                reader = None
                if plan.sync == "all":  # never reclaim what this reader has not read: backpressure
                    reader = len(all_readers[source])
                    all_readers[source].append((reader, port))
                edge["shm"] = {"prefix": upstream.shm_prefix, "reader": reader}
            inputs[plan.id].append(edge)
    bodies: dict[str, dict[str, Any]] = {}
    for plan in plans.values():
        body: dict[str, Any] = {"inputs": inputs[plan.id], "subscribers": subscribers[plan.id]}
        if bound[plan.id].shm_prefix and local_readers[plan.id]:
            body["shared_memory"] = {"local_readers": local_readers[plan.id], "all_readers": all_readers[plan.id]}
        bodies[plan.id] = body
    return bodies
