"""The archive server of a machine: its recorded sessions, listed and served in chunks to `cp collect`.

One thread owns one ROUTER on the machine's interface (random port). A worker serves its part of
each session (`<session>/<worker>/...` and its nodes' logs); the manager serves its session
records (`manifest.json`, `recipe.yaml`, `events.jsonl`). Requests are validated like every control
message; a path that is absolute, has `..`, or resolves (through a symlink) outside the session is
refused, and nothing outside the data folder is ever read. The client sets the pace: one chunk
answers one FETCH, so the number of chunks in flight is the client's credit. Only members connect
(the member key, checked by the Router's gatekeeper); when the keys change (a rotation, a new
token saved) the server listens again with the new ones, cutting every connection made before.
A large file is served beside this ROUTER, through a seal handed out on it (SEAL): the data
listener and its streams are `cluster/sealed.py`'s, and a key change ends every seal too.

A worker deletes its part of a finished session (DELETE_PART) only when the client names exactly
the part it holds now, every path with the sha256 the server holds for it; the manager's records
are never deleted. Nothing is deleted through a symlink, and every path is checked before any goes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import zmq

from cpcli.cluster import messages as m
from cpcli.cluster.channel import Router
from cpcli.cluster.holdings import SESSION_NAME_RE, WORKER_RECORD, NotHeld, list_part, list_sessions, read_json
from cpcli.cluster.sealed import SEAL_IDLE_S, SealedStreams
from cpcli.errors import TransportError
from cpcli.transport.curve import Credentials, Gatekeeper
from cpcli.transport.protocol import pack_object

MAX_OFFSET = 1 << 62  # past any file; larger does not fit a file offset (seek raises)
CHUNK_BYTES = 1 << 20  # the largest chunk served: bounds memory per request on both ends
POLL_MS = 100  # the thread's longest sleep: bounds how fast stop() is noticed
JOIN_TIMEOUT_S = 5.0
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PROBE_RE = re.compile(r"^\.cp-collect-probe-[0-9a-f]{32}$")  # the client's marker file: a name, never a path
FINISHED = "finished"  # the phase of a worker's part once its final worker.json is written


def unsafe_path(path: str) -> str | None:
    """Why `path` (relative, posix, as recorded) cannot name a file inside a session folder; None if it can."""
    if not path or "\\" in path or "\x00" in path:
        return "empty or with a backslash or NUL"
    pure = PurePosixPath(path)
    if pure.is_absolute():
        return "absolute"
    if any(part in ("..", ".", "") for part in path.split("/")):
        return "has '..' or an empty part"
    return None


def listing_digest(files: dict[str, str]) -> str:
    """One sha256 naming a part's exact listing (each path with its file's sha256), in any order."""
    canonical = json.dumps(sorted(files.items()), separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


class ArchiveServer:
    """Serves the sessions under `data_dir`: the part `worker` owns, or (None) the manager's records."""

    def __init__(self, data_dir: Path, host: str, worker: str | None, logger: logging.Logger | None,
                 keys: Callable[[], Credentials], seal_idle_s: float = SEAL_IDLE_S) -> None:
        self.data_dir = data_dir.resolve()
        self.worker = worker
        self.owner = worker or ""
        self._log = logger or logging.getLogger("cpcli.archive_server")
        self._keys = keys
        self._context: zmq.Context[Any] = zmq.Context()
        try:
            self._router = Router(self._context, host, 0, self._log, keys, what="archive server")
            try:
                self._sealed = SealedStreams(host, self._log, seal_idle_s)
            except Exception:
                self._router.close()
                raise
        except Exception:
            self._context.term()
            raise
        self.host, self.port = host, self._router.port
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="archive-server", daemon=True)
        self.served_bytes = 0
        self._closed = False

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def data_address(self) -> str:
        """Where its sealed streams are served (large files for `cp collect`, cluster/sealed.py)."""
        return f"tcp://{self.host}:{self._sealed.port}"

    @property
    def credentials(self) -> Credentials:
        """The keys it listens with now (the newest within POLL_MS of a change)."""
        return self._router.credentials

    @property
    def sealed(self) -> SealedStreams:
        """Its sealed streams (large files beside Curve): bytes served, requests dropped, seals open."""
        return self._sealed

    @property
    def gatekeeper(self) -> Gatekeeper:
        """Its Router's gatekeeper (counts of admitted, refused and throttled connections)."""
        return self._router.gatekeeper

    def start(self) -> ArchiveServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Idempotent; the thread closes its socket on its way out."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                self._log.warning("the archive server thread did not stop within %g s", JOIN_TIMEOUT_S)
                return
        if self._thread.ident is None and not self._closed:  # never started: nobody else closes
            self._closed = True
            self._sealed.close()
            self._router.close()
            self._context.term()

    def __enter__(self) -> ArchiveServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router.socket, zmq.POLLIN)
        poller.register(self._sealed.listener, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                self._router.check()
                self._sealed.expire()
                if self._keys() is not self._router.credentials:
                    self._log.info("the archive server listens again with the cluster's new keys")
                    self._sealed.drop()  # handed out under the old keys: nothing more for them
                    poller.unregister(self._router.socket)
                    try:
                        self._router.rebind()
                    except TransportError as err:  # its port was taken meanwhile: cp collect cannot reach it
                        self._log.error("the archive server stopped: %s", err)
                        return
                    poller.register(self._router.socket, zmq.POLLIN)
                ready = dict(poller.poll(POLL_MS))
                if self._sealed.listener.fileno() in ready:  # zmq.Poller names plain sockets by descriptor
                    self._sealed.accept()
                if self._router.socket not in ready:
                    continue
                while (message := self._router.receive()) is not None:
                    peer, command, body = message
                    try:
                        self._answer(peer, command, body)
                    except _Refused as err:
                        self._router.send(peer, m.REFUSED, {"message": str(err)})
                    except Exception as err:  # noqa: BLE001 - this thread's boundary: one request, not the server
                        self._log.exception("the archive server could not answer a %s request", command.decode())
                        self._router.send(peer, m.REFUSED, {"message": f"cannot answer ({type(err).__name__})"})
        finally:
            self._sealed.close()
            self._router.close()
            self._context.term()

    def _answer(self, peer: bytes, command: bytes, body: dict[str, Any]) -> None:
        if command == m.SESSIONS:
            self._router.send(peer, m.SESSION_LIST, {"owner": self.owner,
                                                     "sessions": list_sessions(self.data_dir, self.worker)})
        elif command == m.PART:
            session = self._session_dir(str(body["session"]))
            files, record = self._part(session)
            self._router.send(peer, m.PART_REPLY, {"session": session.name, "owner": self.owner,
                                                   "files": files, "record": record})
        elif command == m.FETCH:
            self._fetch(peer, body)
        elif command == m.SEAL:
            target = self._file(self._session_dir(str(body["session"])), str(body["path"]))
            try:
                self._router.send(peer, m.SEAL_REPLY, self._sealed.issue(target))
            except OSError as err:
                raise _Refused(f"cannot read {body['path']} ({err.strerror})") from err
        elif command == m.DELETE_PART:
            self._router.send(peer, m.DELETED, self._delete_part(body))
        # anything else valid on the control plane is not for us: dropped

    def _fetch(self, peer: bytes, body: dict[str, Any]) -> None:
        path, offset, size = str(body["path"]), int(body["offset"]), int(body["size"])
        if not 0 <= offset < MAX_OFFSET or not 0 < size <= CHUNK_BYTES:
            raise _Refused(f"chunk {offset}+{size} of {path} is out of bounds (at most {CHUNK_BYTES} bytes)")
        target = self._file(self._session_dir(str(body["session"])), path)
        try:
            with open(target, "rb") as fh:
                fh.seek(offset)
                data = fh.read(size)
        except OSError as err:
            raise _Refused(f"cannot read {path} ({err.strerror})") from err
        try:
            self._router.socket.send_multipart(
                [peer, m.CHUNK, pack_object({"path": path, "offset": offset, "size": len(data)}), data],
                zmq.NOBLOCK, copy=False)
            self.served_bytes += len(data)
        except zmq.ZMQError:
            pass  # the client is gone or not reading: it asks again

    # -- what it serves ----------------------------------------------------------------------

    def _session_dir(self, name: str) -> Path:
        if not SESSION_NAME_RE.match(name) or name in (".", ".."):
            raise _Refused(f"{name[:80]!r} is not a session name")
        session = self.data_dir / name
        if not session.is_dir() or session.is_symlink():
            raise _Refused(f"no session {name} here")
        return session

    def _file(self, session: Path, path: str) -> Path:
        why = unsafe_path(path)
        if why is not None:
            raise _Refused(f"refused path {path[:200]!r}: {why}")
        first = path.split("/", 1)[0]
        mine = (first in (self.worker, "logs")) if self.worker else ("/" not in path)
        if not mine:
            raise _Refused(f"refused path {path[:200]!r}: not part of what {self.owner or 'the manager'} serves")
        target = session / path
        try:
            real = target.resolve(strict=True)
        except (OSError, RuntimeError) as err:
            raise _Refused(f"no file {path[:200]} in session {session.name}") from err
        if not real.is_relative_to(session.resolve()) or not real.is_file():
            raise _Refused(f"refused path {path[:200]!r}: it leads outside the session or to no regular file")
        return real

    def _own_file(self, session: Path, path: str) -> Path:
        """`path` of this part as a regular file reached through no symlink: unlinking it removes that file only."""
        real = self._file(session, path)
        target = session / path  # data_dir is resolved and path has no '..': equal unless a symlink is on the way
        if real != target:
            raise _Refused(f"refused to delete {path[:200]!r}: it is reached through a symlink")
        return target

    def _part(self, session: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        try:
            return list_part(session, self.worker)
        except NotHeld as err:
            raise _Refused(str(err)) from err

    # -- deleting a part ---------------------------------------------------------------------

    def _delete_part(self, body: dict[str, Any]) -> dict[str, Any]:
        """Delete this worker's part of a session if it is exactly what the client verified; what went."""
        if self.worker is None:
            raise _Refused("the manager's session records are never deleted")
        session = self._session_dir(str(body["session"]))
        probe = str(body["probe"])
        if not PROBE_RE.match(probe):
            raise _Refused(f"{probe[:80]!r} is not a probe name")
        if os.path.lexists(session / probe):  # the client collected into this very folder
            raise _Refused(f"the collected folder is {self.worker}'s own folder of session {session.name}: "
                           "deleting this part would delete the collected copy")
        record = session / self.worker / WORKER_RECORD
        if record.is_symlink() or read_json(record).get("phase") != FINISHED:
            raise _Refused(f"{self.worker} has not finished session {session.name} (no final {WORKER_RECORD}); "
                           "it may still be recording")
        files, _record = self._part(session)
        held = {str(f.get("path")): str(f.get("sha256")) for f in files}
        if len(held) != body["count"] or listing_digest(held) != body["listing"]:
            raise _Refused(f"{self.worker}'s part of session {session.name} is not what was verified "
                           f"({len(held)} files here, {body['count']} verified): collect it again first")
        targets = [self._own_file(session, path) for path in sorted(held)]  # all checked before any goes
        self._sealed.drop(set(targets))  # what is deleted is served no more
        deleted = deleted_bytes = 0
        for target in targets:
            try:
                size = target.lstat().st_size
                target.unlink()
            except OSError as err:
                raise _Refused(f"deleted {deleted} of {len(targets)} files of session {session.name}, then "
                               f"could not delete {target.relative_to(session)} ({err.strerror})") from err
            deleted, deleted_bytes = deleted + 1, deleted_bytes + size
        kept = _prune(session, self.worker)
        self._log.info("deleted %d files (%d bytes) of session %s, collected and verified elsewhere; %d entries "
                       "not in the part stayed", deleted, deleted_bytes, session.name, kept)
        return {"session": session.name, "files": deleted, "bytes": deleted_bytes, "kept": kept}



def _prune(session: Path, worker: str) -> int:
    """Remove the empty folders a deleted part leaves (and the session's, if empty); the entries that stay."""
    part = session / worker
    kept = 0
    for root, dirs, names in os.walk(part, topdown=False):  # bottom up, never into a symlinked folder
        kept += len(names)
        for name in dirs:
            if (Path(root) / name).is_symlink():
                kept += 1
            else:
                _rmdir(Path(root) / name)
    for folder in (part, session / "logs", session):
        _rmdir(folder)
    return kept


def _rmdir(folder: Path) -> None:
    """Remove `folder` if it is an empty folder (rmdir(2) refuses a full one, and a symlink)."""
    with contextlib.suppress(OSError):
        folder.rmdir()


class _Refused(Exception):
    """A request this server does not answer with data; the message goes back to the client."""
