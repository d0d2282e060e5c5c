"""Durations as people type them: `30`, `30s`, `5m`, `1h`, `1.5m`."""

from __future__ import annotations

import re

from cpcli.errors import CpError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration; raises CpError naming the text and the accepted forms."""
    match = _DURATION.match(text)
    if not match:
        raise CpError(f"duration {text!r} is not understood", hint="use e.g. 30, 30s, 5m or 1h")
    seconds = float(match.group(1)) * _SECONDS[(match.group(2) or "s").lower()]
    if seconds <= 0:
        raise CpError(f"duration {text!r} must be above zero", hint="use e.g. 30s")
    return seconds


def format_duration(seconds: float) -> str:
    """`1h02m03s`, `4m05s`, `12.3s`."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
