"""DirectFile: a large file written past the page cache where the file system allows, the same bytes where not."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cpcli.archive.direct import BLOCK_BYTES, LOCAL_FILE_SYSTEMS, O_DIRECT, DirectFile, file_system
from tests.conftest import small_disk

CHUNK = 1 << 20


def _takes_direct(folder: Path) -> bool:
    """Whether this folder's file system is a local disk's that opens files with O_DIRECT (ext4, xfs, btrfs do)."""
    if not O_DIRECT or file_system(folder) not in LOCAL_FILE_SYSTEMS:
        return False
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    (folder / "probe").unlink()
    return True


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(256)) * (n // 256) + bytes(n % 256)


@pytest.fixture
def direct_dir(tmp_path: Path) -> Path:
    if not _takes_direct(tmp_path):
        pytest.skip(f"the file system of {tmp_path} takes no O_DIRECT")
    return tmp_path


def test_whole_blocks_are_written_directly_and_the_unaligned_end_is_padded_then_cut(direct_dir: Path) -> None:
    path = direct_dir / "out.bin"
    chunks = [_pattern(CHUNK, 1), _pattern(CHUNK, 2), _pattern(12345, 3)]
    with DirectFile(path, CHUNK) as out:
        assert out.direct and out.offset == 0
        out.write(chunks[0])
        with out.buffer(CHUNK) as view:  # filled in place, as a decryption does
            view[:] = chunks[1]
        out.write_buffer(CHUNK)
        assert out.direct  # whole blocks so far
        out.write(chunks[2])
        assert not out.direct and out.offset == 2 * CHUNK + 12345  # the next write would start mid-block
        out.write(b"tail")  # buffered from here
    assert path.read_bytes() == b"".join(chunks) + b"tail"


def test_a_resumed_direct_file_continues_from_its_last_whole_block(direct_dir: Path) -> None:
    path = direct_dir / "part.bin"
    path.write_bytes(_pattern(3 * BLOCK_BYTES + 100, 4))  # what a buffered run left: a partial block at its end
    with DirectFile(path, CHUNK) as out:
        assert out.direct and out.offset == 3 * BLOCK_BYTES
        assert path.stat().st_size == 3 * BLOCK_BYTES  # the partial block is fetched again, not kept
        out.write(_pattern(BLOCK_BYTES, 5))
    assert path.read_bytes() == _pattern(3 * BLOCK_BYTES + 100, 4)[:3 * BLOCK_BYTES] + _pattern(BLOCK_BYTES, 5)


def test_buffered_when_asked_keeps_every_byte_of_a_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "part.bin"
    path.write_bytes(b"x" * 5000)
    with DirectFile(path, CHUNK, direct=False) as out:
        assert not out.direct and out.offset == 5000
        out.write(b"y" * 3)
        with out.buffer(2) as view:
            view[:] = b"zz"
        out.write_buffer(2)
    assert path.read_bytes() == b"x" * 5000 + b"yyyzz"


def test_a_write_larger_than_the_buffer_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    with DirectFile(path, 4096) as out:
        with pytest.raises(ValueError, match="4097 bytes in one write, more than the 4096"):
            out.write(bytes(4097))
        with pytest.raises(ValueError):
            out.buffer(4097)
    assert path.stat().st_size == 0


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 3 MiB (root only, like the lab)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with small_disk(tmp_path / "small", 3 << 20) as folder:
        yield folder


def test_a_full_disk_raises_enospc_and_what_was_written_is_a_prefix(full_disk: Path) -> None:
    path = full_disk / "out.bin"
    written = 0
    with pytest.raises(OSError) as raised, DirectFile(path, CHUNK) as out:
        for i in range(8):  # 8 MiB into 3: bounded, and ENOSPC comes before the end
            out.write(_pattern(CHUNK, i))
            written += CHUNK
    assert raised.value.errno == errno.ENOSPC
    held = path.read_bytes()
    assert written <= len(held) < 8 * CHUNK
    assert held == b"".join(_pattern(CHUNK, i) for i in range(8))[:len(held)]


def test_the_file_system_type_comes_from_the_mount_table_and_only_local_disks_are_written_directly(
        tmp_path: Path) -> None:
    found = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", str(tmp_path)], capture_output=True,
                           text=True, timeout=10)
    assert found.returncode == 0, found.stderr
    assert file_system(tmp_path) == found.stdout.strip().splitlines()[0]
    assert file_system(tmp_path / "not" / "there") == file_system(tmp_path)  # not made yet: its parents' mount
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    with small_disk(tmp_path / "small disk", 1 << 20) as folder:  # a space in the mount point: escaped there
        assert file_system(folder) == "tmpfs"
    folder = tmp_path / "ram"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(folder)], capture_output=True, text=True,
                             timeout=10)
    assert mounted.returncode == 0, mounted.stderr
    try:
        assert file_system(folder) == "ramfs" and "ramfs" not in LOCAL_FILE_SYSTEMS
        with DirectFile(folder / "out.bin", CHUNK) as out:
            assert not out.direct  # not a file system written directly: the page cache takes it
            out.write(b"kept")
        assert (folder / "out.bin").read_bytes() == b"kept"
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True, timeout=10).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=10)
