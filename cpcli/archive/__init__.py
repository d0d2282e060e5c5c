"""Session archives: each node's recorded files, the manifest, and reading a session back for analysis."""

from cpcli.archive.reader import Session, Stream, open_session

__all__ = ["Session", "Stream", "open_session"]
