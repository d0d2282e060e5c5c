"""What a session folder holds: its manifest, each node's record, and the streams recorded on disk."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpcli.archive.manifest import NODE_RECORD
from cpcli.archive.report import Drops, Findings
from cpcli.errors import ArchiveError

DEVICE_DROP_KEYS = ("blocks_dropped", "frames_dropped")  # counts a node puts in its info when its device lost data
SEGMENT_NAME = re.compile(r"^(?P<port>.+)-(?P<number>\d{4,})\.(?P<ext>mp4|wav|csv)$")  # a segment or table part
_SEGMENT_KINDS = {"mp4": "video", "wav": "audio", "csv": "table"}


@dataclass(frozen=True)
class RecordedNode:
    """What the manifest (or, without one, the node's own node.json) says about a node."""

    params: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    drops: Drops = field(default_factory=Drops)


@dataclass(frozen=True)
class RecordedStream:
    """One recorded port of one node and its files, as paths relative to the session folder."""

    worker: str
    node: str
    port: str
    kind: str
    data: tuple[str, ...] = ()  # segments, table parts or the .jsonl
    timestamps: str | None = None

    @property
    def name(self) -> str:
        return f"{self.node}.{self.port}"


def not_a_session(root: Path) -> ArchiveError:
    """The error for a folder that is no session, with a hint at the folder to give instead."""
    if not root.exists():
        why = "it does not exist"
    elif not root.is_dir():
        why = "it is a file"
    else:
        why = "no manifest.json and no recorded streams"
    inner = sorted(p.parent.name for p in root.glob("*/manifest.json")) if root.is_dir() else []
    hint = (f"it holds session folders ({', '.join(inner[:3])}{', ...' if len(inner) > 3 else ''}); inspect one"
            if inner else "give the folder `cp run` printed as 'session folder:'")
    return ArchiveError(f"{root} is not a session folder ({why})", hint=hint)


def read_manifest(root: Path, findings: Findings) -> dict[str, Any] | None:
    """The session's manifest; None, with a problem found, if it is there but unreadable."""
    path = root / "manifest.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        findings.problem("manifest.json", f"cannot be read ({err}); reporting what is on disk")
        return None
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), dict):
        findings.problem("manifest.json", "is not a cpcli manifest (no nodes); reporting what is on disk")
        return None
    return data


def _name_of(name: str) -> tuple[str, str, bool] | None:
    """(port, kind, is_timestamps) of a recorded file's name; kind "media" for timestamps; None: not a stream."""
    if name.endswith(".timestamps.csv"):
        return name[: -len(".timestamps.csv")], "media", True
    match = SEGMENT_NAME.match(name)
    if match:
        return match["port"], _SEGMENT_KINDS[match["ext"]], False
    if name.endswith(".csv"):
        return name[:-4], "table", False
    if name.endswith(".jsonl"):
        return name[:-6], "events", False
    return None


def scan_disk(root: Path) -> dict[str, list[str]]:
    """Node folders `<worker>/<node>` on disk that hold node.json or recorded files, with their file names."""
    found: dict[str, list[str]] = {}
    try:
        workers = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for worker in workers:
            for node in sorted(p for p in worker.iterdir() if p.is_dir()):
                names = sorted(f.name for f in node.iterdir() if f.is_file())
                if NODE_RECORD in names or any(_name_of(n) for n in names):
                    found[f"{worker.name}/{node.name}"] = names
    except OSError as err:
        raise ArchiveError(f"cannot read the session folder {root} ({err.strerror})") from err
    return found


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def count_of(stats: dict[str, Any], key: str) -> int:
    """A count in a node's stats or info, summed over ports where it is kept per port."""
    value = stats.get(key, 0)
    if isinstance(value, dict):
        return sum(int(v) for v in value.values() if isinstance(v, (int, float)))
    return int(value) if isinstance(value, (int, float)) else 0


def read_records(root: Path, manifest: dict[str, Any] | None, disk: dict[str, list[str]]
                 ) -> tuple[dict[str, RecordedNode], dict[str, dict[str, Any]]]:
    """Each node's params and stats, and each file's expected record (from the manifest, else node.json)."""
    nodes: dict[str, RecordedNode] = {}
    expected: dict[str, dict[str, Any]] = {}
    entries: list[tuple[str, dict[str, Any]]] = []
    if manifest is not None:
        entries = [(n, e) for n, e in manifest["nodes"].items() if isinstance(e, dict)]
    else:
        for rel in disk:
            try:
                record = json.loads((root / rel / NODE_RECORD).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(record, dict):
                entries.append((rel.split("/")[-1], record))
    for node_id, entry in entries:
        stats, info = _mapping(entry.get("stats")), _mapping(entry.get("info"))
        drops = Drops(count_of(stats, "dropped_in"), count_of(stats, "record_dropped"),
                      count_of(stats, "dropped_out"), sum(count_of(info, key) for key in DEVICE_DROP_KEYS))
        nodes[node_id] = RecordedNode(_mapping(entry.get("params")), info, drops)
        for file in entry.get("files") or []:
            if isinstance(file, dict) and isinstance(file.get("path"), str):
                expected[file["path"]] = file
    return nodes, expected


def _media_kind(path: Path) -> str:
    """Video or audio, for timestamps whose segments are all gone: audio timestamps count `frames`."""
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            return "audio" if "frames" in fh.readline().strip().split(",") else "video"
    except OSError:
        return "video"


def find_streams(root: Path, expected: dict[str, dict[str, Any]], disk: dict[str, list[str]]
                 ) -> list[RecordedStream]:
    """Every stream named by a record or found on disk, keyed by worker, node, port and kind."""
    paths = set(expected) | {f"{rel}/{name}" for rel, names in disk.items() for name in names}
    parsed = []
    for path in sorted(paths):
        parts = path.split("/")
        named = _name_of(parts[-1]) if len(parts) == 3 else None
        if named is not None:
            parsed.append((parts[0], parts[1], *named, path))
    media = {(w, n, p): k for w, n, p, k, _, _ in parsed if k in ("video", "audio")}
    data: dict[tuple[str, str, str, str], list[str]] = {}
    timestamps: dict[tuple[str, str, str, str], str] = {}
    for worker, node, port, kind, is_timestamps, path in parsed:
        if kind == "media":
            kind = media.get((worker, node, port)) or _media_kind(root / path)
        key = (worker, node, port, kind)
        files = data.setdefault(key, [])
        if is_timestamps:
            timestamps[key] = path
        else:
            files.append(path)
    return [RecordedStream(*key, tuple(files), timestamps.get(key)) for key, files in data.items()]
