"""`cp manager`: the cluster's coordinator: workers, placement, one session across machines.

One thread owns the ROUTER that workers and `cp` clients talk to. A session is prepared on every
worker it uses, wired across them once every publisher is bound, started on all of them together
and stopped together. The manager keeps the session record (`session.json` while it runs, then
`manifest.json`, `recipe.yaml`, `events.jsonl`) in `--data/<session>/`; the workers record their
nodes on their own disks. A manager that restarts mid-session picks the record up again and
follows the workers as they re-register; nothing they recorded depends on it. What it keeps of
a session, and the manifest made of it, are `cluster/session_record.py`'s.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import zmq

from cpcli import __version__
from cpcli.archive.files import file_record
from cpcli.archive.manifest import write_json_atomically, write_manifest
from cpcli.archive.session import EventLog, create_session_dir, default_session_name, utc_stamp
from cpcli.cluster import messages as m
from cpcli.cluster.archive_server import ArchiveServer
from cpcli.cluster.channel import Router
from cpcli.cluster.clocknet import ClockServer, clock_keys
from cpcli.cluster.keys import KeyRing
from cpcli.cluster.session_record import LOST, SESSION_RECORD, ClusterSession, build_manifest
from cpcli.cluster.timing import ClusterTiming
from cpcli.errors import ArchiveError, CpError, TransportError
from cpcli.runtime.plan import plan_from_dict, status_from_dict, status_to_dict
from cpcli.runtime.timing import Timing
from cpcli.runtime.wiring import Bound, wiring
from cpcli.transport.protocol import PROTOCOL_VERSION

POLL_MS = 50
RECENT_EVENTS = 200  # lifecycle events and marks kept in memory for status and monitor
STATUS_EVENTS = 30  # of which a status reply carries the newest


@dataclass(frozen=True)
class ManagerConfig:
    name: str
    cluster: str
    interface: str
    port: int
    data_dir: Path
    keys: KeyRing  # the cluster's keys; reloaded when `cp token --rotate` changes them
    timing: ClusterTiming = ClusterTiming()
    local_worker: str | None = None  # the name of the worker running in this process, if any


@dataclass
class WorkerEntry:
    name: str
    identity: bytes
    instance: str
    host: str
    version: str
    node_types: list[str]
    resources: dict[str, Any]
    last_heard: float
    devices: list[dict[str, Any]] = field(default_factory=list)
    clock: dict[str, Any] = field(default_factory=dict)  # the worker's latest ClockMapping, as sent
    state: str = "ready"  # ready | running | lost
    lost_at: float | None = None
    archive_port: int | None = None  # where its archive server listens (`cp collect`)
    archive_data_port: int | None = None  # ... and the data port of its sealed streams (large files)

    def public(self, now: float) -> dict[str, Any]:
        return {"name": self.name, "host": self.host, "state": self.state, "version": self.version,
                "last_heartbeat_s": round(now - self.last_heard, 3), "node_types": self.node_types,
                "devices": self.devices, "clock": _clock_view(self.clock),
                "archive": f"tcp://{self.host}:{self.archive_port}" if self.archive_port else None,
                "archive_data": f"tcp://{self.host}:{self.archive_data_port}" if self.archive_data_port else None,
                **{k: self.resources.get(k) for k in ("cpu_percent", "cpu_count", "memory_total",
                                                       "memory_available", "disk_free")}}


class Manager:
    """The coordinator loop; `run()` returns when `stop` is set and any session has ended."""

    def __init__(self, config: ManagerConfig, stop: threading.Event, logger: logging.Logger | None = None,
                 announce: Callable[[str], None] | None = None) -> None:
        self.config = config
        self._stop = stop
        self._log = logger or logging.getLogger("cpcli.manager")
        self._announce = announce or (lambda line: self._log.info("%s", line))
        self._context: zmq.Context[Any] = zmq.Context()
        try:
            self.router = Router(self._context, config.interface, config.port, self._log, config.keys.current,
                                 as_manager=True, what="manager")
        except BaseException:
            self._context.term()
            raise
        try:
            self.clock_server = ClockServer(config.interface, self.router.port, clock_keys(config.keys.current))
        except TransportError:
            self.router.close()
            self._context.term()
            raise
        self.clock_server.start()
        self.workers: dict[str, WorkerEntry] = {}
        self._by_identity: dict[bytes, str] = {}
        self._clients: dict[bytes, float] = {}  # identities of clients that beat, and when last heard
        self.session: ClusterSession | None = None
        self._events: EventLog | None = None
        self._last_result: dict[str, Any] | None = None
        self.recent_events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)  # for cp status and cp monitor
        self._next_beat = 0.0
        self.started = time.monotonic()
        self.archive: ArchiveServer | None = None  # serves the session records to `cp collect` while run() runs
        self._adopt_unfinished()

    @property
    def port(self) -> int:
        return self.router.port

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self.archive = ArchiveServer(self.config.data_dir, self.config.interface, None, self._log,
                                     self.config.keys.current).start()
        try:
            stopping_since: float | None = None
            while True:
                if self._stop.is_set():
                    if self.session is None or self.session.phase == "finished":
                        break
                    if stopping_since is None:
                        stopping_since = time.monotonic()
                        self._stop_session("the manager is shutting down", interrupted=True)
                self._turn()
        finally:
            self.archive.stop()
            self.clock_server.close()
            self.router.close()
            self._context.term()

    def _turn(self) -> None:
        if self.router.socket.poll(POLL_MS):
            while (message := self.router.receive()) is not None:
                self._handle(*message)
        self.router.check()
        if self.config.keys.current() is not self.router.credentials:
            self._announce("cluster secret rotated: members holding the old token are disconnected until they get "
                           "the new one")
            self.router.rebind()  # the old connections were admitted with the old secret: cut them all
            if self.session is not None and self.session.client:
                # its cp run reconnects with the keys now on disk (on this machine, the new ones): give it the
                # time a restarted manager gives, rather than stopping the session under it
                self.session.client_heard = time.monotonic() + self.config.timing.reattach_s
        now = time.monotonic()
        if now >= self._next_beat:
            self._next_beat = now + self.config.timing.beat_s
            for entry in self.workers.values():
                if entry.state != LOST:
                    self.router.send(entry.identity, m.BEAT, {})
        self._check_lost(now)
        if self.session is not None:
            self._advance(self.session, now)

    # -- messages ----------------------------------------------------------------------------

    def _handle(self, peer: bytes, command: bytes, body: dict[str, Any]) -> None:
        if command == m.REGISTER:
            self._register(peer, body)
            return
        if command in (m.RUN, m.ATTACH, m.STATUS, m.MARK) or peer in self._clients:
            self._client_message(peer, command, body)
            return
        name = self._by_identity.get(peer)
        entry = self.workers.get(name) if name else None
        if entry is None or entry.identity != peer:
            if command == m.BEAT:  # a worker from before a restart: ask it to register again
                self.router.send(peer, m.REFUSED, {"message": "not registered", "reregister": True})
            return
        entry.last_heard = time.monotonic()
        if entry.state == LOST:
            return  # heard again only through a new registration
        if command == m.BEAT:
            entry.resources = dict(body.get("resources") or entry.resources)
            if isinstance(body.get("clock"), dict):
                entry.clock = dict(body["clock"])
            return
        session = self.session
        if session is None or body.get("session") != session.name or entry.name not in session.workers:
            return  # a worker speaks only for the sessions it has nodes in
        if command == m.PREPARED:
            self._prepared(session, entry.name, body)
        elif command == m.READY:
            session.ready.add(entry.name)
        elif command == m.STATE:
            self._state(session, entry.name, body)
        elif command == m.NODE_ENDED:
            self._node_ended(session, entry.name, body)
        elif command == m.FAILED:
            session.finished.setdefault(entry.name, {"session": session.name, "phase": "finished", "nodes": {}})
            self._fail(session, f"worker {entry.name}: {body['message']}")

    def _register(self, peer: bytes, body: dict[str, Any]) -> None:
        name = body["name"]
        current = self.workers.get(name)
        if current is not None and current.state != LOST and current.instance != body["instance"]:
            self.router.send(peer, m.REFUSED, {
                "message": f"a worker named {name} is already connected from {current.host}",
                "hint": "give this worker another --name (the default is the host name)"})
            self._log.warning("refused a second worker named %s from %s", name, body["host"])
            return
        if current is not None:
            self._by_identity.pop(current.identity, None)
        entry = WorkerEntry(name, peer, str(body["instance"]), str(body["host"]), str(body["version"]),
                            [str(t) for t in body["node_types"]], dict(body.get("resources") or {}),
                            time.monotonic(), [d for d in body.get("devices") or [] if isinstance(d, dict)],
                            archive_port=body.get("archive_port"), archive_data_port=body.get("archive_data_port"))
        was_lost = current is not None and current.state == LOST
        self.workers[name] = entry
        self._by_identity[peer] = name
        known = []
        for report in body["sessions"]:
            if isinstance(report, dict) and self.session is not None and report.get("session") == self.session.name \
                    and name in self.session.workers:
                known.append(self.session.name)
                self._rejoined(self.session, name, report)
        if self.session is not None and self.session.phase in ("running", "stopping") and name in self.session.workers:
            entry.state = "running"
        self.router.send(peer, m.WELCOME, {"v": PROTOCOL_VERSION, "manager": self.config.name,
                                           "cluster": self.config.cluster, "known_sessions": known,
                                           "clock_port": self.router.port})
        self._announce(f"worker {name} {'rejoined' if was_lost or known else 'joined'} from {entry.host}")

    def _client_message(self, peer: bytes, command: bytes, body: dict[str, Any]) -> None:
        self._clients[peer] = time.monotonic()
        session = self.session
        if session is not None and session.client == peer:
            session.client_heard = time.monotonic()
        if command == m.STATUS:
            self.router.send(peer, m.STATUS_REPLY, self.status())
        elif command == m.RUN:
            self._run(peer, body)
        elif command == m.ATTACH:
            if session is None or session.name != body["session"]:
                result = self._last_result if self._last_result and self._last_result["session"] == body["session"] \
                    else None
                if result is not None:
                    self.router.send(peer, m.RESULT, result)
                else:
                    self.router.send(peer, m.REFUSED, {"message": f"no session {body['session']} on this manager"})
                return
            if not secrets.compare_digest(str(body.get("token", "")).encode(), session.client_token.encode()):
                self.router.send(peer, m.REFUSED, {"message": f"session {session.name} belongs to the cp run that "
                                                              "started it", "hint": "follow it with cp status"})
                return
            session.client, session.client_heard = peer, time.monotonic()
            self.router.send(peer, m.ACCEPTED, {"session": session.name, "session_dir": str(session.dir),
                                                "client_token": session.client_token})
            self._event(session, "client_attached")
        elif command == m.MARK:
            self._mark(peer, session, body)
        elif command == m.STOP and session is not None and session.name == body["session"] and peer == session.client:
            self._stop_session("stopped by cp run", interrupted=True)

    def _mark(self, peer: bytes, session: ClusterSession | None, body: dict[str, Any]) -> None:
        """`cp mark`: an event at the cluster time the request arrived (a fraction of a millisecond late)."""
        if session is None or session.phase != "running":
            self.router.send(peer, m.REFUSED, {"message": "no session is recording on this cluster",
                                               "hint": "marks go into a running session; start one with cp run"})
            return
        t_ns = session.t_ns()
        self._event(session, "mark", at_ns=t_ns, label=body["label"], meta=body["meta"])
        self.router.send(peer, m.MARKED, {"session": session.name, "t_ns": t_ns})

    # -- workers -----------------------------------------------------------------------------

    def _check_lost(self, now: float) -> None:
        for entry in self.workers.values():
            if entry.state != LOST and now - entry.last_heard > self.config.timing.lost_after_s:
                entry.state, entry.lost_at = LOST, now
                self._announce(f"worker {entry.name} lost (no heartbeat for {now - entry.last_heard:.1f} s)")
                if self.session is not None and entry.name in self.session.workers:
                    self._worker_lost(self.session, entry.name)
        for peer, heard in list(self._clients.items()):
            if now - heard > self.config.timing.lost_after_s * 4:
                del self._clients[peer]

    def _worker_lost(self, session: ClusterSession, name: str) -> None:
        if session.phase == "finished" or name in session.finished:
            return
        session.lost[name] = session.t_ns()
        nodes = [n["id"] for n in session.on(name)]
        self._event(session, "worker_lost", worker=name, nodes=nodes)
        if session.phase in ("preparing", "wired"):
            self._fail(session, f"worker {name} was lost while the session was starting")
        elif session.on_worker_lost == "stop":
            self._stop_session(f"worker {name} was lost (on_worker_lost: stop)")
        self._persist(session)

    def _rejoined(self, session: ClusterSession, name: str, report: dict[str, Any]) -> None:
        if name in session.lost:
            session.rejoined[name] = session.t_ns()
            self._event(session, "worker_rejoined", worker=name)
        self._state(session, name, report)
        if session.phase == "finished" and report.get("phase") == "finished":
            self._event(session, "worker_reported_late", worker=name)
            manifest = self._write_record(session)
            self._announce(f"session {session.name}: worker {name} reported its recordings after the end; "
                           f"manifest updated ({manifest['status']})")
            return
        if session.phase in ("stopping",) and report.get("phase") != "finished":
            self.router.send(self.workers[name].identity, m.STOP, {"session": session.name})

    # -- sessions ----------------------------------------------------------------------------

    def _run(self, peer: bytes, body: dict[str, Any]) -> None:
        try:
            session = self._new_session(peer, body)
        except CpError as err:
            self.router.send(peer, m.REFUSED, {"message": err.message, "hint": err.hint or ""})
            return
        self.session = session
        self._events = EventLog(session.dir / "events.jsonl")
        self._event(session, "session_starting", session=session.name, manager=self.config.name,
                    workers=session.workers)
        self._persist(session)
        for worker in session.workers:
            entry = self.workers[worker]
            entry.state = "running"
            self.router.send(entry.identity, m.PREPARE, {"session": session.name, "nodes": session.on(worker),
                                                         "timing": session.timing, "options": session.options})
        self.router.send(peer, m.ACCEPTED, {"session": session.name, "session_dir": str(session.dir),
                                            "client_token": session.client_token})
        count = f"{len(session.nodes)} node{'s' if len(session.nodes) != 1 else ''}"
        self._announce(f"session {session.name}: {count} on {', '.join(session.workers)}")

    def _new_session(self, peer: bytes, body: dict[str, Any]) -> ClusterSession:
        if self.session is not None and self.session.phase != "finished":
            raise CpError(f"session {self.session.name} is running on this cluster",
                          hint="wait for it to end, or stop it with Ctrl-C where it was started")
        nodes = [dict(n) for n in body["nodes"] if isinstance(n, dict)]
        if not nodes or len(nodes) != len(body["nodes"]):
            raise CpError("the recipe sent has no nodes")
        default = self.config.local_worker
        ids = [str(n.get("id")) for n in nodes]
        if len(set(ids)) != len(ids):
            raise CpError("the recipe sent has duplicate node ids")
        problems = []
        for node in nodes:
            try:
                plan = plan_from_dict(node)
            except (KeyError, TypeError, ValueError) as err:
                raise CpError(f"malformed node in the recipe sent ({type(err).__name__}: {err})") from err
            unknown = [source for _, source, _ in plan.inputs if source not in ids]
            if unknown:
                raise CpError(f"node {node['id']} of the recipe sent reads from unknown nodes {', '.join(unknown)}")
            worker = node.get("worker") or default
            if worker is None:
                problems.append(f"node {node['id']} has no worker: and manager {self.config.name} runs no local "
                                f"worker; add `worker: NAME` to it")
                continue
            node["worker"] = worker
            entry = self.workers.get(str(worker))
            if entry is None or entry.state == LOST:
                why = "is not in the cluster" if entry is None else "is lost"
                problems.append(f"node {node['id']} is placed on worker {worker}, which {why}; "
                                f"known workers: {self._known_workers()}")
            elif node["type"] not in entry.node_types:
                problems.append(f"node {node['id']}: worker {worker} does not have node type {node['type']} installed "
                                "(install the package that provides it on that machine, `cp nodes` there, or place "
                                "the node on another worker)")
        if problems:
            raise CpError("; ".join(problems), hint="start `cp worker` on the machines the recipe names, "
                          "or change their `worker:`; `cp status` lists the workers")
        options = dict(body["options"])
        try:  # it goes into session.json and the manifest: plain JSON only (no bytes, no NaN)
            json.dumps([nodes, options, body.get("timing"), body.get("session_name"), body["recipe"]], allow_nan=False)
        except (TypeError, ValueError) as err:
            raise CpError(f"the recipe sent holds data that is not plain JSON ({err})") from err
        on_lost = str(body.get("on_worker_lost") or "continue")
        name = body.get("session_name")
        moment = datetime.now(timezone.utc)
        try:
            session_dir = create_session_dir(self.config.data_dir, str(name) if name else
                                             default_session_name(str(body["recipe"]), moment), exact=bool(name))
        except ArchiveError as err:
            raise CpError(f"on manager {self.config.name}: {err.message}", hint=err.hint) from err
        (session_dir / "recipe.yaml").write_text(str(body["recipe_text"]), encoding="utf-8")
        return ClusterSession(name=session_dir.name, dir=session_dir, recipe=str(body["recipe"]),
                              recipe_text=str(body["recipe_text"]), nodes=nodes, options=options,
                              timing=Timing.from_dict(dict(body.get("timing") or {})).to_dict(),
                              on_worker_lost=on_lost, client=peer, client_heard=time.monotonic())

    def _known_workers(self) -> str:
        return ", ".join(f"{e.name} ({e.state})" for e in sorted(self.workers.values(), key=lambda e: e.name)) \
            or "none (no worker has joined)"

    def _prepared(self, session: ClusterSession, worker: str, body: dict[str, Any]) -> None:
        mine = {n["id"] for n in session.on(worker)}
        for node_id, where in dict(body["bound"]).items():
            if node_id in mine and isinstance(where, dict) and isinstance(where.get("endpoint"), str):
                prefix = where.get("shm_prefix")
                session.bound[node_id] = Bound(worker, where["endpoint"], str(prefix) if prefix else None)
        if session.phase == "preparing" and len(session.bound) == len(session.nodes):
            plans = {n["id"]: plan_from_dict(n) for n in session.nodes}
            bodies = wiring(plans, session.bound)
            for name in session.workers:
                ids = {n["id"] for n in session.on(name)}
                self.router.send(self.workers[name].identity, m.CONNECT, {
                    "session": session.name, "wiring": {i: b for i, b in bodies.items() if i in ids}})
            session.phase = "wired"

    def _state(self, session: ClusterSession, worker: str, body: dict[str, Any]) -> None:
        for node_id, status in dict(body.get("nodes") or {}).items():
            if isinstance(status, dict) and any(n["id"] == node_id and n["worker"] == worker for n in session.nodes):
                try:  # a malformed status (wrong types deep inside) is dropped, never trusted
                    checked = status_from_dict(dict(status, id=node_id))
                    if not all(isinstance(f.get("path"), str) for f in checked.files):
                        raise TypeError("a file without a path")
                except (KeyError, TypeError, ValueError, AttributeError) as err:
                    self._log.warning("dropped a malformed status of node %s from worker %s: %s", node_id, worker, err)
                    continue
                status = status_to_dict(checked)
                session.statuses[node_id] = status
                if status.get("error") and node_id not in session.failures:
                    session.failures[node_id] = str(status["error"])
                    self._event(session, "node_failed", node=node_id, worker=worker, error=status["error"])
                    self._stop_session(f"node {node_id} failed")
        if body.get("error") and not session.error:
            session.error = f"worker {worker}: {body['error']}"
            self._stop_session(session.error)
        if body.get("phase") == "finished":
            session.finished[worker] = body
            if self.workers[worker].state == "running":
                self.workers[worker].state = "ready"

    def _node_ended(self, session: ClusterSession, worker: str, body: dict[str, Any]) -> None:
        source = body["node"]
        for name in session.workers:
            if name == worker or self.workers[name].state == LOST:
                continue  # the sender's own downstream nodes were told by its supervisor
            if any(any(i[1] == source for i in n["inputs"]) for n in session.on(name)):
                self.router.send(self.workers[name].identity, m.ENDED,
                                 {"session": session.name, "source": source, "sent": body["sent"]})

    def _advance(self, session: ClusterSession, now: float) -> None:
        ready_timeout_s = Timing.from_dict(session.timing).ready_timeout_s if session.phase in (
            "preparing", "wired") else 0.0
        if session.phase in ("preparing", "wired") and now - session.created > ready_timeout_s:
            late = [n["id"] for n in session.nodes if n["id"] not in session.bound
                    or n["worker"] not in session.ready]
            self._fail(session, f"nodes not ready after {ready_timeout_s:.0f} s: {', '.join(late)}")
        if session.phase == "wired" and session.ready >= set(session.workers):
            self._start(session)
        if session.phase == "running":
            duration = session.options.get("duration_s")
            if duration is not None and session.start_ns is not None and \
                    time.monotonic_ns() - session.start_ns >= float(duration) * 1e9:
                self._stop_session(None)
        if session.client is not None and session.phase in ("preparing", "wired", "running") and \
                now - session.client_heard > self.config.timing.lost_after_s:
            gone = "has not reattached" if session.client == b"" else "is gone"
            self._event(session, "client_lost")
            self._stop_session(f"the cp run that started the session {gone}", interrupted=True)
        if session.phase == "stopping":
            waiting = [w for w in session.workers if w not in session.finished and w not in self._lost_now(session)]
            if not waiting or now >= session.stop_deadline:
                self._finalize(session)
                return
        if now >= session.next_progress and session.client:
            session.next_progress = now + self.config.timing.progress_s
            self.router.send(session.client, m.PROGRESS, self._progress(session))

    def _lost_now(self, session: ClusterSession) -> set[str]:
        return {w for w in session.workers if self.workers.get(w) is None or self.workers[w].state == LOST}

    def _start(self, session: ClusterSession) -> None:
        session.start_ns = time.monotonic_ns()
        session.start_utc = utc_stamp(datetime.now(timezone.utc))
        session.phase = "running"
        for worker in session.workers:
            self.router.send(self.workers[worker].identity, m.START,
                             {"session": session.name, "start_ns": session.start_ns})
        self._event(session, "session_started", start_utc=session.start_utc)
        self._persist(session)

    def _stop_session(self, why: str | None, interrupted: bool = False) -> None:
        session = self.session
        if session is None or session.phase in ("stopping", "finished"):
            return
        session.interrupted = session.interrupted or interrupted
        session.stop_ns = time.monotonic_ns()
        session.phase = "stopping"
        runtime = Timing.from_dict(session.timing)
        session.stop_deadline = time.monotonic() + runtime.drain_timeout_s + runtime.exit_timeout_s + \
            self.config.timing.finish_margin_s
        for worker in session.workers:
            entry = self.workers.get(worker)
            if entry is not None and entry.state != LOST:
                self.router.send(entry.identity, m.STOP, {"session": session.name})
        self._event(session, "session_stopping", reason=why or "duration reached")
        self._persist(session)

    def _fail(self, session: ClusterSession, message: str) -> None:
        session.error = session.error or message
        if session.phase in ("preparing", "wired"):
            session.start_ns = None
        self._stop_session(message)

    def _progress(self, session: ClusterSession) -> dict[str, Any]:
        elapsed = session.t_ns() / 1e9 if session.start_ns is not None else 0.0
        return {"session": session.name, "phase": session.phase, "elapsed_s": elapsed,
                "nodes": self._node_view(session), "lost": sorted(self._lost_now(session) & set(session.workers))}

    def _node_view(self, session: ClusterSession) -> dict[str, Any]:
        view = {}
        lost = self._lost_now(session)
        for node in session.nodes:
            status = dict(session.statuses.get(node["id"]) or {"id": node["id"], "type": node["type"],
                                                               "state": "starting"})
            status["worker"] = node["worker"]
            status["params"] = node.get("params") or {}  # cp monitor: the nominal rate
            status["outputs"] = list(node.get("outputs") or [])  # cp monitor: the preview topics
            if node["id"] in session.bound:  # where a monitor subscribes to its previews
                status["endpoint"] = session.bound[node["id"]].endpoint
            if node["worker"] in lost and status.get("state") not in ("done", "failed"):
                status["state"] = LOST
            view[node["id"]] = status
        return view

    # -- the end -----------------------------------------------------------------------------

    def _finalize(self, session: ClusterSession) -> None:
        lost = self._lost_now(session)
        for worker in session.workers:
            if worker not in session.finished and worker not in lost:
                self._event(session, "worker_unfinished", worker=worker)
        session.phase = "finished"
        self._event(session, "session_stopped", recorded=session.start_ns is not None)
        manifest = self._write_record(session)
        for worker in session.workers:
            entry = self.workers.get(worker)
            if entry is not None and entry.state == "running":
                entry.state = "ready"
        result = {"session": session.name, "session_dir": str(session.dir), "manifest": manifest,
                  "failures": session.failures, "error": session.error, "interrupted": session.interrupted,
                  "lost": {w: t for w, t in session.lost.items() if w not in session.finished}}
        self._last_result = result
        if session.client:
            self.router.send(session.client, m.RESULT, result)
        self._announce(f"session {session.name}: {manifest['status']}")

    def _write_record(self, session: ClusterSession) -> dict[str, Any]:
        """Write the manifest from what the workers reported (again when a lost one reports late)."""
        for report in session.finished.values():
            for node_id, status in dict(report.get("nodes") or {}).items():
                if isinstance(status, dict):
                    session.statuses[node_id] = status
        hosts = {name: entry.host for name, entry in self.workers.items()}
        manager = {"name": self.config.name, "cluster": self.config.cluster, "host": self.config.interface}
        manifest = build_manifest(session, hosts, self._lost_now(session) - set(session.finished), manager)
        if self._events is not None:
            self._events.close()
            self._events = None
        events = session.dir / "events.jsonl"
        if events.exists():
            manifest["files"].append(file_record(events, "events.jsonl", "events").__dict__)
        write_manifest(session.dir, manifest)
        self._persist(session)
        return manifest

    # -- record and restart ------------------------------------------------------------------

    def _event(self, target: ClusterSession, event: str, at_ns: int | None = None, **fields: Any) -> None:
        if self._events is None:
            self._events = EventLog(target.dir / "events.jsonl")
        t_ns = target.t_ns() if at_ns is None else at_ns
        self._events.write(t_ns, event, **fields)
        self.recent_events.append({"t_ns": t_ns, "event": event, "session": target.name, **fields})

    def _persist(self, session: ClusterSession) -> None:
        write_json_atomically(session.dir / SESSION_RECORD, session.record())

    def _adopt_unfinished(self) -> None:
        """A manager back after a crash: follow the session it was running, if any."""
        records = sorted(self.config.data_dir.glob(f"*/{SESSION_RECORD}"), key=lambda p: p.stat().st_mtime)
        for path in reversed(records):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(data, dict) or data.get("phase") in ("finished", None):
                continue
            session = ClusterSession.from_record(path.parent, data, self.config.timing.reattach_s)
            self.session = session
            self._event(session, "manager_restarted", manager=self.config.name)
            if session.phase in ("preparing", "wired"):
                self._fail(session, "the manager restarted before the session started")
            elif session.phase == "stopping":
                session.phase = "running"  # stop again: workers that re-register get STOP
                self._stop_session(None)
            self._announce(f"following session {session.name} again (it was {data['phase']} when the manager "
                           "stopped); waiting for its workers")
            return

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        session = None
        if self.session is not None:
            s = self.session
            session = {"name": s.name, "phase": s.phase, "dir": str(s.dir), "recipe": s.recipe,
                       "encrypt_data": bool(s.options.get("encrypt_data", True)),
                       "elapsed_s": round(s.t_ns() / 1e9, 3) if s.start_ns is not None else 0.0,
                       "nodes": self._node_view(s), "lost": sorted(self._lost_now(s) & set(s.workers))}
        creds = self.router.credentials
        return {"manager": {"name": self.config.name, "cluster": self.config.cluster,
                            "security": "insecure" if creds.insecure else "curve", "key": creds.fingerprint,
                            "turned_away": self.router.counts,
                            "address": f"{self.config.interface}:{self.port}", "version": __version__,
                            "protocol": PROTOCOL_VERSION, "uptime_s": round(now - self.started, 1),
                            "local_worker": self.config.local_worker,
                            "archive": self.archive.address if self.archive else None,
                            "archive_data": self.archive.data_address if self.archive else None},
                "workers": [e.public(now) for e in sorted(self.workers.values(), key=lambda e: e.name)],
                "session": session, "events": list(self.recent_events)[-STATUS_EVENTS:]}


def _clock_view(mapping: dict[str, Any]) -> dict[str, Any] | None:
    """A worker's clock for `cp status`: offset, drift in ppm, uncertainty."""
    if not mapping:
        return None
    return {"offset_ns": int(mapping.get("offset_ns", 0)),
            "drift_ppm": round(float(mapping.get("drift_ppb", 0)) / 1e3, 3),
            "uncertainty_ns": int(mapping.get("uncertainty_ns", 0))}
