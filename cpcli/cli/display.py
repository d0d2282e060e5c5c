"""Rich renderables for the CLI: node progress, the session summary, the node type list."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from cpcli.monitor.health import node_view_from_status
from cpcli.monitor.view import NodesTable
from cpcli.registry import Registry
from cpcli.runtime.plan import NodeState, NodeStatus
from cpcli.runtime.session import Progress, SessionResult
from cpcli.units import format_bytes, format_duration

_STATE_STYLE = {
    NodeState.RUNNING: "green", NodeState.READY: "cyan", NodeState.DONE: "green",
    NodeState.FAILED: "bold red", NodeState.STOPPING: "yellow", NodeState.LOST: "bold red",
}


def _node_row(node: NodeStatus) -> list[str | Text]:
    stats = node.stats
    received = sum(stats.samples_in.values())
    dropped = stats.dropped_total
    inputs = f"{received}" + (f" ({dropped} dropped)" if dropped else "") if stats.samples_in else "-"
    latency = f"{stats.latency_ms['p50']:.1f} / {stats.latency_ms['p99']:.1f}" if stats.samples_in else "-"
    recorded = format_bytes(stats.record_bytes) if stats.record_bytes or node.files else "-"
    state = Text(node.state.value, style=_STATE_STYLE.get(node.state, ""))
    return [node.id, node.type, state, str(stats.samples_out), f"{stats.rate_hz:.1f}", inputs, latency, recorded]


def nodes_table(nodes: dict[str, NodeStatus], title: str | None = None) -> Table:
    """One row per node; a `worker` column when the nodes run on more than one machine."""
    spread = len({n.worker for n in nodes.values()}) > 1
    table = Table(title=title, title_justify="left", expand=False, pad_edge=False)
    for header, justify in (("node", "left"), ("type", "left"), ("worker", "left"), ("state", "left"),
                            ("out", "right"), ("rate Hz", "right"), ("in", "right"),
                            ("latency ms p50/p99", "right"), ("recorded", "right")):
        if header != "worker" or spread:
            table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for node in nodes.values():
        row = _node_row(node)
        table.add_row(*(row[:2] + [node.worker] + row[2:] if spread else row))
    return table


def progress_view(progress: Progress) -> Group:
    """`cp run`'s live view: the nodes as `cp monitor` shows them (rate, drops, latency, recorded, why)."""
    title = f"{progress.phase} {progress.session_dir.name}  {format_duration(progress.elapsed_s)}"
    spread = len({n.worker for n in progress.nodes.values()}) > 1
    rows = [node_view_from_status(n) for n in progress.nodes.values()]
    return Group(Text(title, style="bold"), NodesTable(rows, show_worker=spread))


def summary_lines(result: SessionResult) -> list[str]:
    files = [f for node in result.manifest["nodes"].values() for f in node.get("files", [])]
    size = sum(int(f.get("bytes", 0)) for f in files)
    state = "interrupted" if result.interrupted else result.manifest.get("status", "complete")
    return [
        f"session {state}: recorded {format_duration(result.duration_s)}, {len(files)} files, {format_bytes(size)}",
        f"session folder: {result.session_dir}",
    ]


def node_types_table(registry: Registry) -> Table:
    table = Table(expand=False, pad_edge=False)
    table.add_column("type")
    table.add_column("parameters")
    table.add_column("outputs")
    table.add_column("description")
    for node_type in registry.types.values():
        params = ", ".join(
            f"{p.name}: {p.type_name}" + ("" if p.required else f" = {p.default!r}") for p in node_type.params
        )
        table.add_row(node_type.name, params or "-", ", ".join(node_type.outputs), node_type.doc)
    return table
