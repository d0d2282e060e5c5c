"""`cp mark`: an event at the time of the call in the session recording on this machine."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, cp

pytestmark = pytest.mark.timeout(60)

DEMO = str(ROOT / "recipes" / "demo.yaml")


def _wait_started(out: Path, timeout_s: float) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # bounded by timeout_s
        for events in out.glob("*/events.jsonl"):
            if "session_started" in events.read_text():
                return events.parent
        time.sleep(0.05)
    raise AssertionError(f"no session started in {out} within {timeout_s:g} s")


def test_mark_lands_at_the_time_of_the_call(tmp_path: Path) -> None:
    run = subprocess.Popen([sys.executable, "-m", "cpcli", "run", DEMO, "--duration", "4s", "--out",
                            str(tmp_path / "s"), "--local"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        session = _wait_started(tmp_path / "s", 20)
        before = time.monotonic_ns()
        marked = cp("mark", "stimulus_on", "--meta", "trial=3", "--meta", "cond=loud", "--json", cwd=tmp_path)
        after = time.monotonic_ns()
        assert marked.returncode == 0, marked.stderr
        reply = json.loads(marked.stdout)
        assert reply["session"] == session.name and reply["meta"] == {"trial": 3, "cond": "loud"}
        assert run.wait(30) == 0
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(5)
    manifest = json.loads((session / "manifest.json").read_text())
    events = [json.loads(line) for line in (session / "events.jsonl").read_text().splitlines()]
    mark = [e for e in events if e["event"] == "mark"]
    assert len(mark) == 1 and mark[0]["label"] == "stimulus_on" and mark[0]["t_ns"] == reply["t_ns"]
    when = manifest["clock"]["start_cluster_ns"] + mark[0]["t_ns"]
    assert before <= when <= after  # this machine's clock is the session's: the call's own moment
    assert events[-1]["event"] == "session_stopped"


def test_mark_without_a_session_says_so(tmp_path: Path) -> None:
    result = cp("mark", "hello", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no session is recording on this machine, and no manager was found" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("mark", "x", "--meta", "novalue"), "--meta 'novalue' is not KEY=VALUE"),
    (("mark", " "), "the mark's LABEL is empty"),
])
def test_bad_mark_arguments(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = cp(*args, cwd=tmp_path)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
