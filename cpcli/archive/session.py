"""The session folder: its name, its recipe copy and its lifecycle event log."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cpcli.errors import ArchiveError

SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # becomes a folder name on every OS


def utc_stamp(moment: datetime) -> str:
    """UTC as the manifest writes it: 2026-11-25T14:03:12.123456Z."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_session_name(recipe_name: str, moment: datetime) -> str:
    return f"{moment.astimezone(timezone.utc).strftime('%Y-%m-%dT%H-%M-%S')}_{recipe_name}"


def create_session_dir(out_dir: Path, name: str, *, exact: bool) -> Path:
    """Create a new, empty session folder; never reuse one that holds a recording.

    With `exact` (the user chose the name) an existing folder is an error; otherwise a
    suffix keeps two sessions started in the same second apart.
    """
    if not SESSION_NAME.match(name) or name in (".", ".."):
        raise ArchiveError(f"session name {name!r} cannot be a folder name",
                           hint="use letters, digits, '-', '_' and '.'")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ArchiveError(f"cannot create the sessions folder {out_dir} ({err.strerror})",
                           hint="choose another --out") from err
    for attempt in range(1, 100):
        candidate = out_dir / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            if exact:
                raise ArchiveError(f"session folder {candidate} already exists",
                                   hint="choose another --session; recorded sessions are never overwritten") from None
        except OSError as err:
            raise ArchiveError(f"cannot create session folder {candidate} ({err.strerror})") from err
    raise ArchiveError(f"too many sessions named {name} in {out_dir}")


class EventLog:
    """`events.jsonl`: lifecycle events and marks, one JSON object a line, flushed at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - owned until close()

    def write(self, t_ns: int, event: str, **fields: Any) -> None:
        self._file.write(json.dumps({"t_ns": t_ns, "event": event, **fields}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
