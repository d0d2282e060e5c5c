"""The running `cp monitor`: a thread asking the manager, previews, the keyboard and the screen.

Threads: the main thread owns the screen, the keyboard (stdin in cbreak mode) and the preview
sockets, and waits on all of them in one poll; `StatusPoller` owns the requests to the manager
(status twice to ten times a second, and marks), which may block while the manager is away, and
hands its answers over by a queue.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import sys
import termios
import threading
import time
import tty
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from types import FrameType
from typing import Any

from rich.console import Console
from rich.live import Live

from cpcli.cluster.client import cluster_status, send_mark
from cpcli.cluster.locate import locate
from cpcli.cluster.timing import ClusterTiming
from cpcli.errors import AccessError, CpError
from cpcli.monitor.feed import PreviewFeed
from cpcli.monitor.state import TypeInfo, UiState
from cpcli.monitor.tracker import Tracker
from cpcli.monitor.view import MonitorView, plain_view
from cpcli.transport.curve import Credentials, DataSecurity

ANSWER_TIMEOUT_S = 2.0  # a status request unanswered this long: the manager is unreachable (retried at once)
MESSAGE_S = 6.0  # how long a line like "marked stimulus_on" stays at the bottom
WAIT_SAY_S = 30.0  # with --wait, how often "still waiting" is repeated
RETRY_S = 0.5  # with --wait, the pause between two looks for the manager
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class StatusReply:
    status: dict[str, Any] | None
    error: str | None
    at: float


@dataclass(frozen=True)
class MarkReply:
    label: str
    text: str
    ok: bool


class StatusPoller:
    """Asks the manager for its status every `interval_s` and sends marks, in a thread of its own."""

    def __init__(self, address: str, timing: ClusterTiming, interval_s: float, credentials: Credentials) -> None:
        self.address, self.interval_s, self.credentials = address, interval_s, credentials
        self.timing = replace(timing, answer_timeout_s=min(timing.answer_timeout_s, ANSWER_TIMEOUT_S))
        self.replies: queue.Queue[StatusReply | MarkReply] = queue.Queue()
        self._marks: queue.Queue[str] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor-status", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def mark(self, label: str) -> None:
        self._marks.put(label)
        self._wake.set()

    def stop(self) -> None:
        """Idempotent; waits for a request in flight (at most its answer timeout)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(self.timing.answer_timeout_s + 2.0)

    def _run(self) -> None:
        next_poll = 0.0
        while not self._stop.is_set():
            with contextlib.suppress(queue.Empty):
                label = self._marks.get_nowait()
                self.replies.put(self._send_mark(label))
                continue
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + self.interval_s
                self.replies.put(self._ask())
            self._wake.wait(max(0.0, next_poll - time.monotonic()))
            self._wake.clear()

    def _ask(self) -> StatusReply:
        try:
            return StatusReply(cluster_status(self.address, self.timing, self.credentials), None, time.monotonic())
        except CpError as err:
            return StatusReply(None, err.message, time.monotonic())
        except Exception as err:  # noqa: BLE001 - this thread's boundary: the screen shows it, never a traceback
            return StatusReply(None, f"{type(err).__name__}: {err}", time.monotonic())

    def _send_mark(self, label: str) -> MarkReply:
        try:
            done = send_mark(self.address, label, {}, self.timing, self.credentials)
            return MarkReply(label, f"marked {label} at {int(done['t_ns']) / 1e9:.3f} s", True)
        except CpError as err:
            return MarkReply(label, f"mark {label} not sent: {err.message}", False)
        except Exception as err:  # noqa: BLE001 - as above
            return MarkReply(label, f"mark {label} not sent: {type(err).__name__}: {err}", False)


# -- the keyboard ------------------------------------------------------------------------------------

_CSI_KEYS = {"A": "up", "B": "down", "C": "right", "D": "left", "Z": "backtab"}
_CONTROL_KEYS = {"\r": "enter", "\n": "enter", "\t": "tab", "\x7f": "backspace", "\x08": "backspace",
                 "\x03": "ctrl-c"}


def parse_keys(data: bytes) -> list[str]:
    """Keys in what a terminal sent: printable characters as themselves, others by name (`up`, `enter`...)."""
    text = data.decode("utf-8", errors="ignore")
    keys: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\x1b":
            if i + 1 < len(text) and text[i + 1] in "[O":
                j = i + 2
                while j < len(text) and not ("@" <= text[j] <= "~"):  # parameters, up to the final byte
                    j += 1
                if j < len(text) and text[j] in _CSI_KEYS:
                    keys.append(_CSI_KEYS[text[j]])
                i = j + 1
                continue
            keys.append("esc")
        elif char in _CONTROL_KEYS:
            keys.append(_CONTROL_KEYS[char])
        elif char.isprintable():
            keys.append(char)
        i += 1
    return keys


@contextlib.contextmanager
def cbreak(fd: int | None) -> Iterator[bool]:
    """Keys arrive one by one, unechoed (Ctrl-C still interrupts); the terminal is restored however we leave."""
    if fd is None or not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class _LogLines(logging.Handler):
    """cpcli's warnings during the monitor go to its bottom line, not across the screen."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: deque[str] = deque(maxlen=8)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


# -- the loop --------------------------------------------------------------------------------------


class _Ui:
    """The person's choices, mutable in the main thread; `state()` freezes them for a snapshot."""

    def __init__(self) -> None:
        self.selected: str | None = None
        self.previews_on = True
        self.prompt: str | None = None
        self.message: tuple[str, bool, float] | None = None  # text, is an error, shown until

    def say(self, text: str, error: bool, now: float) -> None:
        self.message = (text, error, now + MESSAGE_S)

    def state(self, now: float) -> UiState:
        message = self.message if self.message and self.message[2] > now else None
        return UiState(self.selected, self.previews_on, self.prompt, message[0] if message else None,
                       bool(message and message[1]))


class Monitor:
    """One `cp monitor` session on the terminal; `run()` returns the exit code."""

    def __init__(self, address: str, timing: ClusterTiming, types: dict[str, TypeInfo], refresh_hz: float,
                 console: Console, credentials: Credentials, first: dict[str, Any] | None = None,
                 stdin_fd: int | None = None) -> None:
        self.console, self.refresh_hz = console, refresh_hz
        self.tracker = Tracker(types)
        if first is not None:
            self.tracker.update(first, time.monotonic())
        self.poller = StatusPoller(address, timing, max(0.25, 1.0 / refresh_hz), credentials)
        self.credentials = credentials
        self.feed = PreviewFeed()
        self.ui = _Ui()
        self._stdin = stdin_fd
        self._quit = False
        self._interrupted = False
        self._logs = _LogLines()

    def run(self) -> int:
        """Until `q`, Ctrl-C (130), SIGTERM or a hang-up; the terminal is restored on every way out.

        An output that is not a terminal gets the tables once (`cp status --json` is for scripts).
        """
        if not self.console.is_terminal:
            self.feed.close()
            self.console.print(plain_view(self.tracker.snapshot(time.monotonic())))
            return 0
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        logger = logging.getLogger("cpcli")
        logger.addHandler(self._logs)
        try:
            with cbreak(self._stdin) as keys, Live(console=self.console, screen=True, auto_refresh=False,
                                                   redirect_stdout=False, redirect_stderr=False) as live:
                self.poller.start()
                self._watch()
                self._loop(live, keys)
        except KeyboardInterrupt:  # a Ctrl-C key read as a character (a terminal without signals)
            self._interrupted = True
        finally:
            self.poller.stop()
            self.feed.close()
            logger.removeHandler(self._logs)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return EXIT_INTERRUPTED if self._interrupted else 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """Leave at the next turn of the loop (within one refresh), never half-way through a request."""
        self._interrupted = self._interrupted or signum == signal.SIGINT
        self._quit = True

    def _loop(self, live: Live, keys: bool) -> None:
        period = 1.0 / self.refresh_hz
        next_draw = 0.0
        while not self._quit:
            previews, typed = self.feed.poll(max(0.0, next_draw - time.monotonic()), self._stdin if keys else None)
            now = time.monotonic()
            for node, port, value in previews:
                self.tracker.add_preview(node, port, value, now)
            self._take_replies(now)
            if typed:
                assert self._stdin is not None
                data = os.read(self._stdin, 1024)
                if not data:
                    keys = False  # stdin closed: no more keys, the view goes on
                for key in parse_keys(data):
                    self._key(key, now)
                next_draw = now  # answer a key at once
            while self._logs.lines:
                self.ui.say(self._logs.lines.popleft(), True, now)
            if now >= next_draw and not self._quit:
                self._fit_terminal()
                live.update(MonitorView(self.tracker.snapshot(now, self.ui.state(now))), refresh=True)
                next_draw = now + period

    def _fit_terminal(self) -> None:
        """The terminal's own size, followed when it changes (COLUMNS/LINES in the environment may be stale)."""
        with contextlib.suppress(OSError, ValueError):
            self.console.size = os.get_terminal_size(self.console.file.fileno())

    def _take_replies(self, now: float) -> None:
        while True:
            try:
                reply = self.poller.replies.get_nowait()
            except queue.Empty:
                return
            if isinstance(reply, MarkReply):
                self.ui.say(reply.text, not reply.ok, now)
            elif reply.status is not None:
                self.tracker.update(reply.status, reply.at)
                session = reply.status.get("session")
                if isinstance(session, dict) and session.get("name"):  # previews need the session's data keys
                    self.feed.secure(DataSecurity(self.credentials, bool(session.get("encrypt_data", True)),
                                                  str(session["name"])))
                self._watch()
            else:
                self.tracker.unreachable(reply.error or "no answer", reply.at)

    def _watch(self) -> None:
        self.feed.watch(self.tracker.preview_ports() if self.ui.previews_on else {})

    def _key(self, key: str, now: float) -> None:
        ui = self.ui
        if key == "ctrl-c":
            raise KeyboardInterrupt
        if ui.prompt is not None:  # typing a mark's label
            if key == "enter":
                label = ui.prompt.strip()
                ui.prompt = None
                if label:
                    self.poller.mark(label)
                    ui.say(f"marking {label} …", False, now)
            elif key == "esc":
                ui.prompt = None
            elif key == "backspace":
                ui.prompt = ui.prompt[:-1]
            elif len(key) == 1:
                ui.prompt += key
            return
        if key == "q":
            self._quit = True
        elif key == "m":
            ui.prompt = ""
        elif key == "p":
            ui.previews_on = not ui.previews_on
            self._watch()
            ui.say("previews " + ("on" if ui.previews_on else "off: the nodes stop making them"), False, now)
        elif key in ("right", "down", "tab", "left", "up", "backtab"):
            ui.selected = _step(self.tracker.node_ids(), ui.selected, 1 if key in ("right", "down", "tab") else -1)
        elif key == "esc":
            ui.selected = None


def _step(ids: tuple[str, ...], current: str | None, by: int) -> str | None:
    if not ids:
        return None
    if current not in ids:
        return ids[0] if by > 0 else ids[-1]
    return ids[(ids.index(current) + by) % len(ids)]


@contextlib.contextmanager
def _interrupt_between_requests() -> Iterator[list[bool]]:
    """Ctrl-C raises KeyboardInterrupt only between requests: one interrupted half-way leaves a socket
    open, and its ZeroMQ context would then wait for it forever."""
    hit = [False]

    def on_interrupt(_signum: int, _frame: FrameType | None) -> None:
        hit[0] = True

    old = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield hit
    finally:
        signal.signal(signal.SIGINT, old)


def find_manager(manager: str | None, interface: str | None, cluster: str | None, timing: ClusterTiming,
                 wait: bool, say: Callable[[str], None], token: str | None = None
                 ) -> tuple[str, Credentials, dict[str, Any]]:
    """The manager's address, the keys to talk to it and its first status; with `wait`, look until one answers."""
    said_at = -WAIT_SAY_S
    quick = replace(timing, answer_timeout_s=min(timing.answer_timeout_s, ANSWER_TIMEOUT_S))
    with _interrupt_between_requests() as interrupted:
        while True:
            try:
                ref = locate(manager, interface, cluster, timing.discovery_s, required=True)
                assert ref is not None
                credentials = ref.credentials(token)
                status = cluster_status(ref.address, quick, credentials)
            except CpError as err:
                if interrupted[0]:
                    raise KeyboardInterrupt from None
                if not wait or isinstance(err, AccessError):  # waiting does not make this machine a member
                    raise
                if time.monotonic() - said_at >= WAIT_SAY_S:
                    say(f"{err.message}; waiting for a manager (Ctrl-C to give up)")
                    said_at = time.monotonic()
            else:
                if interrupted[0]:
                    raise KeyboardInterrupt
                return ref.address, credentials, status
            deadline = time.monotonic() + RETRY_S
            while not interrupted[0] and time.monotonic() < deadline:
                time.sleep(0.05)
            if interrupted[0]:
                raise KeyboardInterrupt


def stdin_fd() -> int | None:
    try:
        return sys.stdin.fileno() if sys.stdin is not None else None
    except (OSError, ValueError):
        return None
