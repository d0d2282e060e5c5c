"""One recording session on this machine: plan, start, watch, stop, and write the manifest."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cpcli import __version__
from cpcli.archive.manifest import read_node_record, write_manifest
from cpcli.archive.session import EventLog, create_session_dir, default_session_name, file_record, utc_stamp
from cpcli.clock import Clock
from cpcli.errors import CpError, PeerLostError
from cpcli.recipe import Recipe
from cpcli.registry import Registry
from cpcli.runtime.supervisor import NodePlan, NodeState, NodeStatus, Supervisor
from cpcli.runtime.timing import Timing

PROGRESS_INTERVAL_S = 0.25  # how often the caller's progress callback runs
RUN_POLL_MS = 50  # the session loop's longest sleep: bounds reaction to Ctrl-C and failures


@dataclass
class StopControl:
    """How a caller ends a session: `requested` stops it in order, `forced` cuts the drain short."""

    requested: threading.Event = field(default_factory=threading.Event)
    forced: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class RunOptions:
    out_dir: Path = Path("sessions")
    session_name: str | None = None
    duration_s: float | None = None
    timing: Timing = field(default_factory=Timing)
    worker: str | None = None
    shared_memory: bool = True  # same-host payloads through shared memory (False: TCP for all)
    shm_threshold_bytes: int = 0  # arrays at least this large use shared memory; 0 = the default


@dataclass(frozen=True)
class Progress:
    """A live view of the session for progress displays."""

    session_dir: Path
    phase: str  # starting | running | stopping | finished
    elapsed_s: float
    nodes: dict[str, NodeStatus]


@dataclass(frozen=True)
class SessionResult:
    session_dir: Path
    manifest: dict[str, Any]
    nodes: dict[str, NodeStatus]
    failures: dict[str, str]
    interrupted: bool
    duration_s: float
    logs_dir: Path


def local_worker_name() -> str:
    """This machine's worker name: its host name, made safe as a folder name."""
    name = re.sub(r"[^a-z0-9_.-]+", "-", socket.gethostname().lower()).strip("-.")
    return name or "local"


def plan_nodes(recipe: Recipe, registry: Registry) -> list[NodePlan]:
    """Turn a validated recipe into what the supervisor runs."""
    plans = []
    for spec in recipe.nodes:
        node_type = registry.types[spec.type]
        inputs = tuple((e.key, e.source, e.port) for e in recipe.edges if e.target == spec.id)
        plans.append(NodePlan(
            id=spec.id, type=spec.type, entry_point=node_type.origin, params=dict(spec.params),
            record=spec.record, sync=spec.sync, tolerance_ms=spec.tolerance_ms,
            inputs=inputs, outputs=node_type.outputs,
        ))
    return plans


def run_session(recipe: Recipe, registry: Registry, options: RunOptions, stop: StopControl,
                on_progress: Callable[[Progress], None] | None = None) -> SessionResult:
    """Run a recipe on this machine until `duration_s`, a stop request, or a node failure.

    Every exit path stops every node process and writes the manifest of what was recorded.
    """
    now = datetime.now(timezone.utc)
    name = options.session_name or default_session_name(recipe.name, now)
    session_dir = create_session_dir(options.out_dir, name, exact=options.session_name is not None)
    (session_dir / "recipe.yaml").write_text(recipe.text, encoding="utf-8")
    worker = options.worker or local_worker_name()
    clock = Clock()
    log = logging.getLogger("cpcli.session")
    events = EventLog(session_dir / "events.jsonl")
    supervisor = Supervisor(plan_nodes(recipe, registry), session_dir, worker, options.timing, logger=log,
                            shared_memory=options.shared_memory, shm_threshold_bytes=options.shm_threshold_bytes)
    start_ns = clock.now_ns()
    start_utc = now
    stop_ns: int | None = None
    began = False
    launched = time.monotonic()

    def report(phase: str) -> None:
        if on_progress is not None:
            elapsed = (clock.now_ns() - start_ns) / 1e9 if began else 0.0
            on_progress(Progress(session_dir, phase, elapsed, supervisor.nodes))

    try:
        supervisor.start()
        events.write(0, "session_starting", session=name, worker=worker)
        next_progress = 0.0
        ready_deadline = launched + options.timing.ready_timeout_s
        while not supervisor.all_ready and not stop.requested.is_set() and not supervisor.failures:
            if time.monotonic() > ready_deadline:
                late = ", ".join(supervisor.not_ready())
                raise PeerLostError(
                    f"nodes not ready after {options.timing.ready_timeout_s:.0f} s: {late}",
                    hint=f"see the node logs in {supervisor.logs_dir}")
            supervisor.poll(RUN_POLL_MS)
            if time.monotonic() >= next_progress:
                next_progress = time.monotonic() + PROGRESS_INTERVAL_S
                report("starting")
        if supervisor.all_ready and not stop.requested.is_set():
            start_ns, start_utc = clock.now_ns(), datetime.now(timezone.utc)
            began = True
            supervisor.begin(start_ns)
            events.write(0, "session_started", start_utc=utc_stamp(start_utc))
            deadline = None if options.duration_s is None else time.monotonic() + options.duration_s
            while not stop.requested.is_set() and not supervisor.failures and not supervisor.all_finished:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                supervisor.poll(RUN_POLL_MS)
                if time.monotonic() >= next_progress:
                    next_progress = time.monotonic() + PROGRESS_INTERVAL_S
                    report("running")
        stop_ns = clock.now_ns()
        for node_id, message in supervisor.failures.items():
            events.write(stop_ns - start_ns, "node_failed", node=node_id, error=message)
        supervisor.stop()
        report("stopping")
        _drain(supervisor, options.timing, stop)
    finally:
        forced = supervisor.close()
        end_ns = clock.now_ns()
        duration_ns = max(0, (stop_ns or end_ns) - start_ns) if began else 0
        for node_id in forced:
            events.write(end_ns - start_ns, "node_terminated", node=node_id)
        events.write(end_ns - start_ns, "session_stopped", recorded=began)
        events.close()
        manifest = _manifest(recipe, session_dir, worker, supervisor.nodes, start_utc, duration_ns,
                             start_ns, supervisor.logs_dir)
        write_manifest(session_dir, manifest)
    report("finished")
    return SessionResult(session_dir, manifest, supervisor.nodes, supervisor.failures,
                         interrupted=stop.requested.is_set(), duration_s=duration_ns / 1e9,
                         logs_dir=supervisor.logs_dir)


def _drain(supervisor: Supervisor, timing: Timing, stop: StopControl) -> None:
    """Wait for nodes to drain and close their files; a second Ctrl-C cuts it short."""
    deadline = time.monotonic() + timing.drain_timeout_s + timing.exit_timeout_s
    while not supervisor.all_finished and time.monotonic() < deadline and not stop.forced.is_set():
        supervisor.poll(RUN_POLL_MS)


def _manifest(recipe: Recipe, session_dir: Path, worker: str, nodes: dict[str, NodeStatus],
              start_utc: datetime, duration_ns: int, start_ns: int, logs_dir: Path) -> dict[str, Any]:
    status = "failed" if any(s.error for s in nodes.values()) else "complete"
    manifest: dict[str, Any] = {
        "session": session_dir.name,
        "recipe": recipe.name,
        "start_utc": utc_stamp(start_utc),
        "duration_ns": duration_ns,
        "cpcli_version": __version__,
        "status": status,
        "clock": {"start_cluster_ns": start_ns, "source": worker},
        "workers": {worker: {"host": socket.gethostname(), "clock": {"offset_ns": 0, "uncertainty_ns": 0}}},
        "nodes": {},
        "files": [],
    }
    for spec in recipe.nodes:
        node = nodes[spec.id]
        files = list(node.files)
        stats = node.stats.to_dict()
        if spec.record and not files:  # the process died before reporting: trust its own record
            own = read_node_record(session_dir, worker, spec.id)
            if own is not None:
                files, stats = list(own.get("files", [])), own.get("stats", stats)
        entry: dict[str, Any] = {"type": spec.type, "worker": worker, "params": dict(spec.params),
                                 "record": spec.record, "inputs": list(spec.inputs), "stats": stats,
                                 "files": files, "state": node.state.value}
        if node.error:
            entry["error"] = node.error
        manifest["nodes"][spec.id] = entry
    extras = [(session_dir / "recipe.yaml", "recipe"), (session_dir / "events.jsonl", "events")]
    extras += [(p, "log") for p in sorted(logs_dir.glob("*.log"))]
    for path, kind in extras:
        if path.exists():
            try:
                manifest["files"].append(file_record(session_dir, path, kind))
            except OSError as err:
                raise CpError(f"cannot read {path} for the manifest ({err.strerror})") from err
    if any(s.state == NodeState.FAILED for s in nodes.values()):
        manifest["status"] = "failed"
    return manifest
