"""A large file written in order past the page cache (O_DIRECT) where the file system allows it.

`cp collect` moves gigabytes it will not read again. Written through the page cache, each byte is
copied into it by the CPU and then written back to disk; written with O_DIRECT, the disk takes it
straight from one reused, page-aligned buffer. On the 2-vCPU test VM a buffered 1 GiB write with
fsync costs 0.9-1.8 CPU s, a direct one 0.1 (`benchmarks/RESULTS.md`, collect.py): on a laptop
that collects while the study goes on, that CPU is the difference.

O_DIRECT wants each write's memory, offset and length aligned to the device's block. The buffer is
an anonymous mmap (page aligned); every write but the file's last is a whole number of blocks;
the last block is padded with zeros and the file then truncated to its true length. Where any of
that is refused (no O_DIRECT on this system, a file system that says EINVAL, an unaligned resume
point it cannot trim to) the file is written through the page cache instead, with the same bytes.
Only local disk file systems are written directly: on a network one (NFS, SMB, FUSE) every direct
write would wait for the server, where the page cache lets the writes run ahead of it.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
from pathlib import Path

BLOCK_BYTES = 4096  # O_DIRECT alignment: a multiple of every common device's logical block (512 or 4096)
O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere (macOS) every file goes through the page cache
LOCAL_FILE_SYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "bcachefs", "zfs", "exfat",
                                "vfat", "ntfs3", "tmpfs", "overlay"})  # written directly; any other type is buffered
MOUNTINFO = "/proc/self/mountinfo"


def file_system(path: Path) -> str | None:
    """The type of the file system that holds `path` (an existing folder or file), None where unknown."""
    try:
        real = os.path.realpath(path)
        with open(MOUNTINFO, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    found, kind = "", None
    for line in lines:  # `id parent major:minor root mount-point options [optional...] - type source super-options`
        fields = line.split(" ")
        if "-" not in fields[6:] or len(fields) < 5:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda x: chr(int(x.group(1), 8)), fields[4])  # "\040" is a space
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(found):  # the deepest mount; of equal ones the later (mounted on top)
            found, kind = point, fields[fields.index("-", 6) + 1]
    return kind


class DirectFile:
    """Appends to `path` (created if missing) from its current length, or from that length rounded
    down to a whole block when written directly: `offset` says where the next byte goes.

    One owner, one thread. A write takes at most `capacity_bytes`: `write(data)`, or `buffer(n)` filled
    in place (a decryption straight into it) and then `write_buffer(n)`, which saves a copy. After a
    write whose length is not a whole block nothing more is written directly (the file is buffered
    from then on). `close()` fsyncs: what was written is on disk once it returns.
    """

    def __init__(self, path: Path, capacity_bytes: int, direct: bool = True) -> None:
        self.path = path
        self.capacity_bytes = capacity_bytes
        self._fd = -1
        self.direct = False
        if direct and O_DIRECT and file_system(path.parent) in LOCAL_FILE_SYSTEMS:
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | O_DIRECT, 0o644)
                self.direct = True
            except OSError as err:
                if err.errno != errno.EINVAL:  # EINVAL: this file system takes no O_DIRECT
                    raise
        if self._fd < 0:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            self.offset = os.fstat(self._fd).st_size
            if self.direct and self.offset % BLOCK_BYTES:
                self.offset -= self.offset % BLOCK_BYTES  # a partial block (a buffered run's end) is written again
                os.ftruncate(self._fd, self.offset)
            self._buffer = mmap.mmap(-1, -(-capacity_bytes // BLOCK_BYTES) * BLOCK_BYTES)  # page aligned
        except BaseException:
            os.close(self._fd)
            raise

    def buffer(self, n: int) -> memoryview:
        """The first `n` bytes of the file's own buffer, to fill and then hand to `write_buffer(n)`."""
        self._check(n)
        return memoryview(self._buffer)[:n]

    def write(self, data: memoryview | bytes) -> None:
        """Write all of `data` at `offset`. Raises OSError (ENOSPC: the disk is full) as the system does."""
        n = len(data)
        self._check(n)
        if self.direct:
            self._buffer[:n] = data
            self.write_buffer(n)
        else:
            self._write_all(memoryview(data), self.offset)
            self.offset += n

    def write_buffer(self, n: int) -> None:
        """Write the first `n` bytes of the file's buffer at `offset` (see `write`)."""
        self._check(n)
        view = memoryview(self._buffer)
        try:
            if self.direct:
                try:
                    self._write_direct(view, n)
                    return
                except OSError as err:
                    if err.errno != errno.EINVAL:
                        raise
                    self._stop_direct()  # alignment this file system wants more of: buffered from here
            self._write_all(view[:n], self.offset)
            self.offset += n
        finally:
            view.release()

    def _check(self, n: int) -> None:
        if n > self.capacity_bytes:
            raise ValueError(f"{n} bytes in one write, more than the {self.capacity_bytes} this file takes")

    def _write_direct(self, view: memoryview, n: int) -> None:
        padded = -(-n // BLOCK_BYTES) * BLOCK_BYTES
        if padded != n:
            view[n:padded] = bytes(padded - n)
        written = os.pwrite(self._fd, view[:padded], self.offset)
        if written < padded:  # a short direct write (rare; ENOSPC at the edge): the rest goes buffered
            done = min(written - written % BLOCK_BYTES, n)
            self._stop_direct()
            os.ftruncate(self._fd, self.offset + done)
            self._write_all(view[done:n], self.offset + done)
        elif padded != n:
            os.ftruncate(self._fd, self.offset + n)  # the padding of the last block goes
            self._stop_direct()  # the next write would start inside a block
        self.offset += n

    def _write_all(self, data: memoryview, offset: int) -> None:
        while len(data):  # bounded: each pass writes at least a byte or raises
            written = os.pwrite(self._fd, data, offset)
            data, offset = data[written:], offset + written

    def _stop_direct(self) -> None:
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~O_DIRECT)
        self.direct = False

    def close(self) -> None:
        """fsync and close; idempotent. The fsync's error (EIO, ENOSPC) is raised after the close."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
            self._buffer.close()

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
