"""How `cp status` shows the cluster to a person: the manager, a table of workers, the session's nodes."""

from __future__ import annotations

from typing import Any

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from cpcli.units import format_bytes, format_duration

_WORKER_STYLE = {"ready": "cyan", "running": "green", "lost": "bold red"}


def _bytes(value: Any) -> str:
    return format_bytes(int(value)) if isinstance(value, (int, float)) else "-"


def _clock_cells(clock: Any) -> tuple[str, str]:
    """`+1.234 ms ± 12 us` and the drift, or dashes before the first estimate."""
    if not isinstance(clock, dict):
        return "-", "-"
    offset, uncertainty = int(clock["offset_ns"]), int(clock["uncertainty_ns"])
    shown = f"{offset / 1e9:+.6f} s" if abs(offset) >= 1e9 else f"{offset / 1e6:+.3f} ms"
    return f"{shown} ± {uncertainty / 1e3:.0f} us", f"{float(clock['drift_ppm']):+.2f}"


def workers_table(workers: list[dict[str, Any]]) -> Table:
    table = Table(title="workers", title_justify="left", pad_edge=False)
    for header, justify in (("name", "left"), ("host", "left"), ("state", "left"), ("CPU", "right"),
                            ("mem free", "right"), ("disk free", "right"), ("clock offset", "right"),
                            ("drift ppm", "right"), ("heartbeat", "right")):
        # names, addresses and states are never cut short: the other columns wrap first on a narrow terminal
        keep = header in ("name", "host", "state")
        table.add_column(header, justify=justify, no_wrap=keep,  # type: ignore[arg-type]
                         min_width=max((len(str(w.get(header, ""))) for w in workers), default=0) if keep else None)
    for w in workers:
        cpu = w.get("cpu_percent")
        cores = w.get("cpu_count")
        cpu_text = f"{cpu:.0f}% of {cores}" if isinstance(cpu, (int, float)) else "-"
        table.add_row(str(w["name"]), str(w["host"]), Text(str(w["state"]), style=_WORKER_STYLE.get(w["state"], "")),
                      cpu_text, _bytes(w.get("memory_available")), _bytes(w.get("disk_free")),
                      *_clock_cells(w.get("clock")), f"{w.get('last_heartbeat_s', 0):.1f} s ago")
    return table


def session_table(session: dict[str, Any]) -> Table:
    title = (f"session {session['name']} ({session['phase']}, {format_duration(float(session['elapsed_s']))})"
             + (f"; lost workers: {', '.join(session['lost'])}" if session.get("lost") else ""))
    table = Table(title=title, title_justify="left", pad_edge=False)
    for header, justify in (("node", "left"), ("type", "left"), ("worker", "left"), ("state", "left"),
                            ("out", "right"), ("rate Hz", "right"), ("dropped", "right")):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for node_id, node in session["nodes"].items():
        stats = node.get("stats") or {}
        dropped = sum((stats.get("dropped_in") or {}).values()) + int(stats.get("record_dropped") or 0) + \
            int(stats.get("dropped_out") or 0) + int(stats.get("source_lost") or 0)
        table.add_row(node_id, str(node.get("type", "")), str(node.get("worker", "")), str(node.get("state", "")),
                      str(stats.get("samples_out", 0)), f"{float(stats.get('rate_hz', 0.0)):.1f}", str(dropped))
    return table


def status_view(status: dict[str, Any]) -> list[RenderableType]:
    manager = status["manager"]
    local = f", local worker {manager['local_worker']}" if manager.get("local_worker") else ""
    lines: list[RenderableType] = [Text(
        f"manager {manager['name']} of cluster {manager['cluster']} at {manager['address']} "
        f"(cpcli {manager['version']}, up {format_duration(float(manager['uptime_s']))}{local})")]
    workers = status.get("workers") or []
    lines.append(workers_table(workers) if workers else Text("no worker has joined"))
    session = status.get("session")
    lines.append(session_table(session) if session else Text("no session running"))
    return lines
