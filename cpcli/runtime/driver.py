"""One node in one process: build it, wire it, step it, record it, report, and finish cleanly."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import logging
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import zmq

from cpcli.archive.manifest import write_node_record
from cpcli.archive.writer import NodeRecorder, RecordingError
from cpcli.clock import Clock, ClockMapping
from cpcli.errors import CpError, PeerLostError
from cpcli.node import Node, NodeContext, Sample
from cpcli.runtime import security as data_security
from cpcli.runtime.intake import Intake
from cpcli.runtime.stats import LatencyMeter, NodeStats, RateMeter
from cpcli.runtime.timing import Timing
from cpcli.transport import shm
from cpcli.transport.control import ControlClient
from cpcli.transport.curve import DataSecurity
from cpcli.transport.protocol import (
    BOUND,
    CLOCK,
    CONFIG,
    CONNECT,
    DONE,
    ENDED,
    ERROR,
    HELLO,
    READY,
    START,
    STATS,
    STOP,
    pack_object,
)
from cpcli.transport.pubsub import END_LINGER_MS, SHM_THRESHOLD_BYTES, Publisher, SharedMemoryPlan

IDLE_POLL_MS = 100  # longest sleep of a node with nothing to do; bounds reaction to STOP
MAX_STEPS_PER_TURN = 64  # steps before control and sockets get a look again (fairness)
FREE_RUN_BURST_S = 0.002  # a source at rate 0 steps this long between control checks: less overhead
_PR_SET_PDEATHSIG = 1


class _Stopped(Exception):
    """The supervisor went away or asked us to stop before the session started."""


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM us when our parent dies; elsewhere the periodic check covers it."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise SystemExit(1)


def _split_outputs(result: Any, ports: tuple[str, ...]) -> list[tuple[str, Any]]:
    """Normalize what step() returned into (port, value-or-Sample) pairs."""
    if result is None:
        return []
    if isinstance(result, Mapping) and result and set(result) <= set(ports):
        if len(ports) > 1:
            return [(p, v) for p, v in result.items() if v is not None]
        # One port: {port: value} is a port mapping unless it is a table row with one column
        # that happens to share the port's name (a scalar value); wrap rows in Sample to be sure.
        value = result[ports[0]]
        if value is None or not isinstance(value, (int, float, str, bool)):
            return [] if value is None else [(ports[0], value)]
    if len(ports) == 1:
        return [(ports[0], result)]
    raise CpError(
        f"step() returned a {type(result).__name__}, but the node has outputs {', '.join(ports)}",
        hint="return a dict keyed by output port",
    )


class Driver:
    """Runs one node: the only owner of its sockets, in one thread.

    `security`: how its publisher admits subscribers and its inputs log in (None: no keys, a
    session on one machine whose sockets stay on loopback).
    """

    def __init__(self, control_endpoint: str, node_id: str, parent_pid: int,
                 security: DataSecurity | None = None) -> None:
        self.node_id = node_id
        self._security = security
        self._parent_pid = parent_pid
        self._context: zmq.Context[Any] = zmq.Context()
        self._control = ControlClient(self._context, control_endpoint, node_id)
        self._log = logging.getLogger(f"cpcli.node.{node_id}")
        self._clock = Clock()
        self._timing = Timing()
        self._node: Node | None = None
        self._set_up = False
        self._publisher: Publisher | None = None
        self._intake: Intake | None = None
        self._recorder: NodeRecorder | None = None
        self._poller = zmq.Poller()
        self._poller.register(self._control.socket, zmq.POLLIN)
        self._stop_requested = False
        self._stop_deadline = 0.0
        self._next_parent_check = 0.0
        self._rate = RateMeter()
        self._latency = LatencyMeter()
        self._config: dict[str, Any] = {}
        self._node_context: NodeContext | None = None
        self._ready_sockets: dict[Any, int] = {}  # what the last poll found readable
        self._start_ns = 0
        self._first_in_ns: int | None = None
        self._first_out_ns: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        """Signal handler and STOP: finish the way a normal stop does (files closed, EOS sent)."""
        if not self._stop_requested:
            self._stop_requested = True
            self._stop_deadline = time.monotonic() + self._timing.drain_timeout_s

    def run(self) -> int:
        failed = False
        try:
            self._control.send(HELLO, {"pid": os.getpid()})
            self._configure(self._await(CONFIG, self._timing.ready_timeout_s))
            phase = "init"
            try:
                self._build()
                phase = "setup"
                assert self._node is not None
                self._node_context = self._context_for_node()
                self._node.setup(self._node_context)
                self._set_up = True
                self._connect(self._await(CONNECT, self._timing.ready_timeout_s))
                self._await_subscribers()
                self._control.send(READY)
                self._start_ns = int(self._await(START, None)["start_ns"])
                self._start_recording()
                phase = "step"
                self._loop()
            except _Stopped:
                pass
            except Exception as err:  # the node's own code failed: report it, keep what was recorded
                failed = True
                self._report_error(phase, err)
        except _Stopped:
            return 0
        finally:
            failed = self._finish() or failed
        return 1 if failed else 0

    def _configure(self, config: dict[str, Any]) -> None:
        self._config = config
        self._timing = Timing.from_dict(config.get("timing", {}))
        if config.get("clock"):
            self._clock.update(ClockMapping.from_dict(config["clock"]))
        log_path = config.get("log_path")
        if log_path:
            handler = logging.FileHandler(log_path, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger().addHandler(handler)
            logging.getLogger().setLevel(logging.INFO)

    def _build(self) -> None:
        node = self._config["node"]
        module_name, _, attr = str(node["entry_point"]).partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
        self._node = cls(**node["params"])
        self._ports = tuple(cls.outputs)
        self._publisher = Publisher(self._context, self.node_id, self._ports, self._config.get("host", "127.0.0.1"),
                                    self._log, self._security)
        prefix = None
        if self._ports:  # a sink has nothing to publish: nothing to watch for (one less socket per wake-up)
            self._poller.register(self._publisher.socket, zmq.POLLIN)
        if self._ports and self._config.get("shared_memory") and shm.available():
            prefix = shm.segment_prefix(self._config["session_tag"], self.node_id, os.getpid())
            if self._publisher.open_local(prefix):  # readers on this machine connect here, not over TCP
                self._poller.register(self._publisher.local_fd, zmq.POLLIN)
            else:
                prefix = None
        self._control.send(BOUND, {"endpoint": self._publisher.endpoint, "shm_prefix": prefix})

    def _context_for_node(self) -> NodeContext:
        node_dir = Path(self._config["session_dir"]) / self._config["worker"] / self.node_id
        return NodeContext(node_id=self.node_id, clock=self._clock, logger=self._log,
                           worker=self._config["worker"], data_dir=node_dir, _lender=self._publisher)

    def _connect(self, wiring: dict[str, Any]) -> None:
        node = self._config["node"]
        self._intake = Intake(self._context, wiring["inputs"], node["sync"], node["tolerance_ms"], self._log,
                              self._security)
        for sub in self._intake.subscribers:
            self._poller.register(sub.socket, zmq.POLLIN)
        self._expected_subscribers: dict[str, int] = wiring["subscribers"]
        plan = wiring.get("shared_memory")
        if plan and self._publisher is not None and self._publisher.local_fd is not None:
            self._publisher.share_memory(SharedMemoryPlan(
                local_readers=int(plan["local_readers"]),
                all_readers=tuple((int(i), str(p)) for i, p in plan["all_readers"]),
                threshold_bytes=int(self._config.get("shm_threshold_bytes", 0)) or SHM_THRESHOLD_BYTES))

    def _await_subscribers(self) -> None:
        """Block until every downstream SUB has subscribed, so no first sample is lost."""
        assert self._publisher is not None
        deadline = time.monotonic() + self._timing.ready_timeout_s
        while any(self._publisher.subscribers(p) < n for p, n in self._expected_subscribers.items()):
            if time.monotonic() > deadline:
                missing = [p for p, n in self._expected_subscribers.items() if self._publisher.subscribers(p) < n]
                raise PeerLostError(f"subscribers of {', '.join(missing)} never connected")
            self._poll_once(IDLE_POLL_MS, before_start=True)
            self._publisher.handle_subscriptions()

    def _start_recording(self) -> None:
        if not self._config["node"]["record"]:
            return
        self._recorder = NodeRecorder(
            Path(self._config["session_dir"]), self._config["worker"], self.node_id,
            start_ns=self._start_ns, flush_interval_s=self._timing.flush_interval_s, logger=self._log,
        )
        self._recorder.start()

    # -- the loop ----------------------------------------------------------------------------

    def _await(self, command: bytes, timeout_s: float | None) -> dict[str, Any]:
        """Wait for one control command, watching for the parent's death and a stop."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._stop_requested:
                raise _Stopped
            if deadline is not None and time.monotonic() > deadline:
                raise PeerLostError(f"the supervisor sent no {command.decode()} within {timeout_s:.0f} s")
            body = self._poll_once(IDLE_POLL_MS, before_start=True, want=command)
            if body is not None:
                return body
            if self._publisher is not None:
                self._publisher.handle_subscriptions()

    def _poll_once(self, timeout_ms: int, before_start: bool = False,
                   want: bytes | None = None) -> dict[str, Any] | None:
        """Poll control; return the body of `want` if it came. STOP before start ends the node."""
        events = dict(self._poller.poll(timeout_ms))
        self._ready_sockets = events
        self._check_parent()
        if self._control.socket not in events:
            return None
        found = None
        while (message := self._control.receive()) is not None:
            command, body = message
            if command == STOP:
                self.request_stop()
                if before_start:
                    raise _Stopped
            elif command == ENDED and self._intake is not None:
                self._intake.expect_end(str(body.get("source")), dict(body.get("sent") or {}))
            elif command == CLOCK:
                try:
                    self._clock.update(ClockMapping.from_dict(body))
                except (KeyError, TypeError, ValueError) as err:
                    self._log.warning("ignored a malformed clock mapping (%s)", err)
            elif command == want:
                found = body
        return found

    def _check_parent(self) -> None:
        now = time.monotonic()
        if now >= self._next_parent_check:
            self._next_parent_check = now + self._timing.parent_check_s
            if os.getppid() != self._parent_pid:
                self._log.warning("supervisor (pid %d) is gone: stopping", self._parent_pid)
                self.request_stop()

    def _loop(self) -> None:
        assert self._node is not None and self._intake is not None and self._publisher is not None
        intake = self._intake
        is_source = not intake.subscribers
        rate = float(getattr(self._node, "rate_hz", 0) or 0)
        period_s = 1.0 / rate if rate > 0 else 0.0
        next_step = time.monotonic()
        next_stats = time.monotonic() + self._timing.stats_interval_s
        while True:
            now = time.monotonic()
            if self._stop_requested and (is_source or intake.finished() or now > self._stop_deadline):
                return
            if is_source and not self._stop_requested:
                timeout_ms = max(0, math.ceil((next_step - now) * 1000)) if period_s else 0
            else:
                timeout_ms = IDLE_POLL_MS if not self._stop_requested else 10
            self._poll_once(min(timeout_ms, IDLE_POLL_MS))
            if (self._publisher.socket in self._ready_sockets  # poll is level-triggered: nothing is missed
                    or self._publisher.local_fd in self._ready_sockets):
                self._publisher.handle_subscriptions()
            if self._ready_sockets:
                intake.receive()
            if self._first_in_ns is None and intake.received_any:
                self._first_in_ns = self._clock.now_ns() - self._start_ns
            if is_source and not self._stop_requested and time.monotonic() >= next_step:
                if period_s:
                    self._step({}, frozenset())
                    next_step += period_s
                    if time.monotonic() - next_step > period_s:
                        next_step = time.monotonic()  # fell behind: keep the grid, skip the lost slots
                else:  # free-running: a burst of steps between looks at control and subscriptions
                    burst_end = time.monotonic() + FREE_RUN_BURST_S
                    while True:
                        self._step({}, frozenset())
                        if time.monotonic() >= burst_end:
                            break
                    if hasattr(os, "sched_yield"):
                        os.sched_yield()  # let ZeroMQ's I/O threads move what we queued
                    next_step = time.monotonic()
            for _ in range(MAX_STEPS_PER_TURN):
                ready = intake.take()
                if ready is None:
                    break
                try:
                    self._step(*ready)
                finally:
                    intake.done_with(ready[0])
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + self._timing.stats_interval_s
                self._control.send(STATS, {"stats": self.stats().to_dict(), "info": self._info()})

    def _step(self, inputs: dict[str, Sample], fresh: frozenset[str]) -> None:
        assert self._node is not None and self._publisher is not None
        now = self._clock.now_ns()
        for key in fresh:
            t_ns = inputs[key].t_ns
            if t_ns is not None:
                self._latency.add(now - t_ns)
        publisher = self._publisher
        try:
            result = self._node.step(inputs)
            outputs = _split_outputs(result, self._ports)
            if not outputs:
                return
            done_ns = self._clock.now_ns()
            self._rate.tick(done_ns)
            if self._first_out_ns is None:
                self._first_out_ns = done_ns - self._start_ns
            for port, value in outputs:
                sample = value if isinstance(value, Sample) else Sample(value)
                t_ns = done_ns if sample.t_ns is None else sample.t_ns
                seq = publisher.publish(port, sample.value, t_ns, sample.rate_hz)
                publisher.offer_preview(port, sample.value, t_ns)
                if self._recorder is not None:
                    self._recorder.record(port, seq, t_ns, publisher.for_recording(sample.value), sample.rate_hz,
                                          local_ns=self._clock.mapping.to_local_ns(t_ns))
        finally:
            publisher.end_step()

    # -- reporting and the end ---------------------------------------------------------------

    def stats(self) -> NodeStats:
        record = self._recorder.stats if self._recorder is not None else None
        received, lost, skipped = self._intake.counts() if self._intake is not None else ({}, {}, {})
        return NodeStats(
            samples_out=sum(self._publisher.sent(p) for p in self._ports) if self._publisher else 0,
            samples_in=received,
            dropped_in=lost,
            skipped_in=skipped,
            rate_hz=self._rate.rate_hz,
            latency_ms=self._latency.percentiles_ms(),
            record_backlog=record.backlog if record else 0,
            record_dropped=record.dropped if record else 0,
            record_bytes=record.bytes if record else 0,
            dropped_out=self._publisher.pool_dropped if self._publisher else 0,
            source_lost=self._source_lost(),
            first_in_ns=self._first_in_ns,
            first_out_ns=self._first_out_ns,
            sent_in_place=self._publisher.lent_sent if self._publisher else 0,
        )

    def _info(self) -> dict[str, Any]:
        """What the node reported about itself, if it is plain data (else a note saying why not)."""
        info = self._node_context.info if self._node_context is not None else {}
        try:
            pack_object(info)
        except CpError as err:
            return {"error": f"info is not plain data: {err.message}"}
        return dict(info)

    def _source_lost(self) -> int:
        lost = self._node_context.info.get("lost", 0) if self._node_context is not None else 0
        return int(lost) if isinstance(lost, (int, float)) and not isinstance(lost, bool) else 0

    def _report_error(self, phase: str, err: BaseException) -> None:
        message = str(err) if isinstance(err, CpError) else f"{type(err).__name__}: {err}"  # with its hint
        self._log.error("node %s failed in %s: %s\n%s", self.node_id, phase, message,
                        "".join(traceback.format_exception(err)))
        self._control.send(ERROR, {"phase": phase, "message": message})

    def _finish(self) -> bool:
        """Tell subscribers we ended, close files, release devices, report; True if that failed."""
        failed = False
        files: list[dict[str, Any]] = []
        if self._publisher is not None:
            self._publisher.end()
        if self._recorder is not None:
            try:
                files = [asdict(f) for f in self._recorder.stop(self._timing.exit_timeout_s)]
            except RecordingError as err:  # a writer failed: say so, keep every file that finished
                failed = True
                files = [asdict(f) for f in err.files]
                self._report_error("record", err)
            except Exception as err:
                failed = True
                self._report_error("record", err)
        if self._set_up and self._node is not None:
            try:
                self._node.teardown()
            except Exception as err:
                failed = True
                self._report_error("teardown", err)
        if self._intake is not None:
            self._intake.account_for_the_end()
        if self._config:
            stats = self.stats().to_dict()
            try:
                if self._recorder is not None:
                    write_node_record(Path(self._config["session_dir"]), self._config["worker"], self.node_id,
                                      stats, files, self._info())
            except OSError as err:
                failed = True
                self._report_error("record", err)
            sent = {p: self._publisher.sent(p) for p in self._ports} if self._publisher else {}
            self._control.send(DONE, {"stats": stats, "files": files, "failed": failed, "sent": sent,
                                      "info": self._info()})
        if self._intake is not None:
            self._intake.close()
        if self._publisher is not None:
            self._publisher.close(END_LINGER_MS, keep_pool=True)  # the last samples queued must leave
        self._control.close()
        self._context.term()  # returns once they left (or END_LINGER_MS passed)
        if self._publisher is not None:
            self._publisher.close_pool()
        return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpcli.runtime.driver", description="run one cpcli node")
    parser.add_argument("--control", required=True, help="the supervisor's control endpoint")
    parser.add_argument("--node", required=True, help="node id")
    parser.add_argument("--parent", type=int, required=True, help="supervisor pid; exit when it dies")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle, in order
    die_with_parent(args.parent)
    driver = Driver(args.control, args.node, args.parent, data_security.take(os.environ))
    signal.signal(signal.SIGTERM, driver.request_stop)
    return driver.run()


if __name__ == "__main__":
    sys.exit(main())
