"""The node processes of one host: spawn, wire, start, watch and stop them."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import zmq

from cpcli.clock import ClockMapping
from cpcli.runtime import security
from cpcli.runtime.plan import NodePlan, NodeState, NodeStatus
from cpcli.runtime.stats import NodeStats
from cpcli.runtime.timing import Timing
from cpcli.runtime.wiring import Bound, wiring
from cpcli.runtime.zygote import LaunchRequest, NodeProcess, Zygote, ZygoteError
from cpcli.runtime.zygote import supported as zygote_supported
from cpcli.transport.control import ControlServer
from cpcli.transport.curve import DataSecurity
from cpcli.transport.protocol import BOUND, CLOCK, CONFIG, CONNECT, DONE, ENDED, ERROR, HELLO, READY, START, STATS, STOP


class Supervisor:
    """Owns a host's node processes and the ROUTER they report to; used from one thread."""

    def __init__(self, plans: list[NodePlan], session_dir: Path, worker: str, timing: Timing,
                 host: str = "127.0.0.1", logger: logging.Logger | None = None, *,
                 shared_memory: bool = True, shm_threshold_bytes: int = 0, external_wiring: bool = False,
                 data_security: DataSecurity | None = None, zygote: Zygote | None = None) -> None:
        """`host`: where node publishers listen (this worker's interface in a cluster; node control
        always stays on loopback). `external_wiring`: the nodes' upstreams live on other workers too,
        so the caller wires them (`bound`, then `connect`) instead of this supervisor. `data_security`:
        the session's keys for the node publishers and inputs (a cluster session; None: no keys, for
        a session on one machine whose publishers bind loopback). `zygote`: a running node launcher
        the caller keeps across sessions (None: this supervisor starts its own and ends it)."""
        self._plans = {p.id: p for p in plans}
        self._session_dir = session_dir
        self._worker = worker
        self._timing = timing
        self._host = host
        self._log = logger or logging.getLogger("cpcli.supervisor")
        self._context: zmq.Context[Any] = zmq.Context()
        self._server = ControlServer(self._context, "127.0.0.1", self._log)
        self._zygote = zygote
        self._own_zygote = zygote is None
        self._procs: dict[str, NodeProcess | subprocess.Popen[bytes]] = {}
        self._status = {p.id: NodeStatus(p.id, p.type, NodeState.STARTING) for p in plans}
        self._bound: dict[str, Bound] = {}
        self._external_wiring = external_wiring
        self.ended: list[tuple[str, dict[str, Any]]] = []  # (node, samples sent per port), for the caller
        self._shared_memory = shared_memory
        self._shm_threshold_bytes = shm_threshold_bytes
        self._data_security = data_security
        self._session_tag = hashlib.sha256(str(session_dir).encode()).hexdigest()[:8]
        self._wired = False
        self._clock: ClockMapping | None = None  # this machine onto cluster time (None: the same clock)
        self._configured: set[str] = set()  # nodes that got CONFIG (later clock updates go as CLOCK)
        self._stopped = False
        self._closed = False
        self.logs_dir = session_dir / "logs"

    # -- starting ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start one process per node (forked by the zygote); each connects back for its configuration."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        from cpcli.transport import shm  # numpy with it: only once a session starts, not when a worker joins

        for name in shm.clean_stale_segments():  # left by a session whose processes were killed
            self._log.info("removed stale shared memory %s", name)
        if self._zygote is None and zygote_supported():
            self._zygote = Zygote(self._log).start()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        security.give(env, self._data_security)  # the environment: not ps-visible, not on the control socket
        for node_id in self._plans:
            self._set(node_id, worker=self._worker)
            argv = ("--control", self._server.endpoint, "--node", node_id)
            if self._zygote is None:  # no zygote on this system: a fresh interpreter per node
                with open(self.log_path(node_id), "ab") as log:
                    self._procs[node_id] = subprocess.Popen(
                        [sys.executable, "-m", "cpcli.runtime.driver", *argv, "--parent", str(os.getpid())],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
                self._set(node_id, pid=self._procs[node_id].pid)
                continue
            try:
                self._procs[node_id] = self._zygote.launch(LaunchRequest(node_id, argv, env, self.log_path(node_id)))
            except ZygoteError as err:
                self._set(node_id, state=NodeState.FAILED, error=f"could not start its process ({err})")
                self.stop()

    def log_path(self, node_id: str) -> Path:
        return self.logs_dir / f"{node_id}.log"

    def set_clock(self, mapping: ClockMapping) -> None:
        """Give every node (and every node still to start) a newer mapping of this clock onto cluster time."""
        self._clock = mapping
        for node_id in self._plans:
            if node_id in self._configured and self._alive(node_id):
                self._server.send(node_id, CLOCK, mapping.to_dict())

    def begin(self, start_ns: int) -> None:
        """Start the session: every node gets the start time; sources begin stepping."""
        for node_id in self._plans:
            if self._status[node_id].state == NodeState.READY:
                self._server.send(node_id, START, {"start_ns": start_ns})
                self._set(node_id, state=NodeState.RUNNING)

    def stop(self) -> None:
        """Sources stop now; the others drain what upstream sent, close their files and exit."""
        if self._stopped:
            return
        self._stopped = True
        for node_id, status in self._status.items():
            if status.state not in (NodeState.DONE, NodeState.FAILED) or self._alive(node_id):
                self._server.send(node_id, STOP)
                if status.state not in (NodeState.DONE, NodeState.FAILED):
                    self._set(node_id, state=NodeState.STOPPING)

    # -- watching ----------------------------------------------------------------------------

    @property
    def socket(self) -> zmq.Socket[Any]:
        """The control socket the node processes report to (for a caller's poller)."""
        return self._server.socket

    @property
    def nodes(self) -> dict[str, NodeStatus]:
        return dict(self._status)

    @property
    def all_ready(self) -> bool:
        return all(s.state == NodeState.READY for s in self._status.values())

    @property
    def all_finished(self) -> bool:
        """Every node reported DONE or failed, and its process has exited."""
        return all(s.state in (NodeState.DONE, NodeState.FAILED) and not self._alive(n)
                   for n, s in self._status.items())

    def not_ready(self) -> list[str]:
        """Nodes not yet ready, with the state each is stuck in."""
        return [f"{n} ({s.state.value})" for n, s in self._status.items() if s.state != NodeState.READY]

    @property
    def failures(self) -> dict[str, str]:
        return {n: s.error for n, s in self._status.items() if s.error}

    def poll(self, timeout_ms: int) -> None:
        """Handle every waiting control message and notice processes that died."""
        if self._server.socket.poll(timeout_ms):
            while (message := self._server.receive()) is not None:
                self._handle(*message)
        for node_id in self._plans:
            self._check_exit(node_id)

    def _handle(self, node_id: str, command: bytes, body: dict[str, Any]) -> None:
        plan = self._plans.get(node_id)
        if plan is None:
            self._log.warning("control message from unknown node %r ignored", node_id)
            return
        if command == HELLO:
            if self._status[node_id].pid is None and self._procs.get(node_id) is not None:
                self._set(node_id, pid=self._procs[node_id].pid)
            self._server.send(node_id, CONFIG, self._config_for(plan))
            self._configured.add(node_id)
        elif command == BOUND:
            prefix = body.get("shm_prefix")
            self._bound[node_id] = Bound(self._worker, str(body["endpoint"]), str(prefix) if prefix else None)
            self._set(node_id, state=NodeState.BOUND)
            self._wire_when_bound()
        elif command == READY:
            self._set(node_id, state=NodeState.READY)
        elif command == STATS:
            self._set(node_id, stats=NodeStats.from_dict(body.get("stats", {})), info=dict(body.get("info") or {}))
        elif command == ERROR:
            message = f"{body.get('message', 'failed')} (in {body.get('phase', '?')})"
            first = self._status[node_id].error
            self._set(node_id, error=first or message, state=NodeState.FAILED)
            self.stop()
        elif command == DONE:
            status = self._status[node_id]
            state = NodeState.FAILED if status.error or body.get("failed") else NodeState.DONE
            self._set(node_id, state=state, stats=NodeStats.from_dict(body.get("stats", {})),
                      files=tuple(body.get("files", ())), info=dict(body.get("info") or {}))
            sent = body.get("sent")
            if isinstance(sent, dict):  # downstream nodes learn how many samples to wait for
                self.deliver_ended(node_id, sent)
                self.ended.append((node_id, sent))

    def deliver_ended(self, source: str, sent: dict[str, Any]) -> None:
        """Tell this host's nodes fed by `source` how many samples it sent on each port."""
        for plan in self._plans.values():
            if any(upstream == source for _, upstream, _ in plan.inputs) and self._alive(plan.id):
                self._server.send(plan.id, ENDED, {"source": source, "sent": sent})

    def _config_for(self, plan: NodePlan) -> dict[str, Any]:
        return {
            "node": {"id": plan.id, "type": plan.type, "entry_point": plan.entry_point, "params": plan.params,
                     "record": plan.record, "sync": plan.sync, "tolerance_ms": plan.tolerance_ms},
            "session_dir": str(self._session_dir),
            "worker": self._worker,
            "host": self._host,
            "log_path": str(self.log_path(plan.id)),
            "timing": self._timing.to_dict(),
            "session_tag": self._session_tag,
            "shared_memory": self._shared_memory,
            "shm_threshold_bytes": self._shm_threshold_bytes,
            "clock": None if self._clock is None else self._clock.to_dict(),
        }

    @property
    def bound(self) -> dict[str, Bound]:
        """Where each node's publisher listens, once it is built."""
        return dict(self._bound)

    @property
    def all_bound(self) -> bool:
        return len(self._bound) == len(self._plans)

    def connect(self, bodies: dict[str, dict[str, Any]]) -> None:
        """Send each node its wiring (what `wiring()` computed); nodes then subscribe and set up."""
        for node_id, body in bodies.items():
            if node_id in self._plans:
                self._server.send(node_id, CONNECT, body)
        self._wired = True

    def _wire_when_bound(self) -> None:
        """Once every publisher is bound, tell each node whom to subscribe to (one host only)."""
        if self._wired or self._external_wiring or not self.all_bound:
            return
        self.connect(wiring(self._plans, self._bound))

    def _check_exit(self, node_id: str) -> None:
        proc = self._procs.get(node_id)
        code = None if proc is None else proc.poll()
        if proc is None or code is None:
            return
        status = self._status[node_id]
        if status.state in (NodeState.DONE, NodeState.FAILED):
            return
        why_unknown = proc.error if isinstance(proc, NodeProcess) else ""
        how = why_unknown or (f"was killed by signal {-code}" if code < 0 else f"exited with code {code}")
        self._set(node_id, state=NodeState.FAILED, pid=proc.pid,
                  error=f"its process {how} (see {self.log_path(node_id)})")
        self.stop()

    def _alive(self, node_id: str) -> bool:
        proc = self._procs.get(node_id)
        return proc is not None and proc.poll() is None

    def _set(self, node_id: str, **changes: Any) -> None:
        self._status[node_id] = replace(self._status[node_id], **changes)

    # -- the end -----------------------------------------------------------------------------

    def wait_finished(self, timeout_s: float) -> None:
        """Wait for every node to finish by itself, handling its last messages."""
        deadline = time.monotonic() + timeout_s
        while not self.all_finished and time.monotonic() < deadline:
            self.poll(50)

    def close(self) -> list[str]:
        """Make sure no node process outlives us: terminate, then kill. Returns the ids killed."""
        if self._closed:
            return []
        self._closed = True
        forced = [n for n in self._plans if self._alive(n)]
        for node_id in forced:
            self._procs[node_id].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._timing.exit_timeout_s
        for node_id in forced:
            try:
                self._procs[node_id].wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._log.error("node %s did not exit; killing it", node_id)
                self._procs[node_id].kill()
                self._procs[node_id].wait(5)
        for node_id in forced:
            self.poll(0)
            if self._status[node_id].state not in (NodeState.DONE, NodeState.FAILED):
                self._set(node_id, state=NodeState.FAILED, error=self._status[node_id].error
                          or f"did not stop in time and was terminated (see {self.log_path(node_id)})")
        self._server.close()
        self._context.term()
        if self._own_zygote and self._zygote is not None:
            self._zygote.close()
        from cpcli.transport import shm

        shm.clean_stale_segments()  # segments of nodes that were killed before they could unlink
        return forced

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
