"""`cp collect`: every machine's part of a session gathered into one verified folder, resumable.

The manager names the cluster's workers and their archive servers (`cp status`) and serves its
session record; each worker's part is pulled by its own thread. A file is kept only once its
sha256 equals the worker's record; a mismatch is fetched once more, then reported. What could not
be collected (a worker offline, a link cut) is listed in the merged manifest and the next run
continues it: verified files are skipped, partial ones continue from their size. Every request
holds this machine's credentials of the cluster; an archive server refusing them is reported with
the part it holds.

With `delete_remote`, each worker whose whole part is verified here is then asked to delete its
copy (the merged manifest is written, and the folders synced, first); the worker checks the listing
against its own. A later run checks a deleted part against the copy here instead of its worker.
"""

from __future__ import annotations

import errno
import json
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import zmq

from cpcli.archive.manifest import write_json_atomically
from cpcli.cluster import messages as m
from cpcli.cluster.client import cluster_status
from cpcli.cluster.holdings import SESSION_NAME_RE
from cpcli.cluster.parts import DECLINED, PART_SUFFIX, PartReport, Progress, delete_part, pull_part, verify_here
from cpcli.cluster.timing import ClusterTiming
from cpcli.cluster.transfer import ArchiveLink, NotMemberError, Refused, Unreachable
from cpcli.errors import ArchiveError, CpError, PeerLostError
from cpcli.transport.curve import Credentials

DISK_MARGIN_BYTES = 256 << 20  # left free after the collect: the machine keeps working
MANAGER = "manager"  # the manager's record in reports (worker names cannot collide: parts are per worker)
IO_THREADS = 2  # one ZeroMQ I/O thread cannot take in several workers' streams at LAN speed
JOIN_TIMEOUT_S = 3600.0  # a part's thread ends by itself (every wait in it is bounded); this only caps a hang

@dataclass(frozen=True)
class DeletePlan:
    """What --delete-remote would delete once verified: the question asked before collecting."""

    session: str
    workers: list[str]
    files: int
    bytes: int


Confirm = Callable[[DeletePlan], bool]


@dataclass(frozen=True)
class CollectResult:
    session: str
    folder: Path
    complete: bool
    parts: dict[str, PartReport]
    transferred_bytes: int
    manifest: dict[str, Any]
    transfer_s: float  # from the first request for a file to the last part verified on disk (fsynced)

    @property
    def undeleted(self) -> list[PartReport]:
        """Parts verified here whose worker's copy --delete-remote (confirmed) could not delete."""
        return [p for p in self.parts.values() if p.status == "complete" and p.kept not in (None, DECLINED)]


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

    def collect(self, session: str | None, delete_remote: bool = False,
                confirm: Confirm | None = None) -> CollectResult:
        """Collect a session (None: the latest); `delete_remote`: then delete each worker's copy verified here.

        `confirm` is asked once, before anything moves, whether to delete (None: without asking).
        """
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
        own = [f for f in manager_part["files"] if isinstance(f, dict) and f.get("path") != "manifest.json"]
        manager = PartReport(MANAGER, self._manager.address, files=own)  # manifest.json: written merged
        return self._gather(session, manifest, manager, delete_remote, confirm)

    def _gather(self, session: str, manifest: dict[str, Any], manager: PartReport, delete_remote: bool,
                confirm: Confirm | None) -> CollectResult:
        root = self.out_dir / session
        names = sorted(dict(manifest.get("workers") or {}))
        unknown = sorted(set(self.only) - set(names))
        if unknown:
            raise CpError(f"{', '.join(unknown)} recorded nothing in session {session}",
                          hint=f"its workers are {', '.join(names)}")
        earlier = _earlier(root)
        # a part deleted from its worker is checked here in every run: the manifest must not forget it
        chosen = [n for n in names if not self.only or n in self.only or earlier.get(n, {}).get("remote_deleted")]
        parts = {name: self._part(session, name, manifest, earlier.get(name)) for name in chosen}
        _check_disk(root, [manager, *(p for p in parts.values() if not p.gone)])
        deleting = delete_remote and _confirmed(session, parts, confirm)
        root.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        threads = [threading.Thread(target=self._pull, args=(session, root, part), name=f"collect-{name}",
                                    daemon=True) for name, part in parts.items() if part.status == "pending"]
        for thread in threads:
            thread.start()
        pull_part(self._manager, session, root, manager, self._on_progress)
        for thread in threads:
            thread.join(JOIN_TIMEOUT_S)
        transfer_s = time.monotonic() - started
        merged = _merged(manifest, manager, parts, self.only)
        _save(root, merged)  # before any worker's copy goes: a disk full here stops the deletion too
        if deleting:
            self._delete_remote(session, root, parts)
            merged = _merged(manifest, manager, parts, self.only)
            _save(root, merged)
        every = [manager, *parts.values()]
        return CollectResult(session, root, all(p.status == "complete" for p in every), {p.owner: p for p in every},
                             sum(p.transferred_bytes for p in every), merged, transfer_s)

    def _part(self, session: str, name: str, manifest: dict[str, Any], earlier: dict[str, Any] | None) -> PartReport:
        """Ask a worker for its part; an unreachable one is reported with what the manager knows it holds.

        `earlier`: the worker's entry in an earlier run's manifest here; a part deleted from its
        worker since is checked against the copy here.
        """
        worker = next((w for w in self._status["workers"] if w.get("name") == name), None)
        address = worker.get("archive") if worker else None
        part = PartReport(name, address if isinstance(address, str) else None)
        if earlier and earlier["files"] and earlier.get("remote_deleted"):
            return _gone(part, earlier)
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
            if isinstance(err, Refused) and earlier and earlier["files"] and earlier.get("status") == "complete":
                return _gone(part, earlier)  # its copy went after it was verified here (a lost DELETED answer)
            part.status, part.error = "incomplete" if isinstance(err, Refused) else "unreachable", str(err)
            part.missing = [dict(f, reason=str(err)) for f in expected]
        finally:
            link.close()
        return part

    def _pull(self, session: str, root: Path, part: PartReport) -> None:
        if part.gone:
            verify_here(root, part, self._on_progress)
            return
        assert part.address is not None
        link = ArchiveLink(self._context, part.address, self.timing.answer_timeout_s, self.credentials)
        try:
            pull_part(link, session, root, part, self._on_progress)
        except Exception as err:  # a thread's boundary: the part is reported, never lost silently
            part.status, part.error = "incomplete", f"{type(err).__name__}: {err}"
        finally:
            link.close()

    def _delete_remote(self, session: str, root: Path, parts: dict[str, PartReport]) -> None:
        """Ask each worker whose whole part is verified here to delete its copy; the reports say what happened."""
        probe = root / f".cp-collect-probe-{secrets.token_hex(16)}"  # a worker that sees it holds this very folder
        probe.touch()
        try:
            for part in parts.values():
                if part.gone:
                    continue
                if part.status != "complete" or part.address is None:
                    lost = len(part.missing) + len(part.mismatched)
                    part.kept = f"{lost} of its files are not verified here ({part.status})"
                    continue
                self._delete_part(session, root, part, probe.name)
        finally:
            probe.unlink(missing_ok=True)

    def _delete_part(self, session: str, root: Path, part: PartReport, probe: str) -> None:
        assert part.address is not None
        link = ArchiveLink(self._context, part.address, self.timing.answer_timeout_s, self.credentials)
        try:
            delete_part(link, session, root, part, probe)
        finally:
            link.close()


def _confirmed(session: str, parts: dict[str, PartReport], confirm: Confirm | None) -> bool:
    """Whether to delete the workers' copies once verified: asked once, with what that would delete."""
    asked = [p for p in parts.values() if p.status == "pending" and not p.gone]
    if confirm is None or not asked:
        return True
    plan = DeletePlan(session, [p.owner for p in asked], sum(len(p.files) for p in asked),
                      sum(int(f.get("bytes") or 0) for p in asked for f in p.files))
    if confirm(plan):
        return True
    for part in parts.values():
        part.kept = None if part.gone else DECLINED
    return False


def _gone(part: PartReport, earlier: dict[str, Any]) -> PartReport:
    """A part whose worker's copy is gone: to be checked against the files an earlier run verified here."""
    part.files, part.gone = list(earlier["files"]), True
    part.deleted = dict(earlier.get("deleted") or {"files": len(part.files), "at_utc": None,
                                                   "bytes": sum(int(f.get("bytes") or 0) for f in part.files)})
    return part


def _expected(manifest: dict[str, Any], worker: str) -> list[dict[str, Any]]:
    """The files the manager's manifest says `worker` holds (its nodes' files and logs)."""
    files = list(dict(manifest.get("workers") or {}).get(worker, {}).get("files") or [])
    for node in dict(manifest.get("nodes") or {}).values():
        if isinstance(node, dict) and node.get("worker") == worker:
            files.extend(node.get("files") or [])
    return [f for f in files if isinstance(f, dict)]


def _save(root: Path, merged: dict[str, Any]) -> None:
    """Write the merged manifest; a full disk is the user's to fix, said in one line."""
    try:
        write_json_atomically(root / "manifest.json", merged)
    except OSError as err:
        why = f"the disk of {root} is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else \
            f"cannot write {root / 'manifest.json'} ({err.strerror})"
        raise ArchiveError(f"{why}: the files verified so far are kept, but the merged manifest is not written",
                           hint="free some space (or collect into another --out) and run `cp collect` for this "
                                "session again: it continues where it stopped") from err


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


def _collected_section(folder: Path) -> dict[str, Any]:
    """The `collected` section of the manifest an earlier run wrote in folder ({} if none)."""
    try:
        data = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    section = data.get("collected") if isinstance(data, dict) else None
    return section if isinstance(section, dict) else {}


def _collected(folder: Path) -> bool:
    return bool(_collected_section(folder).get("complete"))


def _earlier(folder: Path) -> dict[str, dict[str, Any]]:
    """Each worker's entry in an earlier run's manifest here, with `files`: what was verified from it."""
    section = _collected_section(folder)
    listed, parts = section.get("verified"), section.get("from")
    verified = [f for f in listed if isinstance(f, dict)] if isinstance(listed, list) else []
    return {owner: dict(entry, files=[f for f in verified if f.get("worker") == owner])
            for owner, entry in (parts.items() if isinstance(parts, dict) else ())
            if owner != MANAGER and isinstance(entry, dict)}


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
        "verified": [dict(f, worker=p.owner) for p in every for f in p.verified],
        "missing": [dict(f, worker=p.owner) for p in every for f in p.missing],
        "mismatched": [dict(f, worker=p.owner) for p in every for f in p.mismatched],
    }
    return merged
