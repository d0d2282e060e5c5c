"""A lab in a box: Linux network namespaces joined by a bridge, standing in for lab laptops on a LAN.

`Lab(hosts=N)` builds, all named `cpt-<pid>-<token>-*` so parallel runs never clash:

- one namespace `...-br` holding the bridge `br0` (no address; multicast snooping off, so every
  multicast frame, mDNS included, is flooded to every port like a plain switch would);
- per host i (1..N) a namespace `...-h<i>` with loopback up and `eth0`, one end of a veth pair whose
  other end `h<i>` is a port of the bridge; `eth0` has 198.18.0.<i>/24 (198.18.0.0/15 is reserved
  for benchmarking, RFC 2544, so nothing here can collide with a real network);
- `lab.add_host(attached=False)` adds a host with only loopback, off the bridge (isolation tests).

Processes started through `run()`/`python()` run inside a host's namespace (`ip netns exec`) in
their own process group. `close()` (or leaving the `with` block, or the `lab` fixture's teardown)
kills those process groups, then anything else still inside the lab's namespaces, deletes every
namespace (which removes the veths and the bridge with them) and checks that `ip netns list` shows
none of them. Nothing is configured outside the lab's own namespaces, and no traffic can leave them.
Root is needed; without it the fixture skips, unless `CI` is set (CI runs as root, so it fails).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

SUBNET = "198.18.0"  # hosts are SUBNET.<i>/24; inside 198.18.0.0/15, never routed anywhere
MAX_HOSTS = 250  # one /24, minus the network and broadcast addresses, with room to spare
IP_TIMEOUT_S = 10.0  # one `ip` command; they take milliseconds, more means the kernel is stuck
STOP_TIMEOUT_S = 3.0  # a process gets this long after SIGTERM before SIGKILL
KILL_TIMEOUT_S = 3.0  # and this long after SIGKILL before it is reported as a straggler
HOST_IFACE = "eth0"


@dataclass(frozen=True)
class Host:
    """One machine of the lab: its namespace, address (None when off the bridge) and bridge port."""

    index: int
    netns: str
    ip: str | None
    port: str | None  # the bridge-side end of its veth, in the bridge namespace


def need_root() -> None:
    """Skip (or, on CI, fail) when namespaces cannot be created here."""
    missing = "needs root" if os.geteuid() != 0 else "needs iproute2 (`ip`)" if shutil.which("ip") is None else ""
    if not missing:
        return
    reason = f"the namespace lab {missing} to create network namespaces (ip netns add)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI must run these tests")
    pytest.skip(reason)


def netns_list() -> list[str]:
    """Names of every network namespace on this machine (`ip netns list`)."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


class Lab:
    """N hosts on one bridged LAN, each its own network namespace; see the module docstring."""

    def __init__(self, hosts: int = 2) -> None:
        if not 0 <= hosts <= MAX_HOSTS:
            raise ValueError(f"a lab holds 0..{MAX_HOSTS} hosts, not {hosts}")
        self.prefix = f"cpt-{os.getpid()}-{secrets.token_hex(3)}"
        self.bridge_netns = f"{self.prefix}-br"
        self.hosts: list[Host] = []
        self._namespaces: list[str] = []  # every namespace created, in order, whatever happens next
        self._procs: list[subprocess.Popen[Any]] = []
        self.build_s = 0.0
        self.teardown_s = 0.0
        started = time.monotonic()
        try:
            self._add_netns(self.bridge_netns)
            self._ipn(self.bridge_netns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            self._ipn(self.bridge_netns, "link", "set", "br0", "up")
            for _ in range(hosts):
                self.add_host()
        except BaseException:
            self.close()
            raise
        self.build_s = time.monotonic() - started

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host(self, index: int) -> Host:
        """Host `index` (1-based, like its address 198.18.0.<index>)."""
        return self.hosts[index - 1]

    def ip(self, index: int) -> str:
        """The address of host `index` on the bridge."""
        ip = self.host(index).ip
        if ip is None:
            raise ValueError(f"host {index} is not on the bridge and has no address")
        return ip

    def add_host(self, attached: bool = True) -> Host:
        """A new host namespace: on the bridge with the next address, or (attached=False) loopback only."""
        index = len(self.hosts) + 1
        if index > MAX_HOSTS:
            raise ValueError(f"a lab holds at most {MAX_HOSTS} hosts")
        netns = f"{self.prefix}-h{index}"
        self._add_netns(netns)
        self._ipn(netns, "link", "set", "lo", "up")
        ip = port = None
        if attached:
            ip, port = f"{SUBNET}.{index}", f"h{index}"
            # Created inside the host namespace with its peer put straight into the bridge namespace,
            # so no interface ever appears in the namespace the tests run in.
            self._ipn(netns, "link", "add", HOST_IFACE, "type", "veth", "peer", "name", port,
                      "netns", self.bridge_netns)
            self._ipn(self.bridge_netns, "link", "set", port, "master", "br0", "up")
            self._ipn(netns, "addr", "add", f"{ip}/24", "dev", HOST_IFACE)
            self._ipn(netns, "link", "set", HOST_IFACE, "up")
        host = Host(index, netns, ip, port)
        self.hosts.append(host)
        return host

    def run(self, host: int, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside host `host`'s namespace, in its own process group; the lab stops it."""
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(["ip", "netns", "exec", self.host(host).netns, *argv],
                                start_new_session=True, **popen_kwargs)
        self._procs.append(proc)
        return proc

    def python(self, host: int, code: str, args: Sequence[str] = (), **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start `python -c code *args` (this interpreter) inside host `host`'s namespace."""
        return self.run(host, [sys.executable, "-c", code, *args], **popen_kwargs)

    def call_python(self, host: int, code: str, args: Sequence[str] = (), *, timeout_s: float,
                    env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `python -c code *args` in host `host` to its end (killed after timeout_s), capturing its output."""
        proc = self.python(host, code, args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            out, err = proc.communicate(timeout=KILL_TIMEOUT_S)
            raise AssertionError(f"`python -c` in host {host} did not finish within {timeout_s:g} s:\n"
                                 f"{out}\n{err}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def link_down(self, host: int) -> None:
        """Pull host `host`'s cable: its bridge port goes down, so its eth0 loses carrier but keeps its address."""
        self._ipn(self.bridge_netns, "link", "set", self._port(host), "down")

    def link_up(self, host: int) -> None:
        """Plug host `host`'s cable back in."""
        self._ipn(self.bridge_netns, "link", "set", self._port(host), "up")

    def close(self) -> None:
        """Stop every process, delete every namespace, and check that none of them is left; idempotent."""
        started = time.monotonic()
        stragglers = [p.args for p in self._procs if not _stop_group(p)]
        for netns in self._namespaces:  # anything a test started some other way inside the lab
            stragglers += self._kill_inside(netns)
        for netns in reversed(self._namespaces):
            _ip("netns", "del", netns, check=False)
        left = sorted(set(self._namespaces) & set(netns_list()))
        self._procs.clear()
        self._namespaces.clear()
        self.teardown_s = time.monotonic() - started
        assert not left, f"lab namespaces left behind: {left}"
        assert not stragglers, f"lab processes that would not die: {stragglers}"

    def _add_netns(self, netns: str) -> None:
        _ip("netns", "add", netns)
        self._namespaces.append(netns)

    def _ipn(self, netns: str, *args: str) -> None:
        _ip("-n", netns, *args)

    def _port(self, host: int) -> str:
        port = self.host(host).port
        if port is None:
            raise ValueError(f"host {host} is not on the bridge")
        return port

    def _kill_inside(self, netns: str) -> list[str]:
        pids = [int(p) for p in _ip("netns", "pids", netns, check=False).stdout.split() if p.isdigit()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while pids and time.monotonic() < deadline:  # bounded: KILL_TIMEOUT_S
            pids = [p for p in pids if _alive(p)]
            if pids:
                time.sleep(0.02)
        return [f"pid {p} in {netns}" for p in pids]


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A two-host lab, torn down after the test whatever its outcome; add hosts with `lab.add_host()`."""
    need_root()
    with Lab(hosts=2) as built:
        yield built


def read_line(proc: subprocess.Popen[Any], timeout_s: float) -> str:
    """The next line `proc` writes to its stdout pipe (binary or text), waiting at most timeout_s.

    Raises:
        AssertionError: no full line within timeout_s, or the process closed its stdout first.
    """
    assert proc.stdout is not None, "start the process with stdout=subprocess.PIPE"
    fd = proc.stdout.fileno()
    buffered = getattr(proc, "_lab_partial", b"")
    deadline = time.monotonic() + timeout_s
    while b"\n" not in buffered:  # bounded by the deadline: every pass waits for data or gives up
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0 or not select.select([fd], [], [], remaining_s)[0]:
            raise AssertionError(f"no line from {proc.args!r} within {timeout_s:g} s (so far: {buffered!r})")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise AssertionError(f"{proc.args!r} closed its output (exit code {proc.poll()}) after {buffered!r}")
        buffered += chunk
    line, rest = buffered.split(b"\n", 1)
    proc._lab_partial = rest  # type: ignore[attr-defined]  # read_line reads the fd itself, past any buffer
    return line.decode()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _stop_group(proc: subprocess.Popen[Any]) -> bool:
    """SIGTERM then SIGKILL the process group `proc` leads; True once `proc` is gone."""
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, KILL_TIMEOUT_S)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)  # its own group (start_new_session), so only what it started
        except ProcessLookupError:
            break
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll() is not None  # what it left behind in the lab dies in the namespace sweep


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
