"""Rich renderables for `cp inspect` (streams and findings) and `cp devices` (devices by kind); no I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from cpcli.archive.inspect import SessionReport, StreamReport
from cpcli.node import DeviceInfo
from cpcli.units import format_duration

NOTES_INLINE_WIDTH = 100  # narrower consoles get each stream's notes below the table
DEVICE_KINDS = {  # kinds `cp devices` always speaks about, with what to try when there are none
    "camera": "connect one, or check that your user may open /dev/video* (group `video`)",
    "microphone": "check the sound server is running and PortAudio is installed (apt install libportaudio2)",
    "speaker": "check the sound server is running and PortAudio is installed (apt install libportaudio2)",
}


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.1f}"


def _stream_row(stream: StreamReport) -> list[str | Text]:
    nominal = _rate(stream.nominal_rate_hz)
    if stream.nominal_from == "median interval":
        nominal = "~" + nominal  # estimated from the data, not declared
    unverified = any(f.status == "unverified" for f in stream.files)
    bad = any(f.status not in ("ok", "unverified", "unlisted") for f in stream.files)
    ok = "?" if unverified and not bad else str(stream.files_ok)  # ?: no record to check the files against
    files = Text(f"{ok}/{len(stream.files)}", style="red" if bad else "")
    jitter = "-" if stream.jitter_p99_ms is None else f"{stream.jitter_p99_ms:.1f}"
    notes = Text(", ".join(stream.notes), style="red" if bad or "problem" in " ".join(stream.notes) else "")
    return [stream.name, stream.kind, format_duration(stream.duration_s), str(stream.samples),
            f"{_rate(stream.rate_hz)}/{nominal}", str(stream.gaps.count), str(stream.drops.total), jitter, files, notes]


def session_line(report: SessionReport) -> str:
    duration = "" if report.duration_s is None else f", {format_duration(report.duration_s)}"
    recipe = f" recipe {report.recipe}" if report.recipe else ""
    return f"session {report.session} ({report.status}{duration}){recipe}: {report.path}"


def streams_table(report: SessionReport, width: int = NOTES_INLINE_WIDTH) -> RenderableType:
    """A row per stream: rates actual/nominal (~: nominal from the median interval); on a console
    narrower than NOTES_INLINE_WIDTH the notes follow the table instead of filling a column."""
    inline = width >= NOTES_INLINE_WIDTH
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=0)
    for header, justify in (("stream", "left"), ("kind", "left"), ("duration", "right"), ("samples", "right"),
                            ("rate Hz\nactual/nominal", "right"), ("gaps", "right"), ("drops", "right"),
                            ("jitter\np99 ms", "right"), ("files\nok", "right")):
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    if inline:
        table.add_column("notes")
    for stream in report.streams:
        row = _stream_row(stream)
        table.add_row(*(row if inline else row[:-1]))
    notes = [Text.assemble(f"  {s.name}: ", _stream_row(s)[-1]) for s in report.streams if s.notes and not inline]
    return Group(table, *notes)


def findings_lines(report: SessionReport) -> list[Text]:
    """The problems, then the warnings, one line each, and a verdict."""
    lines: list[Text] = []
    for title, items, mark, style in (("problems", report.problems, "x", "red"),
                                      ("warnings", report.warnings, "!", "yellow")):
        if items:
            lines.append(Text(f"{title} ({len(items)}):", style=f"bold {style}"))
            lines.extend(Text.assemble(("  " + mark + " ", style), finding.line) for finding in items)
    streams = f"{len(report.streams)} stream{'s' if len(report.streams) != 1 else ''}"
    if report.problems:
        lines.append(Text(f"{len(report.problems)} problems in {streams}", style="bold red"))
    else:
        lines.append(Text(f"ok: no problems in {streams}", style="bold green"))
    return lines


def _details(details: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in details.items()) or "-"


def devices_table(kind: str, devices: Sequence[tuple[DeviceInfo, tuple[str, ...]]]) -> Table:
    """One kind's devices: what to write in a recipe (`type:` and `device:`), the name and the details."""
    table = Table(title=f"{kind}s", title_justify="left", expand=False, pad_edge=False)
    for header in ("device", "node type", "name", "details"):
        table.add_column(header)
    for device, types in devices:
        table.add_row(device.device, ", ".join(types), device.name, _details(device.details))
    return table


def no_devices_line(kind: str) -> str:
    hint = DEVICE_KINDS.get(kind, "")
    return f"no {kind}s found" + (f"; {hint}" if hint else "")
