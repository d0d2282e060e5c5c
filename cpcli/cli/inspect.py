"""`cp inspect`: the data-quality report of a recorded session; exit 1 if it found a problem."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cpcli.archive.inspect import inspect_session
from cpcli.cli.output import out_console
from cpcli.cli.reports import findings_lines, session_line, streams_table


def inspect_command(
    session_dir: Path = typer.Argument(..., metavar="SESSION_DIR", help="A session folder (from cp run or collect)."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON, for scripts."),
) -> int:
    """Check a recorded session: per-stream duration, rate, gaps, drops, jitter, files, audio, video."""
    report = inspect_session(session_dir)
    if as_json:
        out_console.print_json(json.dumps(report.to_dict()))
        return report.exit_code
    out_console.print(session_line(report), markup=False)
    out_console.print(streams_table(report, out_console.width))
    for line in findings_lines(report):
        out_console.print(line)
    return report.exit_code
