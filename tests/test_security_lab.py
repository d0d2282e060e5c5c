"""Only members of the cluster get in, in the namespace lab: a worker joins with the token, strangers are refused.

Every machine here has a config folder of its own (as separate laptops do): the manager's holds
the cluster's keys, the member's the token it was given once, the rogue's nothing, another
cluster's token, or the token from before a rotation. The rogue tries everything a member can do;
each attempt must fail with a clear line at its end, record and run nothing, and leave the
cluster working.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import PORT, ClusterLab
from tests.lab import Lab, lab

__all__ = ["lab"]

pytestmark = pytest.mark.timeout(240)

REFUSAL_S = 15.0  # a refused command ends within this (interpreter start, imports, one handshake)
SCRIPT_TIMEOUT_S = 40.0

RECIPE = """\
name: members_only
nodes:
  cam:
    type: test_video
    worker: w2
    params: {width: 64, height: 48, rate_hz: 20}
    record: true
  gray:
    type: grayscale
    inputs: [cam]
    sync: all
    record: true
"""

# Run on the rogue machine: subscribe to a node's stream (raw, or with given credentials) and fetch a file
# from the worker's archive server. Prints JSON: samples received, and what the archive server said.
ROGUE = r"""
import json, os, sys, time
import zmq
from cpcli.cluster.keys import parse_token
from cpcli.cluster.transfer import ArchiveLink, Refused, Unreachable
from cpcli.errors import CpError

endpoint, archive, session, path = sys.argv[1:5]
token = os.environ.get("ROGUE_TOKEN")
creds = parse_token(token) if token else None
ctx = zmq.Context()
got = {}
for mode in ("null", "token"):
    if mode == "token" and creds is None:
        continue
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    if mode == "token":
        creds.connect_to(sub)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    n, deadline = 0, time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if sub.poll(100):
            sub.recv_multipart()
            n += 1
    got[mode] = n
    sub.close()
fetched = "no token"
if creds is not None:
    link = ArchiveLink(ctx, archive, 3.0, creds)
    try:
        link.request(b"PART", {"session": session}, b"PART_REPLY")
        fetched = "served"
    except (Refused, Unreachable, CpError) as err:
        fetched = f"refused: {err}"
    link.close()
ctx.term()
print(json.dumps({"samples": got, "archive": fetched}))
"""


def _other_cluster_token(cluster: ClusterLab) -> str:
    """A valid token of another cluster named like ours (another lab's manager)."""
    env = cluster.own_config("elsewhere")
    done = subprocess.run([sys.executable, "-c", "from cpcli.cluster import keys; "
                           "print(keys.encode_token(keys.manager_keys('default', create=True)))"],
                          capture_output=True, text=True, env=env, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _refused(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], done.stderr
    return lines[0]


def _timed(cluster: ClusterLab, host: int, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    done = cluster.cp(host, *args, env=env, timeout_s=60)
    assert time.monotonic() - started < REFUSAL_S, f"cp {' '.join(args)} took too long to be refused"
    return done


def _sessions(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_dir()} if folder.exists() else set()


def test_strangers_are_refused_everywhere_and_the_cluster_keeps_working(lab: Lab, tmp_path: Path) -> None:
    rogue_host = lab.add_host().index
    cluster = ClusterLab(lab, tmp_path, timing={"beat_s": 0.5, "lost_after_s": 2.0})
    manager = cluster.manager(1, "m1")
    address = f"{lab.ip(1)}:{PORT}"
    token = cluster.token()
    assert "join token of cluster default" in manager.text() and token in manager.text()

    # a member machine joins over mDNS with the token, once; its token is stored for next time
    member = cluster.own_config("w2")
    worker = cluster.worker(2, "w2", "--token", token, env=member)
    assert "stored the join token of cluster default" in worker.text()
    status = json.loads(cluster.cp(2, "status", "--json", "--manager", address, env=member).stdout)
    assert {w["name"] for w in status["workers"]} == {"m1", "w2"}
    assert status["manager"]["security"] == "curve"

    # a session records across both machines, data encrypted between them
    run = cluster.start(1, ["run", str(cluster.recipe(RECIPE)), "--manager", address], "run")  # stopped below
    worker.wait_for(": recording", 30)
    status = json.loads(cluster.cp(1, "status", "--json", "--manager", address).stdout)
    session = status["session"]["name"]
    endpoint = status["session"]["nodes"]["cam"]["endpoint"]
    archive = next(w["archive"] for w in status["workers"] if w["name"] == "w2")
    before = {name: _sessions(cluster.data(name)) for name in ("m1", "w2")}

    rogue = cluster.own_config("rogue")
    wrong = _other_cluster_token(cluster)
    # 1. no token at all: refused before anything leaves the machine, saying how to become a member
    for args in (["status"], ["mark", "x"], ["collect", "--list"], ["run", str(cluster.recipe(RECIPE, "r2.yaml"))]):
        _refused(_timed(cluster, rogue_host, *args, "--manager", address, env=rogue), "no join token", "cp token")
    _refused(_timed(cluster, rogue_host, "worker", "--name", "evil", "--manager", address, env=rogue), "no join token")
    # 2. another cluster's token: the manager's key does not match; refused at the handshake
    for args in (["status"], ["mark", "x"], ["collect", "--list"], ["monitor"],
                 ["run", str(cluster.recipe(RECIPE, "r3.yaml"))]):
        _refused(_timed(cluster, rogue_host, *args, "--manager", address, "--token", wrong, env=rogue),
                 f"manager at {address} refused this machine")
    _refused(_timed(cluster, rogue_host, "worker", "--name", "evil", "--manager", address, "--token", wrong,
                    env=dict(rogue, XDG_CONFIG_HOME=str(tmp_path / "config-rogue2"))),
             "refused this machine")
    # 3. data stream and archive: nothing without the keys, nothing with another cluster's keys
    fired = _rogue(lab, rogue_host, endpoint, archive, session, wrong)
    assert fired["samples"] == {"null": 0, "token": 0}, fired
    assert fired["archive"].startswith("refused"), fired

    # 4. the token from before a rotation: the manager refuses it and logs where it came from, once
    old = token
    rotated = cluster.cp(1, "token", "--rotate", "--yes")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert new != old
    manager.wait_for("cluster secret rotated", 10)
    for _ in range(3):
        _refused(_timed(cluster, rogue_host, "status", "--manager", address, "--token", old, env=rogue),
                 "not a member of cluster default")
    fired = _rogue(lab, rogue_host, endpoint, archive, session, old)
    assert fired["samples"]["null"] == 0, fired
    manager_log = manager.text()
    refusals = re.findall(rf"refused a connection to the manager from {re.escape(lab.ip(rogue_host))}", manager_log)
    assert len(refusals) == 1, manager_log  # logged once, however often it tries

    # the member holding the old token was cut off but kept recording; given the new token it rejoins
    worker.wait_for("not a member of cluster default", 15)
    assert cluster.cp(2, "token", "--save", new, env=member).returncode == 0
    worker.wait_for("rejoined manager", 20)
    time.sleep(1.0)  # a last second recorded with every machine back
    os.kill(run.pid, signal.SIGINT)  # `ip netns exec` execs python: this is cp run itself
    assert run.wait(60) == 130, run.text()

    # nothing the rogue did was recorded or run; the session is whole
    after = {name: _sessions(cluster.data(name)) for name in ("m1", "w2")}
    assert after == before, (before, after)
    manifest = json.loads((cluster.data("m1") / session / "manifest.json").read_text())
    assert manifest["status"] == "complete", manifest
    cam, gray = manifest["nodes"]["cam"]["stats"], manifest["nodes"]["gray"]["stats"]
    assert cam["samples_out"] >= 150 and gray["samples_in"] == {"cam": cam["samples_out"]}, (cam, gray)
    assert gray["dropped_in"] == {"cam": 0}, gray  # the rotation cut w2's control link, never its data
    events = [json.loads(line) for line in (cluster.data("m1") / session / "events.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["event"] == "mark"], "a stranger's mark got in"
    status = json.loads(cluster.cp(1, "status", "--json", "--manager", address).stdout)
    assert {w["name"]: w["state"] for w in status["workers"]} == {"m1": "ready", "w2": "ready"}
    assert "evil" not in manager.text()
    assert "Traceback" not in manager.text() + worker.text()

    # after the rotation, the old token opens nothing: not the manager, not a new session's streams, not
    # w2's archive (a session running at the rotation keeps its data keys until it ends, so that no
    # reconnecting reader of it loses samples: see the README)
    _refused(_timed(cluster, rogue_host, "worker", "--name", "evil", "--manager", address, "--token", old,
                    env=dict(rogue, XDG_CONFIG_HOME=str(tmp_path / "config-rogue3"))), "not a member of cluster")
    _refused(_timed(cluster, rogue_host, "run", str(cluster.recipe(RECIPE, "r4.yaml")), "--manager", address,
                    "--token", old, env=rogue), "not a member of cluster")
    said = len(worker.text())
    second = cluster.start(1, ["run", str(cluster.recipe(RECIPE, "again.yaml")), "--manager", address], "run-2")
    worker.wait_for(": recording", 30, after=said)
    status = json.loads(cluster.cp(1, "status", "--json", "--manager", address).stdout)
    fired = _rogue(lab, rogue_host, status["session"]["nodes"]["cam"]["endpoint"], archive, session, old)
    assert fired["samples"] == {"null": 0, "token": 0}, fired
    assert fired["archive"].startswith("refused"), fired
    fired = _rogue(lab, rogue_host, status["session"]["nodes"]["cam"]["endpoint"], archive, session, new)
    assert fired["samples"]["token"] > 0 and fired["archive"] == "served", fired  # the same path opens to a member
    os.kill(second.pid, signal.SIGINT)
    assert second.wait(60) == 130, second.text()


def _rogue(lab: Lab, host: int, endpoint: str, archive: str, session: str, token: str) -> dict[str, Any]:
    done = lab.call_python(host, ROGUE, [endpoint, archive, session, "w2"], timeout_s=SCRIPT_TIMEOUT_S,
                           env=dict(os.environ, ROGUE_TOKEN=token))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_mdns_adverts_carry_names_and_a_key_fingerprint_only(lab: Lab, tmp_path: Path) -> None:
    cluster = ClusterLab(lab, tmp_path)
    cluster.manager(1, "m1", "--cluster", "lab-a")
    shown = json.loads(cluster.cp(1, "token", "--cluster", "lab-a", "--json").stdout)
    heard = lab.call_python(2, MDNS_TXT, [lab.ip(2)], timeout_s=SCRIPT_TIMEOUT_S)
    assert heard.returncode == 0, heard.stderr
    txt = json.loads(heard.stdout)
    assert txt == {"cluster": "lab-a", "name": "m1", "protocol": txt["protocol"], "key": shown["key"]}, txt
    assert re.fullmatch(r"[0-9a-f]{16}", txt["key"])
    assert shown["token"].rsplit(":", 1)[1] not in heard.stdout


MDNS_TXT = r"""
import json, sys, time
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, Zeroconf
zc = Zeroconf(interfaces=[sys.argv[1]], ip_version=IPVersion.V4Only)
names = []
browser = ServiceBrowser(zc, "_cpcli._tcp.local.", handlers=[lambda **kw: names.append(kw["name"])])
deadline = time.monotonic() + 10
while not names and time.monotonic() < deadline:
    time.sleep(0.05)
info = ServiceInfo("_cpcli._tcp.local.", names[0])
info.request(zc, 3000)
browser.cancel()
zc.close()
print(json.dumps(info.decoded_properties))
"""
