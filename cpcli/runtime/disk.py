"""Disk safety: never start a recording without room, and stop cleanly before the disk is full."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from cpcli.errors import ArchiveError
from cpcli.units import Size, format_bytes

DEFAULT_MIN_FREE = Size(bytes=1 << 30)  # 1 GiB: room for the files to close and the system to keep working
CHECK_INTERVAL_S = 1.0  # free space is read this often while recording (a statvfs call)


class DiskGuard:
    """Watches free space on the filesystem that holds the sessions."""

    def __init__(self, out_dir: Path, min_free: Size) -> None:
        self._path = out_dir
        self._min_free = min_free
        self._next_check = 0.0

    def _where(self) -> Path:
        """The folder itself, or its nearest existing parent (it may not exist yet)."""
        path = self._path.resolve()
        while not path.exists() and path != path.parent:
            path = path.parent
        return path

    def _free_and_margin(self) -> tuple[int, int]:
        usage = shutil.disk_usage(self._where())
        return usage.free, self._min_free.of(usage.total)

    def check_before_start(self) -> None:
        """Refuse to start a recording that would begin below the margin."""
        free, margin = self._free_and_margin()
        if free < margin:
            raise ArchiveError(
                f"only {format_bytes(free)} free on the disk of {self._path}; recording needs at least "
                f"{format_bytes(margin)} free",
                hint="free some space, choose another --out, or lower --min-free")

    def check(self) -> str | None:
        """A message when free space fell below the margin (checked at most once a second)."""
        now = time.monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + CHECK_INTERVAL_S
        free, margin = self._free_and_margin()
        if free >= margin:
            return None
        return (f"the disk of {self._path} is almost full ({format_bytes(free)} free, margin "
                f"{format_bytes(margin)}): recording stopped, every file closed")
