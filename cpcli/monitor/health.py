"""How `cp monitor` judges what it sees: current and nominal rates, what is wrong with a node, event lines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cpcli.monitor.state import EventView, NodeView, Problem
from cpcli.runtime.plan import NodeStatus

RATE_WINDOW_S = 3.0  # current rates over about this long: several stats reports (every 0.5 s)
STALL_S = 3.0  # a running node whose output count has not moved for this long is stalled
WARMUP_S = 3.0  # no "slow" verdict in the first seconds of a session: rates are still settling
SLOW_SHARE = 0.9  # below this share of its nominal rate a node is slow
RATE_ROUNDING = 0.0005  # stats carry rate_hz rounded to 3 decimals
BACKLOG_WARN = 30  # samples queued for the writer: it is falling behind
LATENCY_WARN_MS = 500.0  # p99 capture-to-step latency above this is worth a look


def as_int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def as_float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def counts(value: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in value.items() if as_int(v) is not None} if isinstance(value, dict) else {}


def nominal_rate(params: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> float | None:
    """Steps a second a source is set to: `rate_hz` or `fps`, or audio blocks (`samplerate / blocksize`)."""
    merged = {**(defaults or {}), **params}
    for key in ("rate_hz", "fps"):
        value = as_float(merged.get(key))
        if value is not None:
            return value if value > 0 else None  # 0: as fast as possible, no nominal rate
    samplerate, blocksize = as_float(merged.get("samplerate")), as_float(merged.get("blocksize"))
    if samplerate and blocksize and samplerate > 0 and blocksize > 0:
        return samplerate / blocksize
    return None


@dataclass(frozen=True)
class Report:
    """A node's output count as the monitor first saw it change (t: monotonic seconds)."""

    t: float
    count: int
    rate_hz: float  # the node's own meter: (count - 1) / (time of last step - time of first step)


def current_rate(reports: Sequence[Report], now: float, window_s: float = RATE_WINDOW_S) -> float | None:
    """Output rate over the last `window_s`, from reports taken whenever the count changed.

    The node's meter gives the time of its last step exactly ((count - 1) / rate_hz after its first),
    so two reports give the rate between them without the jitter of when they reached us; when the
    rounding of rate_hz makes that imprecise (hours into a session), the reports' arrival times are used.
    """
    if len(reports) < 2:
        return None
    new = reports[-1]
    if now - new.t > STALL_S:
        return 0.0
    older = [r for r in reports[:-1] if r.t >= new.t - window_s]
    old = older[0] if older else reports[-2]
    steps = new.count - old.count
    if steps <= 0:
        return None
    if old.rate_hz > 0 and new.rate_hz > 0 and old.count > 1:
        span_old, span_new = (old.count - 1) / old.rate_hz, (new.count - 1) / new.rate_hz
        error = ((old.count - 1) / old.rate_hz**2 + (new.count - 1) / new.rate_hz**2) * RATE_ROUNDING
        if span_new > span_old and error < 0.02 * (span_new - span_old):
            rate = steps / (span_new - span_old)
            if rate <= 3 * max(old.rate_hz, new.rate_hz):  # a multi-port node's counts do not fit its meter
                return rate
    dt = new.t - old.t
    return steps / dt if dt > 0.2 else None


def node_problems(node: NodeView, elapsed_s: float, phase: str, dropping: Mapping[str, int],
                  stalled_s: float | None) -> tuple[Problem, ...]:
    """What is wrong with a node, and why, worst first."""
    problems: list[Problem] = []
    if node.state == "failed":
        problems.append(Problem(f"failed: {node.error or 'no reason given'}", "error"))
    elif node.state == "lost":
        problems.append(Problem(f"worker {node.worker} lost", "error"))
    elif node.error:
        problems.append(Problem(node.error, "error"))
    if node.record_dropped:
        problems.append(Problem(f"recording lost {node.record_dropped}", "error"))
    for key, more in dropping.items():
        problems.append(Problem(f"dropping from {key} (+{more})", "error"))
    running = node.state == "running" and phase == "running"
    if running and stalled_s is not None:
        problems.append(Problem(f"no output for {stalled_s:.0f} s"))
    elif running and node.nominal_hz and node.rate_hz is not None and elapsed_s > WARMUP_S \
            and node.rate_hz < SLOW_SHARE * node.nominal_hz:
        problems.append(Problem(f"slow: {node.rate_hz:.1f} of {node.nominal_hz:g} Hz"))
    if node.record_backlog > BACKLOG_WARN:
        problems.append(Problem(f"writer behind: {node.record_backlog} queued"))
    if node.source_lost:
        problems.append(Problem(f"device lost {node.source_lost}"))
    if node.dropped_out:
        problems.append(Problem(f"{node.dropped_out} not delivered (pool full)"))
    dropped = sum(node.dropped_in.values())
    if dropped and not dropping:
        problems.append(Problem(f"dropped {dropped} so far"))
    if node.latency_ms is not None and node.latency_ms[1] > LATENCY_WARN_MS:
        problems.append(Problem(f"latency p99 {node.latency_ms[1]:.0f} ms"))
    return tuple(problems)


def _fields_text(fields: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in fields.items())


def event_view(event: Mapping[str, Any]) -> EventView:
    """One line of the event log for a session event (lifecycle, errors with node and worker, marks)."""
    name = str(event.get("event", "?"))
    t_s = (as_int(event.get("t_ns")) or 0) / 1e9
    rest = {k: v for k, v in event.items() if k not in ("t_ns", "event", "session")}
    if name == "mark":
        meta = rest.get("meta") if isinstance(rest.get("meta"), dict) else {}
        extra = f" {_fields_text(meta)}" if meta else ""
        return EventView(t_s, f"mark {rest.get('label', '')}{extra}", "mark")
    if name == "worker_lost":
        nodes = rest.get("nodes") or []
        on = f" ({', '.join(str(n) for n in nodes)})" if nodes else ""
        return EventView(t_s, f"worker {rest.get('worker')} lost{on}", "error")
    if name == "node_failed":
        return EventView(t_s, f"node {rest.get('node')} failed on {rest.get('worker')}: {rest.get('error')}", "error")
    if name == "worker_rejoined":
        return EventView(t_s, f"worker {rest.get('worker')} rejoined")
    if name == "session_stopping":
        return EventView(t_s, f"session stopping: {rest.get('reason', '')}")
    if name in ("worker_unfinished", "client_lost"):
        return EventView(t_s, f"{name.replace('_', ' ')} {_fields_text(rest)}".strip(), "warn")
    return EventView(t_s, f"{name.replace('_', ' ')} {_fields_text(rest)}".strip())


def with_problems(view: NodeView, problems: tuple[Problem, ...]) -> NodeView:
    return replace(view, problems=problems)


def node_view_from_status(status: NodeStatus, nominal_hz: float | None = None) -> NodeView:
    """A node of `cp run`'s own progress as the monitor shows it (its rate: the node's average so far)."""
    stats = status.stats
    view = NodeView(
        id=status.id, type=status.type, worker=status.worker, state=status.state.value,
        samples_out=stats.samples_out, rate_hz=stats.rate_hz if stats.samples_out > 1 else None,
        nominal_hz=nominal_hz, samples_in=dict(stats.samples_in), dropped_in=dict(stats.dropped_in),
        latency_ms=(stats.latency_ms["p50"], stats.latency_ms["p99"]) if stats.samples_in else None,
        record_backlog=stats.record_backlog, record_bytes=stats.record_bytes, record_dropped=stats.record_dropped,
        dropped_out=stats.dropped_out, source_lost=stats.source_lost, error=status.error)
    return with_problems(view, node_problems(view, 0.0, "", {}, None))
