"""`cp mark` on this machine: a running local session says where its events go, marks are appended there.

A session run here (no manager) leaves a small file in the user's runtime folder while it records:
its events file and its start on this machine's monotonic clock. `cp mark` appends one line to that
file with its own reading of the same clock, so the mark lands at the time of the call. Lines are
written with one `write()` each in append mode, so they never interleave with the session's own.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from cpcli.cluster.locate import forget_record, live_records, netns_id, write_record


def announce(session: str, events: Path, start_ns: int) -> Path:
    return write_record(f"session-{netns_id()}-{os.getpid()}",
                        {"session": session, "events": str(events), "start_ns": start_ns})


def forget(path: Path) -> None:
    forget_record(path)


def running() -> list[dict[str, Any]]:
    """Sessions recording on this machine (in this network namespace) without a manager."""
    return live_records(f"session-{netns_id()}-*")


def mark_here(session: dict[str, Any], label: str, meta: dict[str, Any]) -> int:
    """Append the mark to a local session's events; returns its session time (ns)."""
    t_ns = time.monotonic_ns() - int(session["start_ns"])
    line = json.dumps({"t_ns": t_ns, "event": "mark", "label": label, "meta": meta}) + "\n"
    fd = os.open(session["events"], os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return t_ns
