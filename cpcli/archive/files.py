"""Files a recorder writes: each hashed as it is written, created exclusively, flushed on time."""

from __future__ import annotations

import csv
import hashlib
import io
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpcli.errors import ArchiveError

BUFFER_LIMIT_BYTES = 4 << 20  # bounds a sink's memory between flushes; larger writes go out early
HASH_CHUNK_BYTES = 1 << 20  # reading a finished segment back for its sha256, one chunk at a time


@dataclass(frozen=True)
class FileRecord:
    """One finished archive file: `path` relative to the session folder (posix), its kind, size and sha256."""

    path: str
    kind: str
    bytes: int
    sha256: str


class StreamWriter(ABC):
    """The files of one port and one sample kind; used only by the recorder's writer thread."""

    @abstractmethod
    def write(self, index: int, t_ns: int, local_ns: int, value: Any, rate_hz: float | None) -> None:
        """Append one sample (`t_ns` on the session timeline, `local_ns` the recording machine's monotonic time)."""

    @abstractmethod
    def flush(self) -> None:
        """Put everything written so far on disk (fsync), so that a crash cannot take it."""

    @abstractmethod
    def close(self) -> list[FileRecord]:
        """Finalize every file not yet finished and return the records of all of them."""

    @property
    @abstractmethod
    def bytes_written(self) -> int:
        """Bytes handed to the files so far."""


def exists_error(rel: str) -> ArchiveError:
    return ArchiveError(f"{rel} already exists; a recording is never overwritten", hint="use a new session folder")


def sha256_file(path: Path, fsync: bool = False) -> tuple[int, str]:
    """A file's size and sha256, read once in chunks (and fsynced on the way if asked)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return size, digest.hexdigest()


def file_record(path: Path, rel: str, kind: str) -> FileRecord:
    """Read a finished file once for its sha256 and size, and fsync it on the way."""
    try:
        size, sha256 = sha256_file(path, fsync=True)
    except OSError as err:
        raise ArchiveError(f"cannot read back {rel} ({err.strerror})") from err
    return FileRecord(rel, kind, size, sha256)


class FileSink:
    """A new file written front to back through a memory buffer, hashed as it goes.

    What reaches the disk always ends where a `write()` ended (a whole row or block), so a
    crash never leaves half a line behind. `patch()` rewrites bytes already written (a WAV
    header); the file is then hashed by reading it back once at `close()`.
    """

    def __init__(self, path: Path, rel: str, kind: str) -> None:
        self.path, self.rel, self.kind = path, rel, kind
        try:
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError as err:
            raise exists_error(rel) from err
        except OSError as err:
            raise ArchiveError(f"cannot create {rel} ({err.strerror})") from err
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._size = 0
        self._patches: list[tuple[int, bytes]] = []
        self._digest: Any = hashlib.sha256()  # None once patched: hashed by reading back
        self._record: FileRecord | None = None

    @property
    def bytes_written(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        self._buffer.append(data)
        self._buffered += len(data)
        self._size += len(data)
        if self._digest is not None:
            self._digest.update(data)
        if self._buffered >= BUFFER_LIMIT_BYTES:
            self.push()

    def patch(self, offset: int, data: bytes) -> None:
        """Overwrite `data` at `offset` (within what was written) at the next flush."""
        self._patches.append((offset, data))
        self._digest = None

    def flush(self) -> None:
        self.push()
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as err:
                raise ArchiveError(f"cannot write {self.rel} ({err.strerror})") from err

    def close(self) -> FileRecord:
        if self._record is not None:
            return self._record
        try:
            self.flush()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if self._digest is None:
            self._record = file_record(self.path, self.rel, self.kind)
        else:
            self._record = FileRecord(self.rel, self.kind, self._size, self._digest.hexdigest())
        return self._record

    def push(self) -> None:
        """Hand what is buffered to the OS (no fsync): a process crash can no longer take it."""
        if self._fd is None:
            return
        data = memoryview(b"".join(self._buffer))
        self._buffer, self._buffered = [], 0
        try:
            while data:
                data = data[os.write(self._fd, data) :]
            for offset, patch in self._patches:
                os.pwrite(self._fd, patch, offset)
        except OSError as err:
            raise ArchiveError(f"cannot write {self.rel} ({err.strerror})") from err
        self._patches.clear()


class CsvSink:
    """A CSV file with a header row, written through a `FileSink` one whole row at a time."""

    def __init__(self, sink: FileSink, header: Iterable[str]) -> None:
        self._sink = sink
        self._text = io.StringIO()
        self._csv = csv.writer(self._text, lineterminator="\n")
        self.write_row(header)
        sink.push()  # a file on disk always has its header

    @property
    def bytes_written(self) -> int:
        return self._sink.bytes_written

    def write_row(self, row: Iterable[object]) -> None:
        self._csv.writerow(row)
        self._sink.write(self._text.getvalue().encode())
        self._text.seek(0)
        self._text.truncate()

    def flush(self) -> None:
        self._sink.flush()

    def push(self) -> None:
        """Hand buffered rows to the OS (they survive the process being killed; no fsync)."""
        self._sink.push()

    def close(self) -> FileRecord:
        return self._sink.close()


@dataclass(frozen=True)
class PortFiles:
    """Where one port's files go: `directory` on disk, `rel_dir` inside the session, named by port."""

    directory: Path
    rel_dir: str
    node_id: str
    port: str

    @property
    def where(self) -> str:
        return f"port {self.port} of node {self.node_id}"

    def path(self, name: str) -> Path:
        return self.directory / name

    def rel(self, name: str) -> str:
        return f"{self.rel_dir}/{name}"

    def sink(self, name: str, kind: str) -> FileSink:
        return FileSink(self.path(name), self.rel(name), kind)

    def csv(self, name: str, kind: str, header: Iterable[str]) -> CsvSink:
        return CsvSink(self.sink(name, kind), header)

    def segment(self, number: int, ext: str) -> str:
        return f"{self.port}-{number:04d}.{ext}"
