"""The node launcher: forked node processes, their exit statuses, signals, and the zygote's own end."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cpcli.clock import Clock
from cpcli.runtime.plan import NodePlan, NodeState
from cpcli.runtime.supervisor import Supervisor
from cpcli.runtime.timing import Timing
from cpcli.runtime.zygote import LOST_EXIT_CODE, LaunchRequest, NodeProcess, Zygote, ZygoteError
from tests.conftest import ROOT, wait_until

pytestmark = pytest.mark.timeout(60)

# Nobody answers on this endpoint: a node process waits for its configuration until it is stopped.
SILENT_CONTROL = "tcp://127.0.0.1:9"


def _launch(zygote: Zygote, tmp_path: Path, node_id: str, **env: str) -> NodeProcess:
    request = LaunchRequest(node_id, ("--control", SILENT_CONTROL, "--node", node_id), dict(os.environ, **env),
                            tmp_path / f"{node_id}.log")
    return zygote.launch(request)


def _catches(process: NodeProcess, sig: int) -> bool:
    """Whether the process has a handler for `sig` (its SigCgt mask in /proc)."""
    status = Path(f"/proc/{process.pid}/status").read_text()
    caught = int(status.split("SigCgt:")[1].split()[0], 16)
    return bool(caught >> (sig - 1) & 1)


def _forked(process: NodeProcess) -> bool:
    process.poll()
    return process.pid is not None


def test_nodes_are_forked_show_their_command_line_and_report_how_they_ended(tmp_path: Path) -> None:
    zygote = Zygote().start()
    try:
        a, b, c = (_launch(zygote, tmp_path, n) for n in ("alpha", "beta", "gamma"))
        wait_until(lambda: all(_forked(p) for p in (a, b, c)), timeout_s=30)
        for process in (a, b, c):
            assert process.pid is not None
            child = psutil.Process(process.pid)
            assert child.ppid() == zygote.pid  # forked by the zygote, not spawned by us
            wait_until(lambda c=child: "--node" in c.cmdline(), timeout_s=5)  # it names itself just after the fork
            cmdline = child.cmdline()
            assert "cpcli.runtime.driver" in cmdline and cmdline[cmdline.index("--node") + 1] == process.node_id
            assert cmdline[cmdline.index("--parent") + 1] == str(zygote.pid)  # it stops when the zygote ends
            assert child.name() == f"cp {process.node_id}"
            assert process.poll() is None
        wait_until(lambda: _catches(a, signal.SIGTERM), timeout_s=10)  # its driver is up
        a.terminate()  # the driver stops cleanly when asked
        assert a.wait(10) == 0
        b.kill()
        assert b.wait(10) == -signal.SIGKILL
        os.kill(c.pid or 0, signal.SIGSEGV)  # not through us: the zygote still reports how it ended
        assert c.wait(10) == -signal.SIGSEGV
        assert psutil.Process(zygote.pid or 0).children() == []  # all reaped
        a.kill()  # a signal to an ended process goes nowhere (never to a recycled pid)
    finally:
        zygote.close()
    assert zygote.pid is not None and not psutil.pid_exists(zygote.pid)


def test_a_signal_sent_before_the_fork_reaches_the_process(tmp_path: Path) -> None:
    zygote = Zygote().start()
    try:
        process = _launch(zygote, tmp_path, "early")
        assert process.pid is None  # the zygote is still importing the driver
        process.kill()
        assert process.wait(30) == -signal.SIGKILL
        assert process.pid is not None
    finally:
        zygote.close()


def test_a_node_gets_the_environment_it_was_given_and_its_output_goes_to_its_log(tmp_path: Path) -> None:
    zygote = Zygote().start()
    try:
        process = _launch(zygote, tmp_path, "envy", CP_DATA_SECURITY="not-a-valid-value")
        # The driver refuses the malformed variable in one line and exits: the log has it.
        assert process.wait(30) != 0
        log = (tmp_path / "envy.log").read_text()
        assert "CP_DATA_SECURITY is malformed" in log
    finally:
        zygote.close()


def test_when_the_zygote_dies_its_nodes_stop_and_say_their_status_is_unknown(tmp_path: Path) -> None:
    zygote = Zygote().start()
    try:
        process = _launch(zygote, tmp_path, "orphan")
        wait_until(lambda: _forked(process), timeout_s=30)
        os.kill(zygote.pid or 0, signal.SIGKILL)
        assert process.wait(10) == LOST_EXIT_CODE  # it got SIGTERM from Linux as its parent died, and stopped
        assert "exit status is unknown" in process.error
        assert not psutil.pid_exists(process.pid or 0) or psutil.Process(process.pid or 0).status() == "zombie"
        assert not zygote.alive
        with pytest.raises(ZygoteError):
            _launch(zygote, tmp_path, "late")
    finally:
        zygote.close()


def test_the_zygote_ends_when_its_owner_closes_it(tmp_path: Path) -> None:
    zygote = Zygote().start()
    pid = zygote.pid
    assert pid is not None
    wait_until(lambda: "cpcli.runtime.zygote" in " ".join(psutil.Process(pid).cmdline()), timeout_s=10)
    started = time.monotonic()
    zygote.close()
    assert time.monotonic() - started < 5 and not psutil.pid_exists(pid)


VERSIONED = """
from cpcli.node import Node

VERSION = {version}


class Versioned(Node):
    outputs = ("out",)
    rate_hz = 50

    def setup(self, ctx):
        ctx.info["version"] = VERSION

    def step(self, inputs):
        return VERSION
"""


def _session_version(zygote: Zygote, session_dir: Path, module: str) -> object:
    """Run one node of `module`'s Versioned type through `zygote`; the VERSION it reported."""
    plan = NodePlan("v", "versioned", f"{module}:Versioned", {}, False, "latest", 0.0, (), ("out",))
    timing = Timing(ready_timeout_s=20.0, drain_timeout_s=1.0, exit_timeout_s=5.0)
    with Supervisor([plan], session_dir, "lab", timing, zygote=zygote) as supervisor:
        supervisor.start()
        wait_until(lambda: supervisor.all_ready or bool(supervisor.failures), pump=lambda: supervisor.poll(20),
                   timeout_s=20)
        assert not supervisor.failures, supervisor.failures
        supervisor.begin(Clock().now_ns())
        supervisor.stop()
        supervisor.wait_finished(10)
        status = supervisor.nodes["v"]
    assert status.state == NodeState.DONE, status
    return status.info.get("version")


def test_a_node_type_edited_between_sessions_runs_as_edited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker keeps its zygote across sessions; node modules are imported by each child, so an
    # edit of a node type takes effect in the next session, as with a fresh interpreter per node.
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    module = plugins / "cpcli_versioned_node.py"
    module.write_text(VERSIONED.format(version=1))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(plugins), os.environ.get("PYTHONPATH")) if p))
    zygote = Zygote().start()  # one for both sessions, as a worker keeps it
    try:
        assert _session_version(zygote, tmp_path / "one", module.stem) == 1
        module.write_text(VERSIONED.format(version=2))
        stat = module.stat()
        os.utime(module, (stat.st_atime, stat.st_mtime + 2))  # a later edit (bytecode caches go by mtime)
        assert _session_version(zygote, tmp_path / "two", module.stem) == 2
    finally:
        zygote.close()


def _drivers(pid: int) -> list[list[str]]:
    """Command lines of the node drivers among the children of process `pid`."""
    found = []
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.Error):
            if "cpcli.runtime.driver" in (argv := child.cmdline()):
                found.append(argv)
    return found


def test_cp_node_start_spawn_starts_each_node_as_a_fresh_interpreter(tmp_path: Path) -> None:
    # The escape hatch (and the path on systems without pidfds): no zygote, nodes are children of cp run.
    env = dict(os.environ, CP_NODE_START="spawn")
    proc = subprocess.Popen([sys.executable, "-m", "cpcli", "run", str(ROOT / "recipes" / "demo.yaml"),
                             "--duration", "3s", "--out", str(tmp_path / "s")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # A child caught between fork and exec still shows cp run's command line: wait for all five execs.
        wait_until(lambda: len(_drivers(proc.pid)) >= 5 or proc.poll() is not None, timeout_s=20)
        nodes = _drivers(proc.pid)
        assert len(nodes) == 5 and len(psutil.Process(proc.pid).children()) == 5, nodes  # no zygote among them
        assert all(argv[argv.index("--parent") + 1] == str(proc.pid) for argv in nodes)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err
    assert "session complete" in out
