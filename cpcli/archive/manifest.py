"""The session manifest and each node's record of its own files and statistics."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

NODE_RECORD = "node.json"  # beside a node's files: survives the loss of the process that ran the session


def write_json_atomically(path: Path, data: Any) -> None:
    """Write to a temporary file and rename, so a crash never leaves half a JSON file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: no half file left beside the last good one
        raise


def write_node_record(session_dir: Path, worker: str, node_id: str, stats: dict[str, Any],
                      files: list[dict[str, Any]], info: dict[str, Any] | None = None) -> Path:
    """Write `<worker>/<node>/node.json`: what a node recorded, written by the node itself."""
    node_dir = session_dir / worker / node_id
    node_dir.mkdir(parents=True, exist_ok=True)
    path = node_dir / NODE_RECORD
    write_json_atomically(path, {"node": node_id, "worker": worker, "stats": stats, "files": files,
                                  "info": info or {}})
    return path


def read_node_record(session_dir: Path, worker: str, node_id: str) -> dict[str, Any] | None:
    """A node's own record, or None if it never wrote one (it recorded nothing or was killed)."""
    path = session_dir / worker / node_id / NODE_RECORD
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_manifest(session_dir: Path, manifest: dict[str, Any]) -> Path:
    path = session_dir / "manifest.json"
    write_json_atomically(path, manifest)
    return path
