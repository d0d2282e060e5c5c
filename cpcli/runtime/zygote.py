"""Node processes in milliseconds: one preloaded interpreter forks them on request.

A fresh `python -m cpcli.runtime.driver` spends about 0.25 CPU s before the node's own work
starts (interpreter, numpy, pyzmq, cpcli, the node's module); a 2-core laptop starting ten nodes
loses more than a second to that, a 16-worker lab on few cores much more. The zygote is spawned
once per worker (a clean interpreter: no threads, no sockets, no ZeroMQ context), imports the
driver and the heavy libraries once, and forks one child per node. The child points its output
at the node's log, takes the environment the supervisor gave it, shows the driver's command line
in `ps`, and runs the driver's `main` as a spawned node would. Node modules are imported by each
child, never by the zygote: a node type edited on disk between two sessions runs as edited in
the next one, as it did when every node was a fresh interpreter.

Ownership stays with the supervisor although the zygote is the parent: the zygote reports each
child's pid, the supervisor opens a pidfd on it (a signal can never reach a recycled pid) and
acknowledges, and only then may the zygote reap that child and report its exit status. The zygote
dies with its owner (PR_SET_PDEATHSIG and end-of-file on its socket) and its children stop with
it (their own parent check), as spawned nodes stop with their supervisor.

Messages are msgpack maps on a private SOCK_SEQPACKET socket pair: `fork` and `ack` from the
supervisor; `forked`, `failed` and `exited` from the zygote.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import importlib
import logging
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

# Imported once by the zygote, not by each node: OpenCV (0.1-0.2 CPU s) serves every video node and
# every recorded video stream. Not sounddevice: initialising PortAudio opens sound servers, which a
# fork must not share.
PRELOAD = ("cv2",)
MAX_MESSAGE = 1 << 20  # a fork request (an environment and a command line): far below this
MAX_REPLY = 4096  # forked / failed / exited: tens of bytes; read on every poll of a node, so kept small
TITLE_ROOM = 320  # bytes of command line the zygote starts with, so each child can show its own
REAP_POLL_MS = 1000  # the zygote's longest sleep: a SIGCHLD or a request wakes it sooner
START_TIMEOUT_S = 60.0  # spawn -> first fork, at most (imports on a loaded 2-core machine)
CLOSE_TIMEOUT_S = 5.0
LOST_EXIT_CODE = 1  # the exit status of a child whose zygote died before reporting it (unknowable)
_ORPHANED = "ended after its node launcher (zygote) did; its exit status is unknown"
_PR_SET_NAME = 15


NODE_START_ENV = "CP_NODE_START"  # "spawn": a fresh interpreter per node, as before the zygote


@functools.cache
def supported() -> bool:
    """Whether node processes are forked by a zygote here: Linux with pidfds (kernel 5.3+), unless
    CP_NODE_START=spawn asks for a fresh interpreter per node (slower; for a node type that cannot
    live in a forked process). Elsewhere the supervisor spawns each node."""
    if os.environ.get(NODE_START_ENV, "").strip().lower() == "spawn" or not sys.platform.startswith("linux"):
        return False
    if not (hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal") and hasattr(socket, "SOCK_SEQPACKET")):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # an older kernel
        return False
    return True


class ZygoteError(Exception):
    """The zygote is gone or broken: no node can be started through it."""


@dataclass(frozen=True)
class LaunchRequest:
    """One node process to start: the driver's arguments, its environment and its log."""

    node_id: str
    argv: tuple[str, ...]  # cpcli.runtime.driver's arguments but --parent (the child adds the zygote's pid)
    env: Mapping[str, str]  # the whole environment of the node process
    log_path: Path  # its stdout and stderr (appended)


class NodeProcess:
    """A node process forked by a zygote, used like `subprocess.Popen` (one thread only)."""

    def __init__(self, zygote: Zygote, node_id: str, request_id: int) -> None:
        self._zygote = zygote
        self.node_id = node_id
        self.request_id = request_id
        self.pid: int | None = None  # known once the zygote forked it
        self.returncode: int | None = None  # like Popen: -N when ended by signal N
        self.error = ""  # completes "its process ...": why it never started, or why its status is unknown
        self._pidfd = -1
        self._pending_signal: int | None = None  # asked for before the pid was known

    def poll(self) -> int | None:
        self._zygote.pump(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"node {self.node_id}", timeout or 0.0)
            self._zygote.pump(REAP_POLL_MS / 1000 if left is None else min(left, REAP_POLL_MS / 1000))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            return
        if self._pidfd < 0:  # not forked yet: sent as soon as it is (a pending kill is never downgraded)
            if self._pending_signal != signal.SIGKILL:
                self._pending_signal = sig
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    # -- the zygote's side of it ---------------------------------------------------------------

    def _forked(self, pid: int) -> None:
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)  # before the ack: the zygote cannot have reaped it yet
        if self._pending_signal is not None:
            self.send_signal(self._pending_signal)

    def _ended(self, code: int, error: str = "") -> None:
        if self.returncode is not None:
            return
        self.returncode = code
        self.error = self.error or error
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def _gone(self) -> bool:
        """Whether the process has ended (for a child whose zygote died: nobody can report its status)."""
        if self._pidfd < 0:
            return True
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        return bool(readable)


class Zygote:
    """The supervisor's side: spawns the zygote, asks it for node processes, learns how they end.

    Used from one thread. `close()` ends the zygote; node processes must be stopped before.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("cpcli.zygote")
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._children: dict[int, NodeProcess] = {}  # request id -> process, running or waiting to fork
        self._by_pid: dict[int, NodeProcess] = {}
        self._next_id = 0
        self._dead = False

    @property
    def alive(self) -> bool:
        return self._proc is not None and not self._dead

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> Zygote:
        """Spawn the zygote (it imports the node driver while the caller goes on)."""
        if self._proc is not None:
            return self
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "cpcli.runtime.zygote", "--fd", str(theirs.fileno()),
                 "--parent", str(os.getpid()), "." * TITLE_ROOM],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        return self

    def launch(self, request: LaunchRequest) -> NodeProcess:
        """Ask for one node process; it is forked in the background (`pid` is set once it is).

        Raises:
            ZygoteError: the zygote is gone.
        """
        if not self.alive:
            raise ZygoteError("the node launcher (zygote) is not running")
        self._next_id += 1
        process = NodeProcess(self, request.node_id, self._next_id)
        self._send({"t": "fork", "id": process.request_id, "node": request.node_id, "argv": list(request.argv),
                    "env": dict(request.env), "log": str(request.log_path)})
        self._children[process.request_id] = process
        return process

    def pump(self, timeout_s: float = 0.0) -> None:
        """Handle what the zygote said, waiting up to `timeout_s` for the first message."""
        if self._sock is None or self._dead:
            self._check_orphans()
            if timeout_s > 0:
                time.sleep(min(timeout_s, 0.05))
            return
        if timeout_s > 0:
            select.select([self._sock], [], [], timeout_s)
        for _ in range(10_000):  # bounded: each turn takes one message off a finite queue
            try:
                data = self._sock.recv(MAX_REPLY)
            except BlockingIOError:
                return
            except OSError as err:
                self._lost(f"its socket failed: {err}")
                return
            if not data:
                self._lost("it exited")
                return
            self._handle(msgpack.unpackb(data))

    def close(self) -> None:
        """End the zygote (end-of-file on its socket) and wait for it; idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._dead = True
        if self._proc is not None:
            try:
                self._proc.wait(CLOSE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._log.error("node launcher (zygote pid %d) did not exit; killing it", self._proc.pid)
                self._proc.kill()
                self._proc.wait(CLOSE_TIMEOUT_S)
        self._check_orphans()

    # -- inside --------------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        assert self._sock is not None
        try:
            self._sock.setblocking(True)
            self._sock.send(msgpack.packb(message))
        except OSError as err:
            self._lost(f"its socket failed: {err}")
            raise ZygoteError(f"the node launcher (zygote) is gone ({err})") from err
        finally:
            if self._sock is not None:
                self._sock.setblocking(False)

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "forked":
            process = self._children.get(int(message["id"]))
            if process is None or process.pid is not None:
                return
            pid = int(message["pid"])
            try:
                process._forked(pid)
            except OSError as err:  # gone before we could hold it: the zygote reaps and reports it
                process.pid = pid
                self._log.debug("node %s (pid %d) ended before it was held: %s", process.node_id, pid, err)
            self._by_pid[pid] = process
            self._send({"t": "ack", "pid": pid})
        elif kind == "failed":
            process = self._children.pop(int(message["id"]), None)
            if process is not None:
                process._ended(LOST_EXIT_CODE, f"could not be started ({message.get('error')})")
        elif kind == "exited":
            process = self._by_pid.pop(int(message["pid"]), None)
            if process is not None:
                self._children.pop(process.request_id, None)
                process._ended(int(message["code"]))

    def _lost(self, why: str) -> None:
        if self._dead:
            return
        self._dead = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        unfinished = [p for p in self._children.values() if p.returncode is None]
        if unfinished:
            self._log.error("node launcher (zygote pid %s) ended unexpectedly (%s); its node processes stop "
                            "with it: %s", self.pid, why, ", ".join(p.node_id for p in unfinished))
        for process in unfinished:
            if process.pid is None:
                process._ended(LOST_EXIT_CODE, "was never started: the node launcher (zygote) ended first")
        self._check_orphans()

    def _check_orphans(self) -> None:
        for process in self._children.values():
            if process.returncode is None and process._gone():
                process._ended(LOST_EXIT_CODE, _ORPHANED)


# -- the zygote process ------------------------------------------------------------------------

def _set_title(args: Iterable[str], name: str = "") -> None:
    """Show `args` as this process's command line (in `ps`, /proc) and `name` as its short name (top).

    Overwrites the command-line area the process started with, as setproctitle(3) does: Linux then
    reports the text up to its first NUL. Longer text is cut to that area's size.
    """
    with contextlib.suppress(OSError, ValueError, IndexError, AttributeError):
        if name:
            ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
        stat = Path("/proc/self/stat").read_bytes()
        fields = stat[stat.rindex(b")") + 2:].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start and arg_end: fields 48 and 49 of proc(5)
        room = end - start
        text = " ".join(args).encode()[:room - 1]
        # The last byte non-zero tells Linux the area was rewritten: it then stops at the first NUL.
        ctypes.memmove(start, text + b"\0" * (room - len(text) - 1) + b" ", room)


def _preload(modules: Iterable[str]) -> None:
    """Import modules once here, so children share them; a failure is left to the child to report."""
    for name in modules:
        if name not in sys.modules:
            with contextlib.suppress(Exception):
                importlib.import_module(name)


def _child(request: dict[str, Any], zygote_pid: int) -> int:
    """In the forked child: become the node process the request describes, run it, return its exit code."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(str(request["log"]), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in dict(request["env"]).items()})
    importlib.invalidate_caches()  # node modules are imported here, fresh: see folders as they are now
    random.seed()
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:  # the legacy global generator was copied from the zygote: reseed it
        numpy_random.seed()
    argv = [*(str(a) for a in request["argv"]), "--parent", str(zygote_pid)]  # it stops when we end
    _set_title([sys.executable, "-m", "cpcli.runtime.driver", *argv], f"cp {request['node']}")
    from cpcli.runtime import driver

    sys.argv = ["cpcli.runtime.driver", *argv]
    return driver.main(argv)


def _fork(sock: socket.socket, wakeup: tuple[int, int], request: dict[str, Any]) -> int:
    zygote_pid = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        sock.close()
        signal.set_wakeup_fd(-1)
        for fd in wakeup:
            os.close(fd)
        code = _child(request, zygote_pid)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    return 0  # not reached


def _serve(sock: socket.socket, parent_pid: int) -> None:
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_r, False)
    os.set_blocking(wakeup_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wakeup_w)
    acked: set[int] = set()
    replies: list[dict[str, Any]] = []
    while True:
        readable, _, _ = select.select([sock.fileno(), wakeup_r], [], [], REAP_POLL_MS / 1000)
        if wakeup_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wakeup_r, 4096)
        if sock.fileno() in readable:
            data = sock.recv(MAX_MESSAGE)
            if not data:
                return  # our supervisor closed its end or died
            request = msgpack.unpackb(data)
            if request.get("t") == "fork":
                try:
                    pid = _fork(sock, (wakeup_r, wakeup_w), request)
                except OSError as err:
                    replies.append({"t": "failed", "id": request.get("id"), "error": str(err)[:500]})
                else:
                    replies.append({"t": "forked", "id": request.get("id"), "pid": pid})
            elif request.get("t") == "ack":
                acked.add(int(request["pid"]))
        for pid in list(acked):  # only children the supervisor holds a pidfd on may be reaped
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                acked.discard(pid)
                replies.append({"t": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})
        try:
            for reply in replies:
                sock.send(msgpack.packb(reply))
        except OSError:
            return  # our supervisor is gone
        replies.clear()
        if os.getppid() != parent_pid:
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpcli.runtime.zygote", description="fork cpcli node processes")
    parser.add_argument("--fd", type=int, required=True, help="the supervisor's socket (inherited)")
    parser.add_argument("--parent", type=int, required=True, help="the supervisor's pid; exit when it dies")
    parser.add_argument("room", nargs="?", default="", help="room for the children's command lines")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle, in order
    from cpcli.runtime.driver import die_with_parent  # numpy, pyzmq, cpcli: what every node needs

    die_with_parent(args.parent)
    _set_title([sys.executable, "-m", "cpcli.runtime.zygote", "--parent", str(args.parent)])
    sock = socket.socket(fileno=args.fd)
    _preload(PRELOAD)
    try:
        _serve(sock, args.parent)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
