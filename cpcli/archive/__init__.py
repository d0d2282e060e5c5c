"""Session archives: each node's recorded files, the manifest, and reading a session back for analysis."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cpcli.archive.reader import Session, Stream, open_session

__all__ = ["Session", "Stream", "open_session"]


def __getattr__(name: str) -> Any:
    """The reader loads on first use: node processes import `cpcli.archive.writer` and need none of it."""
    if name in __all__:
        from cpcli.archive import reader

        return getattr(reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
