"""`cp monitor` end to end: a session on two machines of the namespace lab, the monitor in a real terminal (tmux)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from zmq.utils import z85

from cpcli.cli.monitor_live import parse_keys
from cpcli.cluster import keys
from cpcli.transport.curve import Credentials
from tests.cluster import PORT, ClusterLab
from tests.conftest import cp
from tests.lab import Lab, lab

__all__ = ["lab"]

TMUX = "/usr/bin/tmux"
COLS, ROWS = 120, 40
TWO_MACHINES = """\
name: monitored
nodes:
  cam:
    type: test_video
    worker: w2
    params: {width: 160, height: 120, rate_hz: 15}
    record: true
  gray:
    type: grayscale
    worker: m1
    inputs: [cam]
    record: true
  tone:
    type: test_audio
    worker: m1
    params: {samplerate: 16000, blocksize: 800}
  level:
    type: audio_level
    worker: m1
    inputs: [tone]
    record: true
"""


class Terminal:
    """A tmux server of our own (private socket) running one command in a COLS x ROWS pane inside a lab host."""

    def __init__(self, lab: Lab, host: int, command: str, cwd: Path, env: dict[str, str]) -> None:
        self.socket = f"cpt-mon-{os.getpid()}-{secrets.token_hex(3)}"
        self._netns = lab.host(host).netns
        self._env = env
        self._tmux("new-session", "-d", "-x", str(COLS), "-y", str(ROWS), "-s", "mon", "-c", str(cwd), command)

    def _tmux(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(["ip", "netns", "exec", self._netns, TMUX, "-L", self.socket, "-f", "/dev/null", *args],
                              capture_output=True, text=True, timeout=10, env=self._env, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed: {done.stderr}")
        return done.stdout

    def screen(self, escapes: bool = False) -> str:
        return self._tmux("capture-pane", "-p", *(["-e"] if escapes else []), "-t", "mon", check=False)

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "mon", *keys)

    def wait_for(self, check: str | re.Pattern[str], timeout_s: float, escapes: bool = False,
                 gone: bool = False) -> str:
        """The screen once it shows `check` (or, with `gone`, once it no longer does)."""
        deadline = time.monotonic() + timeout_s
        screen = ""
        while time.monotonic() < deadline:  # bounded by timeout_s
            screen = self.screen(escapes)
            if bool(check.search(screen) if isinstance(check, re.Pattern) else check in screen) != gone:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"the monitor never showed {check!r} within {timeout_s:g} s:\n{screen}")

    def kill(self) -> None:
        self._tmux("kill-server", check=False)


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    """tmux servers a test starts, each killed at the end (the lab's teardown would kill them anyway)."""
    if not os.access(TMUX, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail(f"{TMUX} is missing, and CI must run the monitor's terminal tests")
        pytest.skip(f"the monitor's terminal tests need tmux ({TMUX})")
    made: list[Terminal] = []
    yield made
    for terminal in made:
        terminal.kill()


def _session_events(data: Path) -> list[dict[str, object]]:
    files = list(data.glob("*/events.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


@pytest.mark.timeout(120)
def test_monitor_shows_the_cluster_marks_sees_a_lost_worker_and_quits(lab: Lab, tmp_path: Path,
                                                                      terminals: list[Terminal]) -> None:
    cluster = ClusterLab(lab, tmp_path)
    address = f"{lab.ip(1)}:{PORT}"
    manager = cluster.manager(1, "m1")
    worker = cluster.worker(2, "w2", "--manager", address)
    run = cluster.start(1, ["run", str(cluster.recipe(TWO_MACHINES)), "--duration", "90s", "--manager", address],
                        "run")
    worker.wait_for(": recording", 30)
    deadline = time.monotonic() + 10  # the manager hears "running" with the worker's next report (<= 1 s)
    while True:  # bounded by the deadline
        piped = cluster.cp(1, "monitor", "--manager", address, timeout_s=20)  # not a terminal: the tables once
        shown = re.search(r"cam\s+test_video\s+w2\s+running", piped.stdout)
        if shown or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert piped.returncode == 0 and shown, piped
    exit_file = tmp_path / "monitor-exit"
    monitor = (f"COLORTERM=truecolor {shlex.quote(sys.executable)} -m cpcli monitor --manager {address} "
               f"2> {tmp_path / 'monitor.err'}; echo $? > {exit_file}")
    terminal = Terminal(lab, 1, f"sh -c {shlex.quote(monitor)}", tmp_path, cluster.env)
    terminals.append(terminal)

    # workers, nodes with their rates, and a preview in half blocks
    nodes_running = re.compile(r"cam\s+test_video\s+w2\s+running\s+1[3-6]\.\d.*\n"
                               r"(?s:.*)gray\s+grayscale\s+m1\s+running")
    screen = terminal.wait_for(nodes_running, 30)
    # previews arrive one by one (each node's first at most 0.5 s after the monitor subscribes): wait for
    # a screen that has both, not the first half block
    screen = terminal.wait_for(re.compile(r"(?s)(?=.*▀)(?=.*cam/video)(?=.*tone/audio)"), 10)
    assert re.search(r"w2\s+198\.18\.0\.2\s+running", screen), screen
    assert re.search(r"m1\s+198\.18\.0\.1\s+running", screen), screen
    assert "session " in screen and "_monitored running" in screen
    assert "38;2;" in terminal.screen(escapes=True)  # true colour thumbnails

    # m, a label, Enter: a mark in the session's events.jsonl on the manager
    terminal.keys("m")
    terminal.wait_for("mark label:", 5)
    terminal.keys("stimulus_on", "Enter")
    terminal.wait_for("marked stimulus_on at", 10)
    marks = [e for e in _session_events(cluster.data("m1")) if e["event"] == "mark"]
    assert [m["label"] for m in marks] == ["stimulus_on"]
    terminal.wait_for("mark stimulus_on", 5)  # and in the monitor's event log

    # a worker killed: shown lost, in red, within about 3 s
    killed = time.monotonic()
    os.kill(worker.pid, signal.SIGKILL)
    screen = terminal.wait_for(re.compile(r"w2\s+198\.18\.0\.2\s+lost"), 6)
    assert time.monotonic() - killed <= 3.5, time.monotonic() - killed
    row = next(line for line in terminal.screen(escapes=True).splitlines() if "198.18.0.2" in line)
    assert re.search(r"\x1b\[[0-9;]*31m", row) or "38;5;1m" in row or "38;5;9m" in row, repr(row)  # red
    terminal.wait_for(re.compile(r"cam\s+test_video\s+w2\s+lost"), 3)

    # q: the monitor exits 0, the session keeps running
    terminal.keys("q")
    deadline = time.monotonic() + 10
    while not exit_file.exists() and time.monotonic() < deadline:  # bounded by the deadline
        time.sleep(0.1)
    assert exit_file.exists(), terminal.screen()
    assert exit_file.read_text().strip() == "0", (tmp_path / "monitor.err").read_text()
    assert "Traceback" not in (tmp_path / "monitor.err").read_text()
    status = cluster.status(1, address)
    assert status["session"]["phase"] == "running"
    assert run.popen.poll() is None and manager.popen.poll() is None


@pytest.mark.timeout(60)
def test_manager_gone_and_back_then_ctrl_c_restores_the_terminal(lab: Lab, tmp_path: Path,
                                                                 terminals: list[Terminal]) -> None:
    cluster = ClusterLab(lab, tmp_path)
    address = f"{lab.ip(1)}:{PORT}"
    manager = cluster.manager(1, "m1")
    out = tmp_path / "after"
    monitor = (f"trap : INT; stty -g > {out}.stty-before; {shlex.quote(sys.executable)} -m cpcli monitor "
               f"--manager {address} 2> {out}.err; echo $? > {out}.exit; stty -g > {out}.stty-after")
    terminal = Terminal(lab, 2, f"sh -c {shlex.quote(monitor)}", tmp_path, cluster.env)
    terminals.append(terminal)
    terminal.wait_for(re.compile(r"m1\s+198\.18\.0\.1\s+ready"), 20)
    assert "no session running" in terminal.screen()
    os.kill(manager.pid, signal.SIGKILL)
    terminal.wait_for("manager unreachable, retrying", 8)
    cluster.manager(1, "m1")
    screen = terminal.wait_for("unreachable", 20, gone=True)
    assert re.search(r"up \d+\.\ds", screen) and "Traceback" not in screen  # the fresh manager: up for seconds
    terminal.wait_for(re.compile(r"m1\s+198\.18\.0\.1\s+ready"), 10)  # its worker joins again
    terminal.keys("C-c")
    deadline = time.monotonic() + 10
    while not Path(f"{out}.stty-after").exists() and time.monotonic() < deadline:  # bounded by the deadline
        time.sleep(0.1)
    assert Path(f"{out}.exit").read_text().strip() == "130"
    assert "Traceback" not in Path(f"{out}.err").read_text()
    assert Path(f"{out}.stty-after").read_text() == Path(f"{out}.stty-before").read_text()  # cbreak undone


def _member_token() -> str:
    """The token of some cluster: this machine is a member, only its manager is missing."""
    secret = z85.encode(os.urandom(32))
    return keys.encode_token(Credentials("default", zmq.curve_public(secret), os.urandom(keys.SECRET_BYTES)))


def test_no_manager_is_one_line_and_exit_1(tmp_path: Path) -> None:
    done = cp("monitor", "--manager", "127.0.0.1:9", cwd=tmp_path,
              env=dict(os.environ, CP_CLUSTER_TIMING='{"answer_timeout_s": 0.5}', CP_TOKEN=_member_token()))
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the manager at 127.0.0.1:9" in lines[0]


def test_wait_keeps_looking_for_a_manager(tmp_path: Path) -> None:
    env = dict(os.environ, CP_CLUSTER_TIMING='{"answer_timeout_s": 0.3}', CP_TOKEN=_member_token())
    proc = subprocess.Popen([sys.executable, "-m", "cpcli", "monitor", "--manager", "127.0.0.1:9", "--wait"],
                            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.0)
        assert proc.poll() is None  # still waiting
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert "waiting for a manager" in err and "Traceback" not in err
    assert proc.returncode == 130


@pytest.mark.parametrize("refresh", ["1", "11"])
def test_refresh_rate_is_bounded(tmp_path: Path, refresh: str) -> None:
    done = cp("monitor", "--refresh-hz", refresh, cwd=tmp_path)
    assert done.returncode == 2 and "refresh-hz" in done.stderr


def test_keys_from_a_terminal() -> None:
    assert parse_keys(b"m") == ["m"]
    assert parse_keys(b"\x1b[A\x1b[B\x1b[C\x1b[D\t\x1b[Z") == ["up", "down", "right", "left", "tab", "backtab"]
    assert parse_keys(b"\x1bOC\x1b[1;5C") == ["right", "right"]
    assert parse_keys(b"ab\x7f\r\x1b") == ["a", "b", "backspace", "enter", "esc"]
    assert parse_keys("é".encode()) == ["é"]
