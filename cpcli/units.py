"""Quantities as people type them: durations (`30s`, `5m`) and sizes (`1GiB`, `500MB`, `2%`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cpcli.errors import CpError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib|%)?\s*$", re.IGNORECASE)
_BYTES = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


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


@dataclass(frozen=True)
class Size:
    """A size in bytes, or a share of a disk (`percent`)."""

    bytes: int = 0
    percent: float | None = None

    def of(self, total_bytes: int) -> int:
        """Bytes this size means on a disk of `total_bytes`."""
        return int(total_bytes * self.percent / 100) if self.percent is not None else self.bytes


def parse_size(text: str) -> Size:
    """`1GiB`, `500MB`, `2%`, `1048576`; raises CpError naming the text."""
    match = _SIZE.match(text)
    if not match:
        raise CpError(f"size {text!r} is not understood", hint="use e.g. 1GiB, 500MB or 2%")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower()
    if unit == "%":
        if number > 100:
            raise CpError(f"size {text!r} is more than the whole disk", hint="use a percentage up to 100%")
        return Size(percent=number)
    return Size(bytes=int(number * _BYTES[unit]))


def format_bytes(count: float) -> str:
    """`950 B`, `1.2 kB`, `3.4 GB` (decimal units, as file managers show)."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"
