"""Shared fixtures: real processes and sockets, and checks that a test leaves none behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from cpcli.cluster import keys
from cpcli.registry import Registry, load_registry
from cpcli.transport.curve import Credentials

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIR = Path(__file__).resolve().parent / "plugin"
if str(PLUGIN_DIR) not in sys.path:  # the test plugin is found through its dist-info, like any plugin
    sys.path.insert(0, str(PLUGIN_DIR))
_paths = (str(PLUGIN_DIR), os.environ.get("PYTHONPATH"))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in _paths if p)  # node processes find the plugin too
# `cp manager` notes itself in the runtime folder so `cp run` on its machine finds it; the tests get a
# folder of their own, so a manager a developer runs on this machine never takes over their `cp run`.
os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="cpcli-tests-run-")
# Cluster keys the tests make go to a folder of their own too, never into the developer's ~/.config.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="cpcli-tests-config-")
for _name in ("CP_MANAGER", "CP_INTERFACE", "CP_CLUSTER_TIMING", "CP_TOKEN"):
    os.environ.pop(_name, None)

SHM_DIR = Path("/dev/shm")
LEAK_GRACE_S = 5.0  # processes a test started may take this long to exit after it returns
PROCESS_WIDE_THREADS = {"GarbageCollectorThread"}  # pyzmq's zero-copy collector lives as long as the process


@pytest.fixture
def cluster_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Credentials:
    """The keys of cluster `lab`, made as the first `cp manager` makes them, in a config folder of the test."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    creds = keys.manager_keys("lab", create=True)
    assert creds is not None
    return creds


@pytest.fixture(scope="session")
def registry() -> Registry:
    return load_registry()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves child processes or threads behind (and clean them up)."""
    me = psutil.Process()
    threads_before = set(threading.enumerate())
    segments_before = set(SHM_DIR.glob("cpcli_*")) if SHM_DIR.is_dir() else set()
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    children = me.children(recursive=True)
    while children and time.monotonic() < deadline:
        time.sleep(0.05)
        children = [c for c in me.children(recursive=True)
                    if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    for child in children:
        child.kill()
    leaked_threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()
                      and type(t).__name__ not in PROCESS_WIDE_THREADS]
    assert not children, f"processes left behind: {[c.cmdline() for c in children]}"
    assert not leaked_threads, f"threads left behind: {leaked_threads}"
    leaked_segments = {p for p in (set(SHM_DIR.glob("cpcli_*")) if SHM_DIR.is_dir() else set()) - segments_before
                       if not _owned_by_another_live_process(p.name)}
    for segment in leaked_segments:
        segment.unlink(missing_ok=True)
    assert not leaked_segments, f"shared memory left behind: {sorted(p.name for p in leaked_segments)}"


def _owned_by_another_live_process(name: str) -> bool:
    """Segments of processes this test did not start (another run on the machine) are not its leaks."""
    pid = name.split("_")[-2] if name.count("_") >= 4 else ""
    if not pid.isdigit() or not psutil.pid_exists(int(pid)):
        return False
    return psutil.Process(int(pid)) not in psutil.Process().children(recursive=True)


def cp(*args: str, cwd: Path | None = None, timeout: float = 25.0, env: dict[str, str] | None = None
       ) -> subprocess.CompletedProcess[str]:
    """Run the real `cp` entry point of this checkout (`python -m cpcli`) and capture its output."""
    return subprocess.run([sys.executable, "-m", "cpcli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def write_recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def wait_until(condition: Callable[[], bool], pump: Callable[[], None] | None = None, timeout_s: float = 5.0) -> None:
    """Wait (bounded) for `condition`, calling `pump` between looks (to move sockets along)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        if pump is not None:
            pump()
        time.sleep(0.002)


@contextlib.contextmanager
def small_disk(path: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of `size_bytes` mounted at `path` (made here; root only), unmounted whatever happens (lazily if held)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                             capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    assert mounted.returncode == 0, mounted.stderr
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=10).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)
