"""The `cp` side of the cluster: ask the manager for its status, or run a recipe there and follow it.

Every request holds this machine's credentials; a manager that refuses them (a wrong, rotated or
missing join token) is reported at once with what to do, not after the answer timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from cpcli.cluster import messages as m
from cpcli.cluster.channel import Dealer
from cpcli.cluster.timing import ClusterTiming
from cpcli.errors import AccessError, CpError, PeerLostError
from cpcli.recipe import Recipe
from cpcli.registry import Registry
from cpcli.runtime.plan import NodeState, NodeStatus, plan_to_dict, status_from_dict
from cpcli.runtime.session import Progress, RunOptions, SessionResult, StopControl, plan_nodes
from cpcli.transport.curve import Credentials, refusal_message
from cpcli.transport.protocol import PROTOCOL_VERSION

POLL_MS = 50
log = logging.getLogger("cpcli.client")


def _check_refused(dealer: Dealer, address: str) -> None:
    """CpError (closing the dealer) when the manager's gatekeeper turned this machine away."""
    kind = dealer.refusal()
    if kind is not None:
        dealer.close(discard=True)
        raise AccessError(*refusal_message(kind, f"manager at {address}", dealer.credentials.cluster))


def _await(dealer: Dealer, address: str, commands: set[bytes], timeout_s: float
           ) -> tuple[bytes, dict[str, Any]] | None:
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if dealer.socket.poll(int(min(left, 0.1) * 1000) + 1):
            while (message := dealer.receive()) is not None:
                if message[0] in commands:
                    return message
        else:
            _check_refused(dealer, address)  # cut off since the request left (a rotation): say so now
    return None


def _request(context: zmq.Context[Any], address: str, command: bytes, body: dict[str, Any],
             replies: set[bytes], timing: ClusterTiming, credentials: Credentials
             ) -> tuple[Dealer, bytes, dict[str, Any]]:
    dealer = Dealer(context, address, "client", log, credentials)
    deadline = time.monotonic() + timing.answer_timeout_s
    while not dealer.send(command, body):  # not connected yet (IMMEDIATE): try until the deadline
        _check_refused(dealer, address)
        if time.monotonic() > deadline:
            dealer.close(discard=True)
            raise PeerLostError(f"cannot reach the manager at {address}",
                                hint="is `cp manager` running there, and is its port reachable from here?")
        time.sleep(0.02)
    answer = _await(dealer, address, replies | {m.REFUSED}, max(0.1, deadline - time.monotonic()))
    if answer is None:
        dealer.close(discard=True)
        raise PeerLostError(f"the manager at {address} did not answer within {timing.answer_timeout_s:g} s",
                            hint="is `cp manager` running there, and is its port reachable from here?")
    if answer[0] == m.REFUSED:
        dealer.close(discard=True)
        raise CpError(f"manager at {address}: {answer[1]['message']}", hint=str(answer[1].get("hint") or "") or None)
    return dealer, answer[0], answer[1]


def cluster_status(address: str, timing: ClusterTiming, credentials: Credentials) -> dict[str, Any]:
    context: zmq.Context[Any] = zmq.Context()
    try:
        dealer, _, body = _request(context, address, m.STATUS, {"v": PROTOCOL_VERSION}, {m.STATUS_REPLY}, timing,
                                   credentials)
        dealer.close()
        return body
    finally:
        context.destroy(linger=0)  # a request cut short (Ctrl-C) must not hang the exit


def _nodes(view: dict[str, Any]) -> dict[str, NodeStatus]:
    nodes = {}
    for node_id, data in view.items():
        try:
            nodes[node_id] = status_from_dict(dict(data, id=node_id))
        except (KeyError, TypeError, ValueError):
            nodes[node_id] = NodeStatus(node_id, str(data.get("type", "?")), NodeState.STARTING)
    return nodes


class RemoteRun:
    """`cp run` on a cluster: send the recipe, follow its progress, stop it, return its result."""

    def __init__(self, address: str, recipe: Recipe, registry: Registry, options: RunOptions, stop: StopControl,
                 timing: ClusterTiming, credentials: Callable[[], Credentials],
                 on_progress: Callable[[Progress], None] | None = None,
                 announce: Callable[[str], None] | None = None) -> None:
        self.address, self.recipe, self.options, self.stop = address, recipe, options, stop
        self.timing = timing
        self.credentials = credentials
        self._registry = registry
        self._on_progress = on_progress
        self._announce = announce or (lambda line: log.info("%s", line))
        self._context: zmq.Context[Any] = zmq.Context()
        self.session = ""
        self.session_dir = Path()
        self._stop_sent = False
        self._token = ""

    def run(self) -> SessionResult:
        try:
            return self._run()
        finally:
            self._context.term()

    def _body(self) -> dict[str, Any]:
        nodes = []
        for plan in plan_nodes(self.recipe, self._registry):
            data = plan_to_dict(plan)
            data["worker"] = self.recipe.node(plan.id).worker
            nodes.append(data)
        o = self.options
        min_free = {"bytes": o.min_free.bytes, "percent": o.min_free.percent}
        return {"v": PROTOCOL_VERSION, "recipe": self.recipe.name, "recipe_text": self.recipe.text, "nodes": nodes,
                "session_name": o.session_name, "on_worker_lost": self.recipe.on_worker_lost,
                "timing": o.timing.to_dict(),
                "options": {"duration_s": o.duration_s, "shared_memory": o.shared_memory,
                            "shm_threshold_bytes": o.shm_threshold_bytes, "min_free": min_free,
                            "encrypt_data": o.encrypt_data}}

    def _run(self) -> SessionResult:
        dealer, _, accepted = _request(self._context, self.address, m.RUN, self._body(), {m.ACCEPTED}, self.timing,
                                       self.credentials())
        self.session, self.session_dir = str(accepted["session"]), Path(str(accepted["session_dir"]))
        self._token = str(accepted.get("client_token") or "")
        heard = next_beat = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if self.stop.requested.is_set() and not self._stop_sent:
                    self._stop_sent = dealer.send(m.STOP, {"session": self.session})
                if self.stop.forced.is_set():
                    raise CpError(f"stopped waiting for session {self.session}; its workers finish their "
                                  "recordings by themselves", hint=f"see `cp status`; the session is in "
                                  f"{self.session_dir} on the manager")
                if now >= next_beat:
                    next_beat = now + self.timing.beat_s
                    dealer.send(m.BEAT, {})
                if dealer.socket.poll(POLL_MS):
                    while (message := dealer.receive()) is not None:
                        heard = time.monotonic()
                        command, body = message
                        if command == m.PROGRESS and self._on_progress is not None:
                            self._on_progress(Progress(self.session_dir, str(body["phase"]),
                                                       float(body["elapsed_s"]), _nodes(dict(body["nodes"]))))
                        elif command == m.RESULT:
                            return self._result(body)
                if time.monotonic() - heard > self.timing.lost_after_s:
                    dealer.close(discard=True)
                    try:
                        dealer = self._reattach()
                    except _Finished as finished:
                        return self._result(finished.body)
                    heard = time.monotonic()
        finally:
            dealer.close()

    def _reattach(self) -> Dealer:
        """The manager went silent: the workers keep recording; wait for it and follow the session again."""
        self._announce(f"lost the manager at {self.address}; the workers keep recording; waiting for it to return")
        backoff = self.timing.backoff_min_s
        while True:
            if self.stop.requested.is_set():
                raise PeerLostError(f"the manager at {self.address} is gone; session {self.session} keeps "
                                    "recording on the workers until its end or a stop",
                                    hint="restart `cp manager` (it picks the session up again), or stop "
                                         "`cp worker` on each machine with Ctrl-C: nothing recorded is lost")
            dealer = Dealer(self._context, self.address, "client", log, self.credentials())
            sent = False
            deadline = time.monotonic() + max(backoff, 0.5)
            while time.monotonic() < deadline and not sent:
                sent = dealer.send(m.ATTACH, {"v": PROTOCOL_VERSION, "session": self.session, "token": self._token})
                if not sent:
                    self._check_refused(dealer)
                    time.sleep(0.02)
            if sent:
                try:
                    answer = _await(dealer, self.address, {m.ACCEPTED, m.RESULT, m.REFUSED},
                                    self.timing.answer_timeout_s)
                except CpError as err:
                    raise self._refused(err) from err
            else:
                answer = None
            if answer is not None and answer[0] == m.REFUSED:
                dealer.close(discard=True)
                raise PeerLostError(f"the manager at {self.address} came back without session {self.session}: "
                                    f"{answer[1]['message']}", hint=f"the recordings are in {self.session_dir} "
                                    "and on each worker")
            if answer is not None:
                self._announce(f"the manager is back; following session {self.session} again")
                if answer[0] == m.RESULT:  # it ended while we were away
                    dealer.close()
                    raise _Finished(answer[1])
                self._stop_sent = False
                return dealer
            dealer.close(discard=True)
            time.sleep(backoff)
            backoff = min(backoff * 2, self.timing.backoff_max_s)

    def _check_refused(self, dealer: Dealer) -> None:
        try:
            _check_refused(dealer, self.address)
        except CpError as err:
            raise self._refused(err) from err

    def _refused(self, err: CpError) -> CpError:
        """Cut off by the manager (its secret was rotated meanwhile): the session cannot be followed from here."""
        return CpError(f"{err.message}; without its cp run the manager stops session {self.session} (what it "
                       f"recorded is kept, in {self.session_dir} on the manager and on each worker)", hint=err.hint)

    def _result(self, body: dict[str, Any]) -> SessionResult:
        manifest = dict(body["manifest"])
        nodes = _nodes({n: dict(v) for n, v in dict(manifest.get("nodes") or {}).items()})
        return SessionResult(self.session_dir, manifest, nodes, dict(body.get("failures") or {}),
                             interrupted=bool(body.get("interrupted")),
                             duration_s=int(manifest.get("duration_ns") or 0) / 1e9,
                             logs_dir=self.session_dir / "logs", error=body.get("error"))


class _Finished(Exception):
    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__("finished")
        self.body = body


def send_mark(address: str, label: str, meta: dict[str, Any], timing: ClusterTiming,
              credentials: Credentials) -> dict[str, Any]:
    """Put a mark into the cluster's running session; returns {session, t_ns}."""
    context: zmq.Context[Any] = zmq.Context()
    try:
        dealer, _, body = _request(context, address, m.MARK, {"v": PROTOCOL_VERSION, "label": label, "meta": meta},
                                   {m.MARKED}, timing, credentials)
        dealer.close()
        return body
    finally:
        context.destroy(linger=0)  # a request cut short (Ctrl-C) must not hang the exit
