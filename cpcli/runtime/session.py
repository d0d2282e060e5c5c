"""One recording session on this machine: plan, start, watch, stop, and write the manifest."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cpcli import __version__
from cpcli.archive.files import file_record
from cpcli.archive.manifest import read_node_record, write_manifest
from cpcli.archive.session import EventLog, create_session_dir, default_session_name, utc_stamp
from cpcli.clock import Clock
from cpcli.errors import PeerLostError
from cpcli.recipe import Recipe
from cpcli.registry import Registry
from cpcli.runtime import marks
from cpcli.runtime.disk import DEFAULT_MIN_FREE, DiskGuard
from cpcli.runtime.plan import NodePlan, NodeState, NodeStatus
from cpcli.runtime.supervisor import Supervisor
from cpcli.runtime.timing import Timing
from cpcli.units import Size

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
    min_free: Size = DEFAULT_MIN_FREE  # recording stops cleanly when the disk has less free space
    # A cluster session's node data between machines: Curve-encrypted, or (False) PLAIN, members only but
    # readable on the wire. A session on one machine has no keys: its publishers bind loopback only.
    encrypt_data: bool = True


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
    error: str | None = None  # the session itself failed (e.g. the disk filled), not one node


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
    """Run a recipe on this machine until `duration_s`, a stop request, a node failure or a full disk.

    Every exit path stops every node process and writes the manifest of what was recorded.
    """
    return _LocalSession(recipe, registry, options, stop, on_progress).run()


class _LocalSession:
    """The phases of one session: start, wait for ready, record, stop, write the manifest."""

    def __init__(self, recipe: Recipe, registry: Registry, options: RunOptions, stop: StopControl,
                 on_progress: Callable[[Progress], None] | None) -> None:
        self.recipe, self.options, self.stop_control = recipe, options, stop
        self._on_progress = on_progress
        self._disk = DiskGuard(options.out_dir, options.min_free)
        self._disk.check_before_start()
        self.started_utc = datetime.now(timezone.utc)
        name = options.session_name or default_session_name(recipe.name, self.started_utc)
        self.dir = create_session_dir(options.out_dir, name, exact=options.session_name is not None)
        (self.dir / "recipe.yaml").write_text(recipe.text, encoding="utf-8")
        self.worker = options.worker or local_worker_name()
        self.clock = Clock()
        self.events = EventLog(self.dir / "events.jsonl")
        self.supervisor = Supervisor(plan_nodes(recipe, registry), self.dir, self.worker, options.timing,
                                     logger=logging.getLogger("cpcli.session"),
                                     shared_memory=options.shared_memory,
                                     shm_threshold_bytes=options.shm_threshold_bytes,
                                     data_security=None)  # one machine: loopback only, no keys needed
        self.start_ns = self.clock.now_ns()
        self.stop_ns: int | None = None
        self.began = False
        self.error: str | None = None  # a failure of the session itself (not of one node)
        self._next_progress = 0.0
        self._marks: Path | None = None

    def run(self) -> SessionResult:
        try:
            self.supervisor.start()
            self.events.write(0, "session_starting", session=self.dir.name, worker=self.worker)
            if self._await_ready():
                self._record()
            self.stop_ns = self.clock.now_ns()
            self._log_failures()
            self.supervisor.stop()
            self._report("stopping")
            self._drain()
        finally:
            manifest = self._finalize()
        self._report("finished")
        return SessionResult(self.dir, manifest, self.supervisor.nodes, self.supervisor.failures,
                             interrupted=self.stop_control.requested.is_set(),
                             duration_s=manifest["duration_ns"] / 1e9, logs_dir=self.supervisor.logs_dir,
                             error=self.error)

    def _await_ready(self) -> bool:
        deadline = time.monotonic() + self.options.timing.ready_timeout_s
        while not self.supervisor.all_ready:
            if self.stop_control.requested.is_set() or self.supervisor.failures:
                return False
            if time.monotonic() > deadline:
                late = ", ".join(self.supervisor.not_ready())
                raise PeerLostError(f"nodes not ready after {self.options.timing.ready_timeout_s:.0f} s: {late}",
                                    hint=f"see the node logs in {self.supervisor.logs_dir}")
            self.supervisor.poll(RUN_POLL_MS)
            self._report("starting", every=PROGRESS_INTERVAL_S)
        return True

    def _record(self) -> None:
        self.start_ns, self.started_utc = self.clock.now_ns(), datetime.now(timezone.utc)
        self.began = True
        self.supervisor.begin(self.start_ns)
        self.events.write(0, "session_started", start_utc=utc_stamp(self.started_utc))
        self._marks = marks.announce(self.dir.name, self.events.path, self.start_ns)  # cp mark finds us here
        deadline = None if self.options.duration_s is None else time.monotonic() + self.options.duration_s
        while not self.stop_control.requested.is_set() and not self.supervisor.failures:
            if self.supervisor.all_finished or (deadline is not None and time.monotonic() >= deadline):
                return
            self.error = self._disk.check()
            if self.error:
                return
            self.supervisor.poll(RUN_POLL_MS)
            self._report("running", every=PROGRESS_INTERVAL_S)

    def _log_failures(self) -> None:
        t_ns = (self.stop_ns or self.start_ns) - self.start_ns
        for node_id, message in self.supervisor.failures.items():
            self.events.write(t_ns, "node_failed", node=node_id, error=message)
        if self.error:
            self.events.write(t_ns, "session_failed", error=self.error)

    def _drain(self) -> None:
        """Wait for nodes to drain and close their files; a second Ctrl-C cuts it short."""
        timing = self.options.timing
        deadline = time.monotonic() + timing.drain_timeout_s + timing.exit_timeout_s
        while not self.supervisor.all_finished and time.monotonic() < deadline:
            if self.stop_control.forced.is_set():
                return
            self.supervisor.poll(RUN_POLL_MS)

    def _finalize(self) -> dict[str, Any]:
        if self._marks is not None:
            marks.forget(self._marks)
        forced = self.supervisor.close()
        end_ns = self.clock.now_ns()
        for node_id in forced:
            self.events.write(end_ns - self.start_ns, "node_terminated", node=node_id)
        self.events.write(end_ns - self.start_ns, "session_stopped", recorded=self.began)
        self.events.close()
        duration_ns = max(0, (self.stop_ns or end_ns) - self.start_ns) if self.began else 0
        manifest = _manifest(self.recipe, self.dir, self.worker, self.supervisor.nodes, self.started_utc,
                             duration_ns, self.start_ns, self.supervisor.logs_dir)
        if self.error:
            manifest["status"], manifest["error"] = "failed", self.error
        write_manifest(self.dir, manifest)
        return manifest

    def _report(self, phase: str, every: float = 0.0) -> None:
        if self._on_progress is None or time.monotonic() < self._next_progress:
            return
        self._next_progress = time.monotonic() + every
        elapsed = (self.clock.now_ns() - self.start_ns) / 1e9 if self.began else 0.0
        self._on_progress(Progress(self.dir, phase, elapsed, self.supervisor.nodes))


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
                                 "files": files, "state": node.state.value, "info": dict(node.info)}
        if node.error:
            entry["error"] = node.error
        manifest["nodes"][spec.id] = entry
    extras = [(session_dir / "recipe.yaml", "recipe"), (session_dir / "events.jsonl", "events")]
    extras += [(p, "log") for p in sorted(logs_dir.glob("*.log"))]
    for path, kind in extras:
        if path.exists():
            manifest["files"].append(asdict(file_record(path, path.relative_to(session_dir).as_posix(), kind)))
    if any(s.state == NodeState.FAILED for s in nodes.values()):
        manifest["status"] = "failed"
    return manifest
