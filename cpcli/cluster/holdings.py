"""What a machine's data folder holds for `cp collect`: its sessions, and its part of one, every file listed.

A worker's part is `<session>/<worker>/...` and its nodes' logs; the manager's, its session records.
Files come with the sha256 their records hold, or one computed now for a file no record lists (a
killed node's, node.json, worker.json). Symlinks are never listed or followed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from cpcli.archive.files import sha256_file

WORKER_RECORD = "worker.json"
NODE_RECORD = "node.json"
MANAGER_FILES = ("manifest.json", "recipe.yaml", "events.jsonl", "session.json")  # the manager's record
SESSION_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class NotHeld(Exception):
    """This machine holds no part (or no record) of the session asked about."""


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _hashed(path: Path, rel: str, kind: str) -> dict[str, Any] | None:
    try:
        size, sha256 = sha256_file(path)
    except OSError:
        return None
    return {"path": rel, "kind": kind, "bytes": size, "sha256": sha256, "recorded": False}


def list_sessions(data_dir: Path, worker: str | None) -> list[dict[str, Any]]:
    """The sessions under `data_dir` this machine holds a part of (`worker`), or the records of (None: the manager)."""
    found = []
    try:
        entries = sorted(data_dir.iterdir())
    except OSError:
        return []
    for session in entries:
        if not session.is_dir() or session.is_symlink() or not SESSION_NAME_RE.match(session.name):
            continue
        if worker is not None:
            part = session / worker
            if not part.is_dir():
                continue
            record = read_json(part / WORKER_RECORD)
            found.append({"name": session.name, "start_utc": None, "status": record.get("phase", "unknown"),
                          "workers": [worker], "bytes": _tree_bytes(part)})
            continue
        manifest = read_json(session / "manifest.json") or read_json(session / "session.json")
        if not manifest:
            continue
        workers = sorted(manifest.get("workers") or {n.get("worker") for n in manifest.get("nodes") or []
                                                     if isinstance(n, dict)})
        bytes_ = sum(int(f.get("bytes") or 0) for f in manifest.get("files") or [] if isinstance(f, dict))
        found.append({"name": session.name, "start_utc": manifest.get("start_utc"),
                      "status": manifest.get("status") or manifest.get("phase") or "unknown",
                      "workers": [str(w) for w in workers if w], "bytes": bytes_})
    return found

def list_part(session: Path, worker: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every file of `worker`'s part of `session` (None: the manager's records), with the sha256 its record
    holds (or one computed now), and the record itself; NotHeld if there is none."""
    if worker is None:
        record = read_json(session / "manifest.json")
        recorded = {str(f.get("path")): f for f in record.get("files") or [] if isinstance(f, dict)}
        own: list[dict[str, Any]] = []
        for name in MANAGER_FILES:
            path = session / name
            if path.is_file() and not path.is_symlink():
                entry = dict(recorded[name], recorded=True) if name in recorded else _hashed(path, name, "record")
                if entry is not None:
                    own.append(entry)
        if not own:
            raise NotHeld(f"no record of session {session.name} here")
        return own, record
    part = session / worker
    if not part.is_dir():
        raise NotHeld(f"worker {worker} holds no part of session {session.name}")
    record = read_json(part / WORKER_RECORD)
    listed: list[Any] = list(record.get("files") or [])
    for status in dict(record.get("nodes") or {}).values():
        if isinstance(status, dict):
            listed.extend(status.get("files") or [])
    for node_record in sorted(part.glob(f"*/{NODE_RECORD}")):
        listed.extend(read_json(node_record).get("files") or [])
    files: dict[str, dict[str, Any]] = {}
    for entry in listed:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"] not in files:
            files[entry["path"]] = dict(entry, recorded=True)
    for root, dirs, names in os.walk(part):  # what no record lists: node.json, worker.json, a killed node's files
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]
        for name in sorted(names):
            path = Path(root) / name
            rel = path.relative_to(session).as_posix()
            if rel in files or name.endswith((".tmp", ".part")) or path.is_symlink():
                continue
            entry = _hashed(path, rel, "record" if name.endswith(".json") else "unrecorded")
            if entry is not None:
                files[rel] = entry
    for node_dir in sorted(p for p in part.iterdir() if p.is_dir()):
        rel = f"logs/{node_dir.name}.log"
        log = session / rel
        if rel not in files and log.is_file() and not log.is_symlink():
            entry = _hashed(log, rel, "log")
            if entry is not None:
                files[rel] = entry
    return list(files.values()), record


def _tree_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:
                continue
    return total
