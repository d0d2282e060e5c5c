"""One machine's part of a session for `cp collect`: pulled file by file and verified, deleted there, checked here.

`pull_part` fills a `PartReport` with what was verified and what not (through an `ArchiveLink`,
`cluster/transfer.py`); `delete_part` then asks the worker to delete its copy of a part verified
here in full; `verify_here` checks a part whose worker's copy is gone against the copy here.
Nothing is written outside the collected folder: every recorded path is checked first.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cpcli.archive.files import sha256_file
from cpcli.archive.session import utc_stamp
from cpcli.cluster.archive_server import unsafe_path
from cpcli.cluster.transfer import ArchiveLink, NotMemberError, Refused, Unreachable
from cpcli.errors import ArchiveError

PART_SUFFIX = ".part"
DECLINED = "not confirmed"  # why a worker's copy stayed when the question was answered no

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
    deleted: dict[str, Any] | None = None  # its worker's copy is gone: files, bytes, at_utc (None: not by us)
    kept: str | None = None  # why --delete-remote left its worker's copy in place
    gone: bool = False  # its worker's copy was gone before this run: checked against the copy here only

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "status": self.status, "error": self.error,
                "verified_files": len(self.verified), "verified_bytes": sum(f["bytes"] for f in self.verified),
                "missing": self.missing, "mismatched": self.mismatched, "transferred_bytes": self.transferred_bytes,
                "remote_deleted": self.deleted is not None, "deleted": self.deleted, "kept": self.kept}

    def summary(self) -> str:
        lost = self.missing + self.mismatched
        size = sum(int(f.get("bytes") or 0) for f in lost)
        why = f" ({self.error})" if self.error else ""
        mismatched = f", {len(self.mismatched)} mismatched" if self.mismatched else ""
        return f"{self.owner} {self.status}{why}: {len(lost)} files, {size / 1e6:.1f} MB not collected{mismatched}"

    def remote_summary(self) -> str:
        """What became of its worker's copy: deleted (now or before), or kept and why."""
        if self.gone:
            return f"{self.owner}: its copy was already gone from the worker; {len(self.verified)} files here " \
                   f"verified again against the sha256 recorded when they were collected"
        if self.deleted is not None:
            files, size, kept = self.deleted["files"], int(self.deleted["bytes"]), self.deleted.get("kept")
            left = f"; {kept} entries not in its part left there" if kept else ""
            return f"{self.owner}: its copy deleted from the worker ({files} files, {size / 1e6:.1f} MB{left})"
        return f"{self.owner}: its copy kept on the worker: {self.kept}"


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


def delete_part(link: ArchiveLink, session: str, root: Path, part: PartReport, probe: str) -> None:
    """Ask the worker to delete its copy of `part`, verified here in full; `part.deleted` or `part.kept` says how.

    `probe`: a file made in `root`, which the worker must not find in its own session folder.
    """
    verified = {str(f["path"]): str(f["sha256"]) for f in part.verified}
    rehash = sum(int(f.get("bytes") or 0) for f in part.files if not f.get("recorded"))
    try:
        _sync_folders(root, part.verified)  # the renames into place are durable before the other copy goes
        done = link.delete(session, verified, probe, rehash)
    except Refused as err:
        part.kept = f"the worker refused: {err}"
    except (Unreachable, NotMemberError) as err:
        part.kept = f"no answer ({err}); run again to see whether it was deleted"
    except OSError as err:
        part.kept = f"the collected copy could not be synced to disk ({err.strerror})"
    else:
        part.deleted = {"files": done["files"], "bytes": done["bytes"], "kept": done["kept"],
                        "at_utc": utc_stamp(datetime.now(timezone.utc))}


def verify_here(root: Path, part: PartReport, on_progress: Progress) -> None:
    """Check a part whose worker's copy is gone against the sha256 each file had when it was collected."""
    total = sum(int(f.get("bytes") or 0) for f in part.files)
    done = 0
    on_progress(part.owner, 0, total)
    for entry in part.files:
        path, size, sha256 = str(entry.get("path")), int(entry.get("bytes") or 0), str(entry.get("sha256"))
        record = {"path": path, "bytes": size, "sha256": sha256}
        try:
            dest = _destination(root, path)
            held = sha256_file(dest) if dest.is_file() else None
        except (ArchiveError, OSError):
            held = None
        if held == (size, sha256):
            part.verified.append(record)
        elif held is None:
            part.missing.append(dict(record, reason=f"gone from {root}, and from its worker"))
        else:
            part.mismatched.append(dict(record, reason=f"changed in {root}, and gone from its worker"))
        done += size
        on_progress(part.owner, done, total)
    part.status = "complete" if not part.missing and not part.mismatched else "incomplete"


def _sync_folders(root: Path, files: list[dict[str, Any]]) -> None:
    """fsync every folder from root down to the files: a rename is durable only once its folder is."""
    folders = {root}
    for entry in files:
        folder = (root / str(entry["path"])).parent
        while folder != root and folder not in folders and folder.is_relative_to(root):
            folders.add(folder)
            folder = folder.parent
    for folder in sorted(folders):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
