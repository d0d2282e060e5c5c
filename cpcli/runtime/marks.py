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

import psutil

from cpcli.cluster.locate import netns_id, runtime_dir


def announce(session: str, events: Path, start_ns: int) -> Path:
    path = runtime_dir() / f"session-{netns_id()}-{os.getpid()}.json"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "session": session, "events": str(events), "start_ns": start_ns}))
    tmp.replace(path)
    return path


def forget(path: Path) -> None:
    path.unlink(missing_ok=True)


def running() -> list[dict[str, Any]]:
    """Sessions recording on this machine (in this network namespace) without a manager."""
    found = []
    for path in sorted(runtime_dir().glob(f"session-{netns_id()}-*.json")):
        try:
            data = json.loads(path.read_text())
            alive = psutil.pid_exists(int(data["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if alive:
            found.append(data)
    return found


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
