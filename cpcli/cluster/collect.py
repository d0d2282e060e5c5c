"""`cp collect`: every machine's part of a session gathered into one verified folder, resumable.

The manager names the cluster's workers and their archive servers (`cp status`) and serves its
session record; each worker's part is pulled by its own thread. A file is kept only once its
sha256 equals the worker's record; a mismatch is fetched once more, then reported. What could not
be collected (a worker offline, a link cut) is listed in the merged manifest and the next run
continues it: verified files are skipped, partial ones continue from their size. Every request
holds this machine's credentials of the cluster; an archive server refusing them is reported with
the part it holds.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import zmq

from cpcli.archive.files import sha256_file
from cpcli.archive.manifest import write_json_atomically
from cpcli.cluster import messages as m
from cpcli.cluster.archive_server import SESSION_NAME_RE, unsafe_path
from cpcli.cluster.client import cluster_status
from cpcli.cluster.timing import ClusterTiming
from cpcli.cluster.transfer import PART_SUFFIX, ArchiveLink, NotMemberError, Refused, Unreachable
from cpcli.errors import ArchiveError, CpError, PeerLostError
from cpcli.transport.curve import Credentials

DISK_MARGIN_BYTES = 256 << 20  # left free after the collect: the machine keeps working
MANAGER = "manager"  # the manager's record in reports (worker names cannot collide: parts are per worker)
IO_THREADS = 2  # one ZeroMQ I/O thread cannot take in several workers' streams at LAN speed
JOIN_TIMEOUT_S = 3600.0  # a part's thread ends by itself (every wait in it is bounded); this only caps a hang

Progress = Callable[[str, int, int], None]  # (part, bytes done, bytes total)


@dataclass
class PartReport:
    """One machine's part: what was verified, what is missing or mismatched, and why."""

    owner: str
    address: str | None
    status: str = "pending"  # complete | incomplete | unreachable
    verified: list[dict[str, Any]] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)
    mismatched: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    transferred_bytes: int = 0
    files: list[dict[str, Any]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "status": self.status, "error": self.error,
                "verified_files": len(self.verified), "verified_bytes": sum(f["bytes"] for f in self.verified),
                "missing": self.missing, "mismatched": self.mismatched, "transferred_bytes": self.transferred_bytes}

    def summary(self) -> str:
        lost = self.missing + self.mismatched
        size = sum(int(f.get("bytes") or 0) for f in lost)
        why = f" ({self.error})" if self.error else ""
        mismatched = f", {len(self.mismatched)} mismatched" if self.mismatched else ""
        return f"{self.owner} {self.status}{why}: {len(lost)} files, {size / 1e6:.1f} MB not collected{mismatched}"


@dataclass(frozen=True)
class CollectResult:
    session: str
    folder: Path
    complete: bool
    parts: dict[str, PartReport]
    transferred_bytes: int
    manifest: dict[str, Any]


class Collector:
    """Collect one session of the cluster whose manager is at `address` into `out_dir/<session>/`."""

    def __init__(self, address: str, out_dir: Path, timing: ClusterTiming, only: list[str] | None,
                 on_progress: Progress | None, credentials: Credentials) -> None:
        self.address, self.out_dir, self.timing = address, out_dir, timing
        self.credentials = credentials
        self.only = only or []
        self._on_progress = on_progress or (lambda _part, _done, _total: None)
        self._status = cluster_status(address, timing, credentials)
        archive = self._status["manager"].get("archive")
        if not isinstance(archive, str):
            raise CpError(f"the manager at {address} serves no session records",
                          hint="update cpcli on the manager's machine to the version of this one")
        self._context: zmq.Context[Any] = zmq.Context(IO_THREADS)
        self._manager = ArchiveLink(self._context, archive, timing.answer_timeout_s, credentials)

    def close(self) -> None:
        self._manager.close()
        self._context.term()

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def sessions(self) -> list[dict[str, Any]]:
        """The sessions the manager recorded, oldest first, each marked whether it is collected in out_dir."""
        try:
            listed = self._manager.request(m.SESSIONS, {}, m.SESSION_LIST)["sessions"]
        except (Unreachable, Refused) as err:
            raise PeerLostError(f"the manager's archive server: {err}") from err
        sessions = [dict(s) for s in listed if isinstance(s, dict) and isinstance(s.get("name"), str)]
        for s in sessions:
            s["collected"] = _collected(self.out_dir / str(s["name"]))
        return sorted(sessions, key=lambda s: (str(s.get("start_utc") or ""), str(s["name"])))

    def collect(self, session: str | None) -> CollectResult:
        if session is None:
            listed = self.sessions()
            if not listed:
                raise CpError(f"the manager at {self.address} holds no session", hint="record one with cp run")
            session = str(listed[-1]["name"])
        if not SESSION_NAME_RE.match(session) or session in (".", ".."):
            raise CpError(f"{session!r} is not a session name", hint="see cp collect --list")
        try:
            manager_part = self._manager.request(m.PART, {"session": session}, m.PART_REPLY)
        except Refused as err:
            raise CpError(f"the manager: {err}", hint="see cp collect --list") from err
        except Unreachable as err:
            raise PeerLostError(f"the manager's archive server: {err}") from err
        manifest = dict(manager_part["record"])
        if not manifest:
            raise CpError(f"session {session} has no manifest yet (still running?)",
                          hint="collect it once it has ended")
        root = self.out_dir / session
        names = sorted(dict(manifest.get("workers") or {}))
        unknown = sorted(set(self.only) - set(names))
        if unknown:
            raise CpError(f"{', '.join(unknown)} recorded nothing in session {session}",
                          hint=f"its workers are {', '.join(names)}")
        chosen = [n for n in names if not self.only or n in self.only]
        own = [f for f in manager_part["files"] if isinstance(f, dict) and f.get("path") != "manifest.json"]
        manager = PartReport(MANAGER, self._manager.address, files=own)  # manifest.json: written merged
        parts = {name: self._part(session, name, manifest) for name in chosen}
        _check_disk(root, [manager, *parts.values()])
        root.mkdir(parents=True, exist_ok=True)
        threads = [threading.Thread(target=self._pull, args=(session, root, part), name=f"collect-{name}",
                                    daemon=True) for name, part in parts.items() if part.status == "pending"]
        for thread in threads:
            thread.start()
        pull_part(self._manager, session, root, manager, self._on_progress)
        for thread in threads:
            thread.join(JOIN_TIMEOUT_S)
        merged = _merged(manifest, manager, parts, self.only)
        write_json_atomically(root / "manifest.json", merged)
        every = [manager, *parts.values()]
        return CollectResult(session, root, all(p.status == "complete" for p in every), {p.owner: p for p in every},
                             sum(p.transferred_bytes for p in every), merged)

    def _part(self, session: str, name: str, manifest: dict[str, Any]) -> PartReport:
        """Ask a worker for its part; an unreachable one is reported with what the manager knows it holds."""
        worker = next((w for w in self._status["workers"] if w.get("name") == name), None)
        address = worker.get("archive") if worker else None
        part = PartReport(name, address if isinstance(address, str) else None)
        expected = _expected(manifest, name)
        if part.address is None or worker is None or worker.get("state") == "lost":
            part.status, part.error = "unreachable", "not connected to the manager"
            part.missing = [dict(f, reason="unreachable") for f in expected]
            return part
        link = ArchiveLink(self._context, part.address, self.timing.answer_timeout_s, self.credentials)
        try:
            reply = link.request(m.PART, {"session": session}, m.PART_REPLY)
            part.files = [f for f in reply["files"] if isinstance(f, dict)]
            part.record = dict(reply["record"])
        except (Unreachable, Refused, NotMemberError) as err:
            part.status, part.error = "incomplete" if isinstance(err, Refused) else "unreachable", str(err)
            part.missing = [dict(f, reason=str(err)) for f in expected]
        finally:
            link.close()
        return part

    def _pull(self, session: str, root: Path, part: PartReport) -> None:
        assert part.address is not None
        link = ArchiveLink(self._context, part.address, self.timing.answer_timeout_s, self.credentials)
        try:
            pull_part(link, session, root, part, self._on_progress)
        except Exception as err:  # a thread's boundary: the part is reported, never lost silently
            part.status, part.error = "incomplete", f"{type(err).__name__}: {err}"
        finally:
            link.close()


def pull_part(link: ArchiveLink, session: str, root: Path, part: PartReport, on_progress: Progress) -> None:
    """Pull every file of `part.files` into `root`, verified; what fails goes into the report, not raised."""
    total = sum(int(f.get("bytes") or 0) for f in part.files)
    done = 0
    start = link.received_bytes
    on_progress(part.owner, 0, total)
    for index, entry in enumerate(part.files):
        path, size, sha256 = str(entry.get("path")), int(entry.get("bytes") or 0), str(entry.get("sha256"))
        try:
            dest = _destination(root, path)
        except ArchiveError as err:
            part.missing.append(dict(entry, reason=err.message))
            continue

        def moved(n: int) -> None:
            nonlocal done
            done += n
            on_progress(part.owner, done, total)

        try:
            outcome = _pull_file(link, session, path, size, sha256, dest, moved)
        except (Unreachable, NotMemberError) as err:  # nothing more comes from that server
            part.status, part.error = "unreachable", str(err)
            part.missing.extend(dict(f, reason="unreachable") for f in part.files[index:])
            break
        except Refused as err:
            part.missing.append(dict(entry, reason=str(err)))
            continue
        except OSError as err:  # this machine's disk: a full one stops the part, the .part stays for a resume
            part.missing.append(dict(entry, reason=f"cannot write {dest} ({err.strerror})"))
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                part.error = f"the disk of {root} is full"
                part.missing.extend(dict(f, reason="disk full") for f in part.files[index + 1:])
                break
            continue
        finally:
            part.transferred_bytes = link.received_bytes - start
        record = {"path": path, "bytes": size, "sha256": sha256}
        (part.verified if outcome else part.mismatched).append(record)
        done = sum(int(f["bytes"]) for f in part.verified + part.mismatched)
        on_progress(part.owner, done, total)
    if part.status == "pending":
        part.status = "complete" if not part.missing and not part.mismatched else "incomplete"


def _pull_file(link: ArchiveLink, session: str, path: str, size: int, sha256: str, dest: Path,
               moved: Callable[[int], None]) -> bool:
    """True once `dest` holds the verified file (already, or fetched); False after two mismatches."""
    if dest.is_file() and dest.stat().st_size == size and sha256_file(dest)[1] == sha256:
        return True
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)
    for _attempt in range(2):
        got = link.fetch(session, path, size, part, moved)
        if got == sha256:
            os.replace(part, dest)
            return True
        part.unlink()  # fetched again from the start: a resumed prefix may be what was wrong
    return False


def _destination(root: Path, path: str) -> Path:
    """Where a recorded path goes: inside root, through no symlink, or ArchiveError."""
    why = unsafe_path(path)
    if why is not None:
        raise ArchiveError(f"refused path {path[:200]!r}: {why}")
    dest = root / path
    real_root = root.resolve()
    parent = dest.parent
    while not parent.exists() and parent != root:
        parent = parent.parent
    if not parent.resolve().is_relative_to(real_root) or dest.is_symlink():
        raise ArchiveError(f"refused path {path[:200]!r}: it leads outside {root}")
    return dest


def _expected(manifest: dict[str, Any], worker: str) -> list[dict[str, Any]]:
    """The files the manager's manifest says `worker` holds (its nodes' files and logs)."""
    files = list(dict(manifest.get("workers") or {}).get(worker, {}).get("files") or [])
    for node in dict(manifest.get("nodes") or {}).values():
        if isinstance(node, dict) and node.get("worker") == worker:
            files.extend(node.get("files") or [])
    return [f for f in files if isinstance(f, dict)]


def _check_disk(root: Path, parts: list[PartReport]) -> None:
    needed = 0
    for part in parts:
        for f in part.files:
            dest = root / str(f.get("path"))
            have = 0
            for candidate in (dest, dest.with_name(dest.name + PART_SUFFIX)):
                if candidate.is_file():
                    have = max(have, candidate.stat().st_size)
            needed += max(0, int(f.get("bytes") or 0) - have)
    probe = root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + DISK_MARGIN_BYTES > free:
        raise ArchiveError(f"collecting needs {needed / 1e9:.2f} GB but {probe} has {free / 1e9:.2f} GB free",
                           hint="free some space or collect into another folder with --out")


def _collected(folder: Path) -> bool:
    try:
        data = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(isinstance(data, dict) and dict(data.get("collected") or {}).get("complete"))


def _merged(manifest: dict[str, Any], manager: PartReport, parts: dict[str, PartReport],
            only: list[str]) -> dict[str, Any]:
    """The manager's manifest with the workers' own records filled in and a `collected` section."""
    merged = dict(manifest)
    nodes = {k: dict(v) for k, v in dict(manifest.get("nodes") or {}).items() if isinstance(v, dict)}
    for part in parts.values():  # a worker lost mid-session: its own record knows its files
        for node_id, status in dict(part.record.get("nodes") or {}).items():
            if node_id in nodes and not nodes[node_id].get("files") and isinstance(status, dict):
                nodes[node_id]["files"] = list(status.get("files") or [])
    merged["nodes"] = nodes
    every = [manager, *parts.values()]
    complete = all(p.status == "complete" for p in every) and not only
    merged["collected"] = {
        "at_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "complete": complete, "only": only or None,
        "from": {p.owner: p.to_dict() for p in every},
        "verified": [f for p in every for f in p.verified],
        "missing": [dict(f, worker=p.owner) for p in every for f in p.missing],
        "mismatched": [dict(f, worker=p.owner) for p in every for f in p.mismatched],
    }
    return merged
