"""`cp worker`: join a manager, run the nodes it places here, record locally, survive its absence.

One thread owns everything: the DEALER to the manager, and the supervisor (node processes) of each
session. Recording never depends on the manager: a worker that loses it keeps its nodes running
and recording until the session's own end (the duration it was given) or a stop, reconnects with a
capped back-off, and reports what it ran when it re-registers. Its credentials are read again at
each connection, so a token saved after a rotation (`cp token --save`) lets it rejoin unrestarted.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from cpcli import __version__
from cpcli._nodecheck import param_problems
from cpcli.archive.files import file_record
from cpcli.archive.manifest import write_json_atomically
from cpcli.archive.session import SESSION_NAME
from cpcli.clock import ClockMapping
from cpcli.clocksync import Probe
from cpcli.cluster import messages as m
from cpcli.cluster.archive_server import ArchiveServer
from cpcli.cluster.channel import Dealer
from cpcli.cluster.clocknet import ClockClient, clock_key
from cpcli.cluster.keys import KeyRing
from cpcli.cluster.machine import resources
from cpcli.cluster.timing import ClusterTiming
from cpcli.devices import list_devices
from cpcli.errors import AccessError, CpError, TransportError
from cpcli.registry import Registry
from cpcli.runtime.disk import DEFAULT_MIN_FREE, DiskGuard
from cpcli.runtime.plan import NodePlan, NodeState, plan_from_dict, status_to_dict
from cpcli.runtime.supervisor import Supervisor
from cpcli.runtime.timing import Timing
from cpcli.runtime.zygote import Zygote
from cpcli.runtime.zygote import supported as zygote_supported
from cpcli.transport.curve import Credentials, DataSecurity, refusal_message
from cpcli.transport.protocol import PROTOCOL_VERSION
from cpcli.units import Size

POLL_MS = 50  # the loop's longest sleep: bounds the reaction to the manager, nodes and a stop
WORKER_RECORD = "worker.json"  # <session>/<worker>/worker.json: this worker's part of the manifest
KEEP_FINISHED = 8  # finished sessions remembered for a manager that comes back


@dataclass(frozen=True)
class WorkerConfig:
    name: str
    interface: str  # this worker's address: node publishers listen here
    data_dir: Path
    manager: str  # HOST:PORT of the manager
    keys: KeyRing  # this machine's credentials of the cluster; read again at each connection
    timing: ClusterTiming = ClusterTiming()


class _Session:
    """This worker's part of one session."""

    def __init__(self, name: str, plans: list[NodePlan], supervisor: Supervisor, session_dir: Path,
                 duration_s: float | None, runtime: Timing, disk: DiskGuard) -> None:
        self.name, self.plans, self.supervisor, self.dir = name, plans, supervisor, session_dir
        self.duration_s, self.runtime, self.disk = duration_s, runtime, disk
        self.phase = "preparing"  # preparing | wired | ready | running | stopping | finished
        self.prepared_sent = self.ready_sent = False
        self.deadline: float | None = None  # monotonic: the session's own end, known without the manager
        self.stop_deadline = 0.0
        self.error: str | None = None
        self.final: dict[str, Any] | None = None  # the finished report, kept until the manager has it
        self.start_ns = 0  # cluster time of the session's start
        self.clock_history: list[list[float | int]] = []  # [t_ns, offset_ns, drift_ppb, uncertainty_ns]
        self.final_acked = False

    def report(self) -> dict[str, Any]:
        if self.final is not None:
            return self.final
        nodes = {n: status_to_dict(s) for n, s in self.supervisor.nodes.items()}
        body: dict[str, Any] = {"session": self.name, "phase": self.phase, "nodes": nodes}
        if self.error:
            body["error"] = self.error
        return body


class WorkerAgent:
    """Runs until `stop` is set. `run()` raises CpError when the manager refuses the first registration."""

    def __init__(self, config: WorkerConfig, registry: Registry, stop: threading.Event,
                 logger: logging.Logger | None = None, announce: Any = None) -> None:
        self.config = config
        self._registry = registry
        self._stop = stop
        self._log = logger or logging.getLogger("cpcli.worker")
        self._announce = announce or (lambda line: self._log.info("%s", line))
        self._instance = secrets.token_hex(8)  # tells "this worker reconnecting" from "another of that name"
        self._context: zmq.Context[Any] = zmq.Context()
        self._dealer: Dealer | None = None
        self._refusal_logged = False  # the manager's refusal is logged once per episode, until it welcomes us
        self._joined = False
        self._ever_joined = False
        self._last_heard = 0.0
        self._next_beat = 0.0
        self._next_state = 0.0
        self._register_deadline = 0.0
        self._next_register_send = 0.0
        self._backoff_s = config.timing.backoff_min_s
        self._reconnect_at = 0.0
        self._sessions: dict[str, _Session] = {}
        self.manager_name = ""
        self._clock_client: ClockClient | None = None
        self._clock_lock = threading.Lock()
        self._clock_new: ClockMapping | None = None  # set by the clock thread, taken by the loop
        self.clock: ClockMapping | None = None  # the latest estimate of this machine against the manager
        self._devices = _devices(registry, self._log)
        self._archive: ArchiveServer  # serves this worker's recordings to `cp collect`; lives as long as run()
        self._zygote: Zygote | None = None  # forks node processes; started by the first session, kept for the next

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        resources(self.config.data_dir)  # primes psutil's CPU sampling
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self._archive = ArchiveServer(self.config.data_dir, self.config.interface, self.config.name, self._log,
                                      self.config.keys.current).start()
        try:
            self._connect()
            while not self._stop.is_set():
                self._turn()
            self._shutdown()
        finally:
            self._archive.stop()
            if self._clock_client is not None:
                self._clock_client.close()
            for session in self._sessions.values():
                session.supervisor.close()
            if self._zygote is not None:
                self._zygote.close()
            if self._dealer is not None:
                self._dealer.close(discard=not self._joined)
            self._context.term()

    def _turn(self) -> None:
        poller = zmq.Poller()
        if self._dealer is not None:
            poller.register(self._dealer.socket, zmq.POLLIN)
        for session in self._sessions.values():
            if session.phase != "finished":
                poller.register(session.supervisor.socket, zmq.POLLIN)
        poller.poll(POLL_MS)
        while self._dealer is not None and (message := self._dealer.receive()) is not None:
            self._last_heard = time.monotonic()
            self._handle(*message)
        self._take_clock()
        for session in list(self._sessions.values()):
            self._advance(session)
        self._keep_in_touch()

    def _shutdown(self) -> None:
        """Ctrl-C on the worker: stop its sessions in order, let them finish, report, leave."""
        running = [s for s in self._sessions.values() if s.phase != "finished"]
        for session in running:
            self._announce(f"stopping session {session.name}: closing recordings")
            self._begin_stop(session)
        # each session finishes by its own stop deadline (drain + exit); this bounds the wait for all
        deadline = max((s.stop_deadline for s in running), default=0.0) + 1.0
        while any(s.phase != "finished" for s in running) and time.monotonic() < deadline:
            self._turn()

    # -- the manager -------------------------------------------------------------------------

    def _connect(self) -> None:
        if self._dealer is not None:
            self._dealer.close(discard=True)
        self._dealer = Dealer(self._context, self.config.manager, self.config.name, self._log,
                              self.config.keys.current())
        self._joined = False
        now = time.monotonic()
        self._register_deadline = now + self.config.timing.register_timeout_s
        self._next_register_send = now

    def _register_body(self) -> dict[str, Any]:
        sessions = [s.report() for s in self._sessions.values() if not s.final_acked]
        return {"v": PROTOCOL_VERSION, "name": self.config.name, "instance": self._instance,
                "host": self.config.interface, "version": __version__,
                "node_types": sorted(self._registry.types), "devices": self._devices, "sessions": sessions,
                "resources": resources(self.config.data_dir), "archive_port": self._archive.port,
                "archive_data_port": self._archive.sealed.port}

    def _keep_in_touch(self) -> None:
        now = time.monotonic()
        timing = self.config.timing
        if self._dealer is None:
            if now >= self._reconnect_at:
                self._connect()
            return
        refusal = self._dealer.refusal()
        if refusal is not None:
            self._turned_away(refusal, now)
            return
        if not self._joined:
            if now >= self._next_register_send:
                if self._dealer.send(m.REGISTER, self._register_body()):
                    self._next_register_send = self._register_deadline  # sent: wait for the answer
                else:
                    self._next_register_send = now + 0.05  # not connected yet
            if now >= self._register_deadline:
                self._dealer.close(discard=True)
                self._dealer = None
                self._reconnect_at = now + self._backoff_s
                self._backoff_s = min(self._backoff_s * 2, timing.backoff_max_s)
            return
        if now - self._last_heard > timing.lost_after_s:
            self._announce(f"lost the manager {self.manager_name} at {self.config.manager}"
                           + self._recording() + "; reconnecting")
            self._drop_manager()
            self._backoff_s = timing.backoff_min_s
            self._reconnect_at = now + self._backoff_s
            return
        if now >= self._next_beat:
            self._next_beat = now + timing.beat_s
            body: dict[str, Any] = {"resources": resources(self.config.data_dir)}
            if self.clock is not None:
                body["clock"] = self.clock.to_dict()
            self._dealer.send(m.BEAT, body)

    def _recording(self) -> str:
        recording = sum(len(s.plans) for s in self._sessions.values() if s.phase not in ("finished",))
        return f"; {recording} node{'s keep' if recording != 1 else ' keeps'} recording" if recording else ""

    def _drop_manager(self) -> None:
        """Close the connection to the manager; sessions not started yet are given up (nothing to record)."""
        if self._dealer is not None:
            self._dealer.close(discard=True)
        self._dealer = None
        self._joined = False
        for session in self._sessions.values():
            if session.phase in ("preparing", "wired"):
                session.error = "the manager was lost before the session started"
                self._begin_stop(session)

    def _turned_away(self, kind: str, now: float) -> None:
        """The manager's gatekeeper refused this worker's keys: fatal at the first join, else wait for a new token."""
        assert self._dealer is not None
        tried = self._dealer.credentials
        creds = self.config.keys.current()
        message, hint = refusal_message(kind, f"manager at {self.config.manager}", creds.cluster)
        if not self._ever_joined:
            raise AccessError(message, hint=hint)
        self._drop_manager()
        if creds is not tried:  # a new token arrived since this connection was made: try it at once
            self._backoff_s = self.config.timing.backoff_min_s
            self._reconnect_at = now
            return
        if not self._refusal_logged:  # once per episode: a worker waiting for its new token must not flood the log
            self._refusal_logged = True
            self._log.error("%s%s; trying again every %g s at most; to let this worker back in, %s (here; no "
                            "restart needed)", message, self._recording(), self.config.timing.backoff_max_s, hint)
        self._reconnect_at = now + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, self.config.timing.backoff_max_s)

    def _send(self, command: bytes, body: dict[str, Any]) -> bool:
        if self._dealer is None or not self._joined:
            return False
        return self._dealer.send(command, body)

    def _handle(self, command: bytes, body: dict[str, Any]) -> None:
        if command == m.REFUSED:
            self._refused(body)
        elif command == m.WELCOME:
            self._welcomed(body)
        elif command == m.BEAT or not self._joined:
            return
        elif command == m.PREPARE:
            self._prepare(body)
        elif command in (m.CONNECT, m.START, m.STOP, m.ENDED):
            session = self._sessions.get(body["session"])
            if session is None:
                self._log.debug("%s for unknown session %s ignored", command.decode(), body["session"])
            elif command == m.CONNECT:
                self._connect_nodes(session, body)
            elif command == m.START:
                self._start(session, int(body.get("start_ns") or time.monotonic_ns()))
            elif command == m.STOP:
                self._begin_stop(session)
            else:
                session.supervisor.deliver_ended(str(body["source"]), dict(body["sent"]))
        else:
            self._log.warning("unexpected %s from the manager ignored", command.decode())

    def _welcomed(self, body: dict[str, Any]) -> None:
        first = not self._ever_joined
        self._joined = self._ever_joined = True
        self._refusal_logged = False
        self._backoff_s = self.config.timing.backoff_min_s
        self.manager_name = str(body["manager"])
        creds: Credentials = self._dealer.credentials if self._dealer is not None else self.config.keys.current()
        key = clock_key(creds)
        if self._clock_client is not None and self._clock_client.key != key:  # the cluster's secret was rotated
            self._clock_client.close()
            self._clock_client = None
        if self._clock_client is None:
            host = self.config.manager.rpartition(":")[0]
            port = int(body.get("clock_port") or self.config.manager.rpartition(":")[2])
            try:
                self._clock_client = ClockClient(host, port, self._on_clock, local=self.config.interface, key=key)
            except TransportError as err:  # tried again at the next registration; nodes wait for a clock
                self._log.error("%s", err)
            else:
                self._clock_client.start()
        for name in body.get("known_sessions", []):  # the manager holds these reports now
            if name in self._sessions and self._sessions[name].final is not None:
                self._sessions[name].final_acked = True
        verb = "joined" if first else "rejoined"
        self._announce(f"{verb} manager {body['manager']} of cluster {body['cluster']} at {self.config.manager} "
                       f"as worker {self.config.name}")

    def _on_clock(self, mapping: ClockMapping, _best: Probe) -> None:
        """On the clock thread: hand the new estimate to the loop."""
        with self._clock_lock:
            self._clock_new = mapping

    def _take_clock(self) -> None:
        with self._clock_lock:
            mapping, self._clock_new = self._clock_new, None
        if mapping is None:
            return
        first = self.clock is None
        self.clock = mapping
        if first:
            self._announce(f"clock aligned to the manager: offset {mapping.offset_ns / 1e9:+.6f} s, "
                           f"uncertainty {mapping.uncertainty_ns / 1e3:.0f} us")
        for session in self._sessions.values():
            if session.phase != "finished":
                session.supervisor.set_clock(mapping)
                if session.phase == "running":
                    session.clock_history.append(_history_row(mapping, session.start_ns))

    def _refused(self, body: dict[str, Any]) -> None:
        if body.get("reregister") and self._dealer is not None:  # a manager that restarted: register again
            self._joined = False
            self._connect()
            return
        message = f"manager at {self.config.manager} refused worker {self.config.name}: {body['message']}"
        if not self._ever_joined:
            raise CpError(message, hint=str(body.get("hint") or "") or None)
        self._log.error("%s", message)

    # -- sessions ----------------------------------------------------------------------------

    def _prepare(self, body: dict[str, Any]) -> None:
        name = str(body["session"])
        if name in self._sessions:
            return  # a repeated PREPARE (the manager came back): already under way
        if not SESSION_NAME.match(name) or name in (".", ".."):
            self._send(m.FAILED, {"session": name, "message": f"session name {name[:60]!r} is not a folder name"})
            return
        try:
            plans = [self._resolve(dict(d)) for d in body["nodes"]]
            runtime = Timing.from_dict(dict(body["timing"]))
            options = dict(body["options"])
            margin = dict(options.get("min_free") or {})
            percent = margin.get("percent")
            disk = DiskGuard(self.config.data_dir, Size(int(margin.get("bytes", DEFAULT_MIN_FREE.bytes)),
                                                        None if percent is None else float(percent)))
            disk.check_before_start()
            session_dir = self.config.data_dir / name
            session_dir.mkdir(parents=True, exist_ok=True)
            supervisor = Supervisor(plans, session_dir, self.config.name, runtime, host=self.config.interface,
                                    logger=logging.getLogger(f"cpcli.worker.{name}"),
                                    shared_memory=bool(options.get("shared_memory", True)),
                                    shm_threshold_bytes=int(options.get("shm_threshold_bytes", 0)),
                                    external_wiring=True,
                                    data_security=DataSecurity(self.config.keys.current(),
                                                               bool(options.get("encrypt_data", True)), name),
                                    zygote=self._node_launcher())
        except CpError as err:
            self._send(m.FAILED, {"session": name, "message": err.message, "hint": err.hint or ""})
            return
        except (KeyError, TypeError, ValueError) as err:
            self._send(m.FAILED, {"session": name, "message": f"malformed PREPARE ({type(err).__name__}: {err})"})
            return
        except OSError as err:  # the disk check, the session folder or the node launcher
            self._send(m.FAILED, {"session": name, "message": f"cannot start the session here ({err})"})
            return
        duration = options.get("duration_s")
        session = _Session(name, plans, supervisor, session_dir, None if duration is None else float(duration),
                           runtime, disk)
        self._sessions[name] = session
        if self.clock is not None:
            supervisor.set_clock(self.clock)
        try:
            supervisor.start()
        except OSError as err:
            session.error = f"cannot start node processes ({err})"
            self._send(m.FAILED, {"session": name, "message": session.error})
            self._begin_stop(session)
            return
        self._announce(f"session {name}: starting {', '.join(p.id for p in plans)}")
        self._forget_old_sessions()

    def _node_launcher(self) -> Zygote | None:
        """The zygote that forks this worker's node processes: started once, again if it died (None:
        this system spawns each node instead)."""
        if not zygote_supported():
            return None
        if self._zygote is not None:
            self._zygote.pump(0)  # notices a zygote that ended since the last session
            if not self._zygote.alive:
                self._log.warning("the node launcher (zygote pid %s) had ended; starting a new one", self._zygote.pid)
                self._zygote.close()
                self._zygote = None
        if self._zygote is None:
            self._zygote = Zygote(logging.getLogger("cpcli.worker")).start()
        return self._zygote

    def _resolve(self, data: dict[str, Any]) -> NodePlan:
        node_type = self._registry.types.get(str(data.get("type")))
        if node_type is None:
            raise CpError(f"node {data.get('id')}: type {data.get('type')} is not installed on worker "
                          f"{self.config.name}", hint="install the package that provides it there (`cp nodes`)")
        plan = plan_from_dict(data, node_type.origin)  # the code that runs is the one installed here
        problems = param_problems(node_type, plan.params)  # plain data, checked here: the sender is not trusted
        if problems:
            raise CpError(f"node {plan.id}: {'; '.join(problems)}", hint="check the recipe with `cp validate`")
        return plan

    def _connect_nodes(self, session: _Session, body: dict[str, Any]) -> None:
        if session.phase == "preparing":
            session.supervisor.connect(dict(body["wiring"]))
            session.phase = "wired"

    def _start(self, session: _Session, start_ns: int) -> None:
        if session.phase not in ("wired", "ready"):
            return
        session.start_ns = start_ns
        session.supervisor.begin(start_ns)
        session.phase = "running"
        if self.clock is not None:
            session.clock_history.append(_history_row(self.clock, start_ns))
        if session.duration_s is not None:
            session.deadline = time.monotonic() + session.duration_s
        self._announce(f"session {session.name}: recording")

    def _begin_stop(self, session: _Session) -> None:
        if session.phase in ("stopping", "finished"):
            return
        session.phase = "stopping"
        session.supervisor.stop()
        runtime = session.runtime
        session.stop_deadline = time.monotonic() + runtime.drain_timeout_s + runtime.exit_timeout_s

    def _advance(self, session: _Session) -> None:
        if session.phase == "finished":  # its final report goes with every REGISTER until WELCOME acknowledges it
            return
        supervisor = session.supervisor
        supervisor.poll(0)
        for node_id, sent in supervisor.ended:
            self._send(m.NODE_ENDED, {"session": session.name, "node": node_id, "sent": sent})
        supervisor.ended.clear()
        now = time.monotonic()
        if session.phase == "preparing" and supervisor.all_bound and not session.prepared_sent:
            session.prepared_sent = self._send(m.PREPARED, {"session": session.name, "bound": {
                n: {"endpoint": b.endpoint, "shm_prefix": b.shm_prefix} for n, b in supervisor.bound.items()}})
        if session.phase == "wired" and supervisor.all_ready and not session.ready_sent and self.clock is not None:
            session.ready_sent = self._send(m.READY, {"session": session.name})
        if supervisor.failures and session.phase not in ("stopping",):
            self._begin_stop(session)
            self._send(m.STATE, session.report())
        if session.phase == "running":
            session.error = session.error or session.disk.check()
            if session.error or (session.deadline is not None and now >= session.deadline):
                self._begin_stop(session)
        if session.phase == "stopping" and (supervisor.all_finished or now >= session.stop_deadline):
            self._finish(session)
            return
        if now >= self._next_state:
            self._next_state = now + session.runtime.stats_interval_s
            self._send(m.STATE, session.report())

    def _finish(self, session: _Session) -> None:
        session.supervisor.close()
        report = session.report()
        report["phase"] = "finished"
        report["clock"] = session.clock_history
        files = [file_record(p, p.relative_to(session.dir).as_posix(), "log")
                 for p in sorted(session.supervisor.logs_dir.glob("*.log"))
                 if p.stem in {plan.id for plan in session.plans}]
        report["files"] = [f.__dict__ for f in files]
        record_dir = session.dir / self.config.name
        record_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomically(record_dir / WORKER_RECORD, {
            "worker": self.config.name, "host": self.config.interface, "session": session.name,
            "cpcli_version": __version__, **{k: v for k, v in report.items() if k != "session"}})
        session.final = report
        session.phase = "finished"
        self._send(m.STATE, report)
        failed = [n for n, s in session.supervisor.nodes.items() if s.state == NodeState.FAILED]
        self._announce(f"session {session.name}: finished" + (f"; failed: {', '.join(failed)}" if failed else ""))

    def _forget_old_sessions(self) -> None:
        finished = [n for n, s in self._sessions.items() if s.phase == "finished"]
        for name in finished[:-KEEP_FINISHED]:
            del self._sessions[name]


def _devices(registry: Registry, log: logging.Logger) -> list[dict[str, Any]]:
    """The cameras, microphones and speakers of this machine, as the manager shows them."""
    listed, warnings = list_devices(registry)
    for warning in warnings:
        log.warning("%s", warning)
    return [{"kind": d.kind, "device": d.device, "name": d.name, "types": list(types)}
            for devices in listed.values() for d, types in devices]


def _history_row(mapping: ClockMapping, start_ns: int) -> list[float | int]:
    """One row of a session's clock history: when (session time, by this clock) and the estimate."""
    now = mapping.to_cluster_ns(time.monotonic_ns()) - start_ns
    return [now, mapping.offset_ns, round(mapping.drift_ppb, 1), mapping.uncertainty_ns]
