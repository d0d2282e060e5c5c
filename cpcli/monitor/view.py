"""How `cp monitor` looks: rich renderables of a `Snapshot`, laid out to the terminal's size, free of I/O.

`MonitorView` fills the screen top down: header, workers, nodes, previews, event log, keys. When
the terminal is short, the previews go first, then the event log shrinks, then the tables are cut
(saying how many rows are hidden). Columns of the tables drop by priority when it is narrow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text

from cpcli.monitor import tiles
from cpcli.monitor.state import (
    CLOCK_WARN_NS,
    DISK_LOW_BYTES,
    ClockView,
    EventView,
    NodeView,
    Problem,
    Snapshot,
    WorkerView,
)
from cpcli.units import format_bytes, format_duration

STATE_STYLE = {"running": "green", "ready": "cyan", "done": "green", "failed": "bold red", "lost": "bold red",
               "stopping": "yellow", "starting": "yellow", "bound": "yellow"}
SEVERITY_STYLE = {"error": "bold red", "warn": "yellow", "mark": "bold magenta", "info": ""}
WHY_MIN_WIDTH = 12  # the "why" column never gets narrower than this; other columns drop first
OPTIONAL_PRIORITY = 4  # columns of this priority and less important also drop to give "why" its full width
EVENTS_MIN_ROWS = 3  # the event log's title and two events stay when previews are dropped
EVENTS_MAX_ROWS = 7  # with room to spare, the previews get it
Line = list[Segment]


# -- cells ------------------------------------------------------------------------------------------


def clock_cell(clock: ClockView | None) -> Text:
    """`+0.012 ms ±45 us`, yellow when the estimate is less certain than the manifest allows."""
    if not isinstance(clock, ClockView):
        return Text("-", style="dim")
    offset = clock.offset_ns
    shown = f"{offset / 1e9:+.3f} s" if abs(offset) >= 1e9 else f"{offset / 1e6:+.3f} ms"
    return Text(f"{shown} ±{clock.uncertainty_ns / 1e3:.0f} us",
                style="yellow" if clock.uncertainty_ns > CLOCK_WARN_NS else "")


def _short_number(value: float) -> str:
    """30 -> `30`, 46.875 -> `46.9`."""
    return f"{value:.1f}".rstrip("0").rstrip(".")


def rate_cell(node: NodeView) -> Text:
    """Actual / nominal steps per second; red when slow or stalled."""
    actual = "-" if node.rate_hz is None else f"{node.rate_hz:.1f}"
    text = actual if node.nominal_hz is None else f"{actual}/{_short_number(node.nominal_hz)}"
    slow = any(p.text.startswith(("slow", "no output")) for p in node.problems)
    return Text(text, style="bold red" if slow else "")


def drops_cell(node: NodeView) -> Text:
    """Samples lost on the way, per input (one number when there is one input); '-' for a source."""
    if not node.dropped_in:
        return Text("-", style="dim")
    values = list(node.dropped_in.items())
    text = str(values[0][1]) if len(values) == 1 else " ".join(f"{k}:{v}" for k, v in values)
    dropping = any(p.text.startswith("dropping") for p in node.problems)
    return Text(text, style="bold red" if dropping else "yellow" if any(v for _, v in values) else "")


def why_cell(problems: Sequence[Problem]) -> Text:
    if not problems:
        return Text("")
    worst = problems[0]
    more = f" (+{len(problems) - 1})" if len(problems) > 1 else ""
    return Text(worst.text + more, style=SEVERITY_STYLE[worst.severity])


# -- tables that fit the width ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Column:
    header: str
    priority: int  # 0 stays longest
    cells: list[Text]
    justify: str = "left"
    flexible: bool = False  # takes what is left, cut with an ellipsis

    @property
    def width(self) -> int:
        return max([len(self.header), *(c.cell_len for c in self.cells)])


def _fitted(columns: list[_Column], width: int, row_styles: Sequence[str]) -> Table:
    """A borderless table of the columns that fit `width`, dropping the least important first."""
    kept = list(columns)

    def needed(cols: list[_Column]) -> int:
        return sum(min(c.width, WHY_MIN_WIDTH) if c.flexible else c.width for c in cols) + len(cols) - 1

    def squeezed(cols: list[_Column]) -> bool:  # the flexible column has less than it would like
        return any(c.flexible and c.width > width - (needed(cols) - min(c.width, WHY_MIN_WIDTH)) for c in cols)

    while len(kept) > 1 and (needed(kept) > width or squeezed(kept)):
        least = OPTIONAL_PRIORITY if needed(kept) <= width else 1  # only optional columns make room for "why"
        drop = max((c for c in kept if c.priority >= least), key=lambda c: c.priority, default=None)
        if drop is None:
            break
        kept.remove(drop)
    fixed = sum(c.width for c in kept if not c.flexible) + len(kept) - 1
    table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), show_edge=False, header_style="bold",
                  expand=False)
    for column in kept:
        if column.flexible:
            table.add_column(column.header, no_wrap=True, overflow="ellipsis", max_width=max(1, width - fixed))
        else:
            table.add_column(column.header, justify=column.justify, no_wrap=True,  # type: ignore[arg-type]
                             overflow="ellipsis", min_width=column.width)
    rows = len(kept[0].cells) if kept else 0
    for i in range(rows):
        table.add_row(*(c.cells[i] for c in kept), style=row_styles[i] if i < len(row_styles) else "")
    return table


class NodesTable:
    """One row per node: rate (actual/nominal), drops per input, latency, writer queue, bytes, and why not well."""

    def __init__(self, nodes: Sequence[NodeView], selected: str | None = None, show_worker: bool = True) -> None:
        self.nodes, self.selected, self.show_worker = nodes, selected, show_worker

    def columns(self) -> list[_Column]:
        nodes = self.nodes
        recording = [n.record_bytes or n.record_backlog for n in nodes]
        cols = [
            _Column("node", 0, [Text(("▸" if n.id == self.selected else " ") + n.id) for n in nodes]),
            _Column("type", 5, [Text(n.type) for n in nodes]),
            _Column("worker", 2, [Text(n.worker) for n in nodes]),
            _Column("state", 0, [Text(n.state, style=STATE_STYLE.get(n.state, "")) for n in nodes]),
            _Column("Hz now/set" if any(n.nominal_hz for n in nodes) else "Hz", 0, [rate_cell(n) for n in nodes],
                    "right"),
            _Column("out", 7, [Text(str(n.samples_out)) for n in nodes], "right"),
            _Column("drops", 1, [drops_cell(n) for n in nodes], "right"),
            _Column("lat ms", 3, [Text("-" if n.latency_ms is None else f"{n.latency_ms[0]:.1f}/{n.latency_ms[1]:.1f}",
                                       style="dim" if n.latency_ms is None else "") for n in nodes], "right"),
            _Column("queue", 6, [Text(str(n.record_backlog) if r else "-", style="" if r else "dim")
                                 for n, r in zip(nodes, recording, strict=True)], "right"),
            _Column("recorded", 2, [Text(format_bytes(n.record_bytes) if r else "-", style="" if r else "dim")
                                    for n, r in zip(nodes, recording, strict=True)], "right"),
            _Column("why", 1, [why_cell(n.problems) for n in nodes], flexible=True),
        ]
        return [c for c in cols if c.header != "worker" or self.show_worker]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        styles = ["reverse" if n.id == self.selected else "" for n in self.nodes]
        yield _fitted(self.columns(), options.max_width, styles)


class WorkersTable:
    """One row per worker; a lost one in red."""

    def __init__(self, workers: Sequence[WorkerView]) -> None:
        self.workers = workers

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        ws = self.workers

        def cpu(w: WorkerView) -> str:
            return "-" if w.cpu_percent is None else f"{w.cpu_percent:.0f}% of {w.cpu_count or '?'}"

        def disk(w: WorkerView) -> Text:
            if w.disk_free is None:
                return Text("-", style="dim")
            return Text(format_bytes(w.disk_free), style="bold red" if w.disk_free < DISK_LOW_BYTES else "")

        cols = [
            _Column("worker", 0, [Text(w.name) for w in ws]),
            _Column("host", 2, [Text(w.host) for w in ws]),
            _Column("state", 0, [Text(w.state, style=STATE_STYLE.get(w.state, "")) for w in ws]),
            _Column("CPU", 3, [Text(cpu(w)) for w in ws], "right"),
            _Column("mem free", 5, [Text("-" if w.memory_available is None else format_bytes(w.memory_available))
                                    for w in ws], "right"),
            _Column("disk free", 3, [disk(w) for w in ws], "right"),
            _Column("clock offset", 1, [clock_cell(w.clock) for w in ws], "right"),
            _Column("drift", 6, [Text("-" if w.clock is None else f"{w.clock.drift_ppm:+.1f} ppm") for w in ws],
                    "right"),
            _Column("heartbeat", 4, [Text("-" if w.heartbeat_s is None else f"{w.heartbeat_s:.1f} s ago")
                                     for w in ws], "right"),
        ]
        yield _fitted(cols, options.max_width, ["red" if w.state == "lost" else "" for w in ws])


# -- header, event log, keys ---------------------------------------------------------------------------


def time_left(seconds: float) -> str:
    """`42m`, `5h30m`, `12 days`: an estimate, so no seconds."""
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m"
    if minutes < 48 * 60:
        return f"{minutes // 60}h{minutes % 60:02d}m"
    return f"{minutes // (24 * 60)} days"


def header_text(snapshot: Snapshot) -> Text:
    text = Text()
    m = snapshot.manager
    if m is None:
        text.append("cp monitor: waiting for the manager's first answer", style="bold")
    else:
        text.append(f"cluster {m.cluster}", style="bold")
        text.append(f" · manager {m.name} at {m.address} · cpcli {m.version} · up {format_duration(m.uptime_s)}")
    s = snapshot.session
    text.append("\n")
    if s is None:
        text.append("no session running", style="dim")
    else:
        text.append(f"session {s.name}", style="bold")
        text.append(f" {s.phase} {format_duration(s.elapsed_s)}", style=STATE_STYLE.get(s.phase, ""))
        rate = f" at {format_bytes(s.record_rate_bps)}/s" if s.record_rate_bps is not None else ""
        text.append(f" · recorded {format_bytes(s.recorded_bytes)}{rate}")
        if s.disk is not None:
            left = f", {time_left(s.disk.time_left_s)} left" if s.disk.time_left_s is not None else ""
            text.append(f" · disk {s.disk.worker} {format_bytes(s.disk.free_bytes)} free{left}",
                        style="bold red" if s.disk.free_bytes < DISK_LOW_BYTES else "")
        if s.lost:
            text.append(f" · lost: {', '.join(s.lost)}", style="bold red")
    if snapshot.notice:
        text.append("\n")
        text.append(snapshot.notice, style="bold red")
    return text


def events_text(events: Sequence[EventView], rows: int) -> Text:
    """The newest `rows - 1` events under a title, oldest first."""
    text = Text("events", style="bold")
    for event in list(events)[-(rows - 1):] if rows > 1 else []:
        text.append("\n")
        text.append(f"{event.t_s:9.1f}s ", style="dim")
        text.append(event.text, style=SEVERITY_STYLE[event.severity])
    return text


def keys_text(snapshot: Snapshot) -> Text:
    """The bottom line: the keys, or the mark's label being typed."""
    ui = snapshot.ui
    text = Text()
    if ui.prompt is not None:
        text.append("mark label: ", style="bold magenta")
        text.append(ui.prompt + "▏")
        text.append("  Enter sends · Esc cancels", style="dim")
        return text
    for key, what in (("q", "quit"), ("m", "mark"), ("p", "previews " + ("off" if ui.previews_on else "on")),
                      ("←→/tab", "select node")):
        text.append(f" {key} ", style="reverse")
        text.append(f" {what}  ")
    return text


# -- the whole screen ----------------------------------------------------------------------------------


def _crop(lines: list[Line], rows: int, width: int, what: str) -> list[Line]:
    """At most `rows` lines, the last saying how many were hidden."""
    if len(lines) <= rows:
        return lines
    if rows <= 1:
        return lines[:max(0, rows)]
    note = Segment.adjust_line_length([Segment(f"… {len(lines) - rows + 1} more {what} (a taller terminal shows "
                                               "them)", Style(dim=True))], width)
    return [*lines[:rows - 1], note]


class MonitorView:
    """The full screen of `cp monitor` for one snapshot, at the console's width and height."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width, height = options.max_width, options.height or console.height
        opts = options.update(width=width, height=None, no_wrap=False, overflow="fold")  # a soft-wrap console too

        def render(renderable: RenderableType) -> list[Line]:
            return console.render_lines(renderable, opts, pad=True)

        snap = self.snapshot
        head = render(header_text(snap))
        keys = render(keys_text(snap))[:1]
        if snap.ui.message:  # the last message (a mark sent, an error), one line above the keys
            keys = render(Text(snap.ui.message, style="bold red" if snap.ui.message_error else "green"))[:1] + keys
        workers = render(WorkersTable(snap.workers) if snap.workers else Text("no worker has joined", style="dim"))
        nodes = render(NodesTable(snap.nodes, snap.ui.selected) if snap.nodes else Text(""))[:len(snap.nodes) + 1]
        room = height - len(head) - len(keys) - len(workers) - len(nodes)
        if room < 0:  # the tables themselves do not fit: cut the nodes, then the workers
            nodes = _crop(nodes, max(2, len(nodes) + room), width, "nodes")
            room = height - len(head) - len(keys) - len(workers) - len(nodes)
            workers = _crop(workers, max(2, len(workers) + room), width, "workers")
            room = height - len(head) - len(keys) - len(workers) - len(nodes)
        events_rows = min(len(snap.events) + 1, EVENTS_MAX_ROWS) if snap.events else 0
        previews: list[Line] = []
        if snap.ui.previews_on and snap.previews:
            space = room - min(events_rows, EVENTS_MIN_ROWS)
            if space >= tiles.MIN_ROWS:
                previews = tiles.panel(snap.previews, [n.id for n in snap.nodes], snap.ui.selected, width, space,
                                       color=console.color_system is not None)
        events_rows = min(len(snap.events) + 1, max(0, room - len(previews))) if snap.events else 0
        events = render(events_text(snap.events, events_rows))[:events_rows] if events_rows >= 2 else []
        lines = [*head, *workers, *nodes, *previews, *events]
        lines = lines[:max(0, height - len(keys))] + keys
        for i, line in enumerate(lines):
            yield from line
            if i < len(lines) - 1:
                yield Segment.line()


def plain_view(snapshot: Snapshot) -> Group:
    """The monitor's tables and events once, for an output that is not a terminal (a pipe, a log file)."""
    parts: list[RenderableType] = [header_text(snapshot)]
    parts.append(WorkersTable(snapshot.workers) if snapshot.workers else Text("no worker has joined"))
    if snapshot.nodes:
        parts.append(NodesTable(snapshot.nodes))
    if snapshot.events:
        parts.append(events_text(snapshot.events, len(snapshot.events) + 1))
    return Group(*parts)
