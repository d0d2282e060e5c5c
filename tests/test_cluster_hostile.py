"""The cluster under hostile and mistaken input, in the namespace lab: garbage on the manager's and the
workers' ports, two clusters on one LAN, a worker name taken twice, placement errors, bad command lines,
and every socket bound to the chosen interface only.

Garbage comes from real programs on other lab machines (`python -c` with raw TCP sockets and pyzmq), with
a seeded random generator so a failure replays the same bytes.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from cpcli.transport.protocol import PROTOCOL_VERSION
from tests.cluster import PORT, ClusterLab, Proc
from tests.conftest import PLUGIN_DIR
from tests.lab import Lab, lab, read_line

__all__ = ["lab"]

pytestmark = pytest.mark.timeout(90)

SS_TIMEOUT_S = 10.0  # one `ss` listing takes milliseconds
SCRIPT_TIMEOUT_S = 40.0  # a garbage script: interpreter start, imports, a few seconds of sending
RUN_STOP_TIMEOUT_S = 60.0  # Ctrl-C to the end of cp run: drain, close files, the manifest

# Sent to the manager's control port from another machine. Prints, as JSON, what the manager answered
# to the messages that deserve an answer; everything else must be dropped without one.
MANAGER_GARBAGE = r"""
import json, os, random, socket, sys, time
import msgpack, zmq
from cpcli.cluster.keys import parse_token

member = parse_token(os.environ["CP_TOKEN"])  # the zmq garbage comes from a member: past the gatekeeper

host, port, version = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(20261125)
WAIT_MS = 5000

def noise(n):
    return rng.randbytes(n)

def pack(value):
    return msgpack.packb(value, use_bin_type=True)

def raw(data, hold_s=0.0):
    try:
        with socket.create_connection((host, port), timeout=2) as conn:
            conn.sendall(data)
            time.sleep(hold_s)
    except OSError:
        pass  # the manager may close a connection that spoke garbage before we are done

# A connection that opens the ZMTP handshake and then says nothing, held all along.
idle = socket.create_connection((host, port), timeout=2)
idle.sendall(b"\xff")
# Plain TCP: random bytes (ZeroMQ takes a stream not starting with 0xff for ZMTP/1.0 frames), and a
# ZMTP 3.0 greeting (NULL mechanism) followed by random bytes instead of a READY command.
for size in (1, 9, 64, 4096, 65536):
    raw(noise(size))
raw(b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\x00") + bytes(32) + noise(256), hold_s=0.2)

# The same port number in UDP, where the manager answers clock probes: junk datagrams of every size.
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
    for data in (b"", noise(1), noise(24), b"CPCLOCK1" + noise(16), b"CPCLOCK1" + noise(100), noise(1400)):
        udp.sendto(data, (host, port))

context = zmq.Context()

def dealer():
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 3000)  # close() below waits for the message to leave
    member.connect_to(sock, manager=True)
    sock.connect(f"tcp://{host}:{port}")
    return sock

def send(*frames):
    sock = dealer()
    sock.send_multipart(list(frames))
    sock.close()

def answer(sock):
    deadline = time.monotonic() + WAIT_MS / 1000
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000) + 1):
            break
        command, body = sock.recv_multipart()
        if command != b"BEAT":
            return {"command": command.decode(), **msgpack.unpackb(body)}
    return None

def ask(*frames):
    sock = dealer()
    sock.send_multipart(list(frames))
    reply = answer(sock)
    sock.close(linger=0)
    return reply

worker = {"v": version, "name": "intruder", "instance": "intruder-1", "host": "198.18.0.2", "version": "0",
          "node_types": ["test_video"], "sessions": []}
send(noise(50))
send(noise(10), noise(20), noise(30))
send(b"", b"")
send(b"HELLO", pack({}))
send(b"REGISTER", b"\xc1" + noise(40))  # 0xc1 is never used in msgpack
send(b"REGISTER", pack(worker)[:-3])  # cut short
send(b"REGISTER", b"\x81\xa1v\xd4\x01\x02")  # an extension type as a value
send(b"REGISTER", pack([1, 2, 3]))  # msgpack, but not a map
send(b"STATUS", pack("status please"))
send(b"REGISTER", pack({1: 2, b"x": [3]}))
send(b"REGISTER", pack({**worker, "name": 5}))
send(b"REGISTER", pack({**worker, "v": True}))
send(b"REGISTER", pack({**worker, "node_types": "test_video"}))
send(b"REGISTER", pack({k: v for k, v in worker.items() if k != "instance"}))
send(b"REGISTER", pack({**worker, "name": "bad-resources", "resources": 5}))
send(b"REGISTER", pack({**worker, "name": "bad-resources", "resources": [1, 2]}))
send(b"REGISTER", pack({**worker, "name": "bad-devices", "devices": 7}))
send(b"REGISTER", pack({**worker, "name": "bad-report", "sessions": [{"session": "s", "phase": "x", "nodes": 5}]}))
send(b"STATUS", pack({"v": str(version)}))
send(b"ATTACH", pack({"v": version, "session": 5}))
run = {"v": version, "recipe": "r", "recipe_text": "", "nodes": [], "options": {}}
send(b"RUN", pack({"v": version}))
send(b"RUN", pack({**run, "options": {"duration_s": "soon"}}))
send(b"RUN", pack({**run, "timing": "fast"}))
send(b"RUN", pack({**run, "timing": {"ready_timeout_s": "never"}}))
flood = dealer()  # one peer, many messages: dropped and logged once
for _ in range(2000):
    flood.send_multipart([noise(rng.randrange(1, 40)) for _ in range(rng.randrange(1, 4))])
flood.close()
# A frame above the manager's 4 MiB limit: ZeroMQ drops the connection, nothing registers.
send(b"REGISTER", pack({**worker, "name": "huge", "padding": b"x" * (5 << 20)}))

out = {}
# A registered peer that then sends nonsense: its bad beats are dropped, not trusted.
intruder = dealer()
intruder.send_multipart([b"REGISTER", pack(worker)])
out["intruder"] = answer(intruder)
for frames in ([b"BEAT", pack({"resources": 7})], [b"BEAT", pack({"resources": "plenty"})],
               [b"BEAT", pack({"clock": {"offset_ns": "late", "uncertainty_ns": 1}})],
               [b"PREPARED", pack({"session": 5, "bound": {}})], [b"STATE", pack({"session": "nope"})],
               [b"FAILED", pack({"session": "nope", "message": "x", "hint": 3})], [b"RESULT", noise(30)]):
    intruder.send_multipart(frames)
intruder.close()
out["taken"] = ask(b"REGISTER", pack({**worker, "name": "m1"}))
out["other_release"] = ask(b"REGISTER", pack({**worker, "name": "old", "v": version + 98}))
# A later release may name its fields differently: it still hears that versions differ.
out["next_release"] = ask(b"REGISTER", pack({"v": version + 1, "name": "next", "abilities": ["x"]}))
out["status_other_release"] = ask(b"STATUS", pack({"v": version + 1}))
# Marks: meta that would not fit events.jsonl is dropped; a good one is refused or taken, by session.
send(b"MARK", pack({"v": version, "label": "bad", "meta": {"blob": b"\x00\x01"}}))
send(b"MARK", pack({"v": version, "label": "bad", "meta": {"nested": {"a": [1]}}}))
send(b"MARK", pack({"v": version, "label": "bad", "meta": {7: "seven"}}))
out["mark"] = ask(b"MARK", pack({"v": version, "label": "hostile_but_valid", "meta": {"n": 1}}))
out["status"] = ask(b"STATUS", pack({"v": version}))
idle.close()
context.term()
print(json.dumps(out, default=repr))
"""

# Sent to a worker's listening ports while its session runs: argv HOST PORTS(comma-separated) HOLD_S MODE.
# MODE "junk": random bytes, a half handshake, a DEALER (a type a publisher refuses), an XSUB sending junk
# and a SUB subscribed to everything that never reads. MODE "unsubscribe": only unsubscriptions of the
# session's topics that this peer never subscribed to, framed as ZMTP/1.0 over plain TCP.
DATA_GARBAGE = r"""
import os, random, socket, sys, time
import zmq
from cpcli.cluster.keys import parse_token

member = parse_token(os.environ["CP_TOKEN"]) if os.environ.get("CP_TOKEN") else None  # zmq sockets as a member

host, ports, hold_s, mode = sys.argv[1], [int(p) for p in sys.argv[2].split(",")], float(sys.argv[3]), sys.argv[4]
rng = random.Random(7)
context = zmq.Context()
held = []

def connect(kind, port):
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    if member is not None:
        member.connect_to(sock)
    sock.connect(f"tcp://{host}:{port}")
    held.append(sock)
    return sock

for port in ports:
    if mode == "unsubscribe":
        conn = socket.create_connection((host, port), timeout=2)
        stream = b"\x01\x00"  # ZMTP/1.0: an empty identity, then one frame per message
        for topic in (b"cam/video", b"@cam/video"):
            body = b"\x00" + topic
            stream += bytes([len(body) + 1, 0]) + body
        conn.sendall(stream)
        held.append(conn)
        continue
    for size in (1, 64, 4096):
        try:
            with socket.create_connection((host, port), timeout=2) as conn:
                conn.sendall(rng.randbytes(size))
        except OSError:
            pass
    conn = socket.create_connection((host, port), timeout=2)
    conn.sendall(b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\x00") + bytes(32) + rng.randbytes(128))
    held.append(conn)
    connect(zmq.DEALER, port).send_multipart([rng.randbytes(20), rng.randbytes(100)])
    xsub = connect(zmq.XSUB, port)
    for message in (rng.randbytes(30), b"\x02junk", b"", rng.randbytes(5000), b"\x01"):
        xsub.send(message)
    connect(zmq.SUB, port).setsockopt(zmq.SUBSCRIBE, b"")
time.sleep(hold_s)
for sock in held:
    sock.close()
context.term()
print("sent")
"""

AFTER_GARBAGE = """\
name: after-garbage
nodes:
  cam:
    type: test_video
    params: {width: 64, height: 48, rate_hz: 50}
    record: true
  gray:
    type: grayscale
    inputs: [cam]
    sync: all
    record: true
"""

# cam feeds one node on its own machine (shared memory: 320x240x3 is above the 64 KiB threshold) and one
# on the manager's machine (TCP).
UNDER_FIRE = """\
name: under-fire
nodes:
  cam:
    type: test_video
    worker: w2
    params: {width: 320, height: 240, rate_hz: 30}
    record: true
  near:
    type: grayscale
    worker: w2
    inputs: [cam]
    sync: all
    record: true
  far:
    type: grayscale
    worker: m1
    inputs: [cam]
    sync: all
    record: true
"""


def _listeners(lab: Lab, host: int, protocol: str = "t") -> list[tuple[str, int]]:
    """(address, port) of every listening TCP (or, protocol "u", unconnected UDP) socket inside host `host`'s
    namespace (`ss -l{protocol}nH`)."""
    proc = lab.run(host, ["ss", f"-l{protocol}nH"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=SS_TIMEOUT_S)
    assert proc.returncode == 0, err
    found = []
    for line in out.splitlines():
        local = line.split()[3]  # State Recv-Q Send-Q Local:Port Peer:Port
        address, _, port = local.rpartition(":")
        found.append((address.split("%")[0].strip("[]"), int(port)))  # `0.0.0.0%eth0`: bound to a device
    return found


def _archive_ports(cluster: ClusterLab, address: str) -> set[tuple[str, int]]:
    """(address, port) of the archive servers (`cp collect`) the manager and its workers listen on, with the
    data ports of their sealed streams."""
    status = cluster.status(1, address)
    found = set()
    for archive in [status["manager"].get(key) for key in ("archive", "archive_data")] + \
            [w.get(key) for w in status["workers"] for key in ("archive", "archive_data")]:
        if archive:
            host, _, port = str(archive).removeprefix("tcp://").rpartition(":")
            found.add((host, int(port)))
    return found


# What a command may say before it fails: stamped lines of `cp manager`/`cp worker`, where `cp run` goes.
PROGRESS_LINE = re.compile(r"\d\d:\d\d:\d\d |running on the cluster of the manager at ")


def _error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed: exit code 1, no traceback, nothing else but progress lines."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def _start_run(cluster: ClusterLab, recipe: Path, address: str) -> Proc:
    """`cp run` with no duration: the test stops it with `_stop_run` once it has done its part, whatever the load."""
    return cluster.start(1, ["run", str(recipe), "--json", "--manager", address], "run")


def _stop_run(run: Proc) -> dict[str, Any]:
    """Ctrl-C on `cp run`: the session stops in order; its JSON result, with the manifest's status."""
    assert run.popen.poll() is None, run.text()
    os.kill(run.pid, signal.SIGINT)  # `ip netns exec` execs python, so this is cp run itself
    code = run.wait(RUN_STOP_TIMEOUT_S)
    text = run.text()
    assert code == 130, text
    result: dict[str, Any] = json.loads(text[text.index("{"):text.rindex("}") + 1])
    assert result["status"] == "interrupted", result
    result["manifest_status"] = json.loads(Path(result["manifest"]).read_text())["status"]
    return result


def _rows(path: Path) -> int:
    with open(path, newline="") as fh:
        return len(list(csv.DictReader(fh)))


def _node_processes(*procs: Proc) -> list[str]:
    """Command lines of node processes (`python -m cpcli.runtime.driver`) under these lab processes."""
    found = []
    for proc in procs:
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for child in children:
            try:
                cmdline = " ".join(child.cmdline())
            except psutil.NoSuchProcess:
                continue
            if "cpcli.runtime.driver" in cmdline:
                found.append(cmdline)
    return found


def _sessions(data: Path) -> list[str]:
    return sorted(p.name for p in data.iterdir() if p.is_dir()) if data.exists() else []


# -- garbage ---------------------------------------------------------------------------------------


def _fire_at_manager(lab: Lab, token: str) -> dict[str, Any]:
    sent = lab.call_python(2, MANAGER_GARBAGE, [lab.ip(1), str(PORT), str(PROTOCOL_VERSION)],
                           timeout_s=SCRIPT_TIMEOUT_S, env=dict(os.environ, CP_TOKEN=token))
    assert sent.returncode == 0, sent.stderr
    replies: dict[str, Any] = json.loads(sent.stdout)
    # the messages that deserve an answer got the right one
    assert replies["intruder"]["command"] == "WELCOME", replies
    assert replies["taken"]["command"] == "REFUSED"
    assert replies["taken"]["message"] == "a worker named m1 is already connected from 198.18.0.1"
    for key, theirs in (("other_release", PROTOCOL_VERSION + 98), ("next_release", PROTOCOL_VERSION + 1),
                        ("status_other_release", PROTOCOL_VERSION + 1)):
        refused = replies[key]
        assert refused["command"] == "REFUSED", (key, refused)
        assert refused["message"] == (f"this manager speaks control protocol {PROTOCOL_VERSION}, not {theirs} "
                                      "(another cpcli release)"), refused
        assert refused["hint"] == "install the same cpcli version on every machine of the cluster"
    assert replies["status"]["command"] == "STATUS_REPLY"
    return replies


def test_manager_drops_garbage_on_its_control_port_and_keeps_working(lab: Lab, tmp_path: Path) -> None:
    cluster = ClusterLab(lab, tmp_path)
    manager = cluster.manager(1, "m1")
    address = f"{lab.ip(1)}:{PORT}"
    idle = _fire_at_manager(lab, cluster.token())
    assert idle["mark"]["command"] == "REFUSED" and idle["mark"]["message"] == "no session is recording on this cluster"
    # the manager lives, said what it dropped and from where, and still answers cp status
    assert manager.popen.poll() is None, manager.text()
    log = manager.text()
    assert "Traceback" not in log, log
    assert "dropped a malformed control message: unknown command b'HELLO' (from 198.18.0.2, peer" in log, log
    assert "dropped a malformed control message: REGISTER field 'resources' is a int (from 198.18.0.2" in log
    assert "dropped a malformed control message: RUN option 'duration_s' is a str (from 198.18.0.2" in log
    assert "REGISTER with a malformed session report (STATE field 'nodes' is a int) (from 198.18.0.2" in log
    assert f"refused a peer of another cpcli release: it speaks control protocol {PROTOCOL_VERSION + 98}" in log
    assert len(re.findall(r"dropped a malformed control message", log)) < 100, "one line per peer, not per message"
    status = cluster.status(2, address)
    workers = {w["name"]: w for w in status["workers"]}
    assert set(workers) == {"m1", "intruder"}, workers  # nothing malformed or oversized registered
    assert workers["m1"]["state"] == "ready"
    # a recipe runs to completion afterwards, even with the same garbage arriving while it records
    run = _start_run(cluster, cluster.recipe(AFTER_GARBAGE), address)
    manager.wait_for(": recording", 30)
    during = _fire_at_manager(lab, cluster.token())
    time.sleep(1.0)  # a last second of frames after the garbage
    result = _stop_run(run)
    assert result["manifest_status"] == "complete", result
    sent_frames = result["nodes"]["cam"]["stats"]["samples_out"]
    assert sent_frames >= 40
    assert result["nodes"]["gray"]["stats"]["samples_in"] == {"cam": sent_frames}
    assert result["nodes"]["gray"]["stats"]["dropped_in"] == {"cam": 0}
    assert during["mark"]["command"] == "MARKED", during
    events = [json.loads(line) for line in (Path(result["session_dir"]) / "events.jsonl").read_text().splitlines()]
    assert [e["label"] for e in events if e["event"] == "mark"] == ["hostile_but_valid"]
    assert manager.popen.poll() is None
    assert "Traceback" not in manager.text()


def _session_under_fire(lab: Lab, tmp_path: Path, mode: str) -> tuple[dict[str, Any], ClusterLab, Proc]:
    """Run UNDER_FIRE and, while it records, send DATA_GARBAGE (`mode`) to w2's publishers from the manager's
    machine and (junk mode) to w2's loopback node-control ports from w2's own machine."""
    cluster = ClusterLab(lab, tmp_path)
    cluster.manager(1, "m1")
    address = f"{lab.ip(1)}:{PORT}"
    worker = cluster.worker(2, "w2", "--manager", address)
    run = _start_run(cluster, cluster.recipe(UNDER_FIRE), address)
    worker.wait_for(": recording", 30)
    listening = [x for x in _listeners(lab, 2) if x not in _archive_ports(cluster, address)]
    publishers = sorted(p for a, p in listening if a == lab.ip(2))
    loopback = sorted(p for a, p in listening if a == "127.0.0.1")
    assert len(publishers) == 2, listening  # cam and near
    fired = lab.call_python(1, DATA_GARBAGE, [lab.ip(2), ",".join(map(str, publishers)), "1.0", mode],
                            timeout_s=SCRIPT_TIMEOUT_S)  # a stranger's
    assert fired.stdout.strip() == "sent", fired.stderr
    fired = lab.call_python(1, DATA_GARBAGE, [lab.ip(2), ",".join(map(str, publishers)), "1.0", mode],
                            timeout_s=SCRIPT_TIMEOUT_S, env=dict(os.environ, CP_TOKEN=cluster.token()))  # a member's
    assert fired.stdout.strip() == "sent", fired.stderr
    if mode == "junk":
        fired = lab.call_python(2, DATA_GARBAGE, ["127.0.0.1", ",".join(map(str, loopback)), "0.5", mode],
                                timeout_s=SCRIPT_TIMEOUT_S)
        assert fired.stdout.strip() == "sent", fired.stderr
    assert worker.popen.poll() is None, worker.text()
    time.sleep(1.0)  # a last second of frames after the garbage
    return _stop_run(run), cluster, worker


def _check_every_frame_arrived(result: dict[str, Any], cluster: ClusterLab) -> None:
    nodes = result["nodes"]
    sent = nodes["cam"]["stats"]["samples_out"]
    assert sent >= 60, sent
    for node in ("near", "far"):
        stats = nodes[node]["stats"]
        assert stats["dropped_in"] == {"cam": 0}, (node, stats)
        assert stats["samples_in"] == {"cam": sent}, (node, stats)
    session = Path(result["session_dir"]).name
    assert _rows(cluster.data("w2") / session / "w2" / "cam" / "video.timestamps.csv") == sent
    assert _rows(cluster.data("w2") / session / "w2" / "near" / "video.timestamps.csv") == sent
    assert _rows(cluster.data("m1") / session / "m1" / "far" / "video.timestamps.csv") == sent


def test_garbage_on_a_workers_ports_mid_session_costs_no_sample(lab: Lab, tmp_path: Path) -> None:
    result, cluster, worker = _session_under_fire(lab, tmp_path, "junk")
    assert result["manifest_status"] == "complete", result
    _check_every_frame_arrived(result, cluster)
    log = worker.text()
    assert "Traceback" not in log, log
    assert "dropped a malformed control message from b'" in log, log  # junk reached the node-control socket


def test_forged_unsubscribes_do_not_stop_a_publisher(lab: Lab, tmp_path: Path) -> None:
    result, cluster, _ = _session_under_fire(lab, tmp_path, "unsubscribe")
    _check_every_frame_arrived(result, cluster)


# -- two clusters ----------------------------------------------------------------------------------


def test_two_clusters_on_one_lan_do_not_mix(lab: Lab, tmp_path: Path) -> None:
    lab.add_host()
    lab.add_host()
    lab.add_host()
    cluster = ClusterLab(lab, tmp_path)
    lab_a = cluster.manager(1, "ma", "--cluster", "lab-a", wait=False)
    lab_b = cluster.manager(2, "mb", "--cluster", "lab-b", wait=False)
    for manager in (lab_a, lab_b):
        manager.wait_for("listening on", 20)
    w3 = cluster.worker(3, "w3", "--cluster", "lab-b", wait=False)
    cluster.make_keys("default")  # w4 holds the keys of cluster default, whose manager starts later
    w4 = cluster.worker(4, "w4", wait=False)
    # a worker of lab-b, with no address given, joins lab-b's manager and says so
    w3.wait_for("joined manager", 20)
    assert "found manager mb of cluster lab-b at 198.18.0.2:7425" in w3.text()
    assert "joined manager mb of cluster lab-b at 198.18.0.2:7425 as worker w3" in w3.text()
    # a worker with no --cluster belongs to cluster default: it joins neither, names those it passed over,
    # and keeps looking
    w4.wait_for("still looking", 20)
    waiting = next(line for line in w4.text().splitlines() if "still looking" in line)
    assert "no cpcli manager of cluster default found on 198.18.0.4" in waiting, waiting
    assert "ma of cluster lab-a at 198.18.0.1:7425" in waiting and "mb of cluster lab-b at 198.18.0.2:7425" in waiting
    assert "pass --cluster NAME" in waiting
    a = cluster.status(3, f"{lab.ip(1)}:{PORT}", "lab-a")
    b = cluster.status(3, f"{lab.ip(2)}:{PORT}", "lab-b")
    assert a["manager"]["cluster"] == "lab-a" and {w["name"] for w in a["workers"]} == {"ma"}
    assert b["manager"]["cluster"] == "lab-b" and {w["name"] for w in b["workers"]} == {"mb", "w3"}
    # cp status over mDNS: asked for one cluster, shows that one; asked for none among two, asks which
    found = cluster.cp(3, "status", "--json", "--interface", lab.ip(3), "--cluster", "lab-a", timeout_s=20)
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["manager"]["name"] == "ma"
    line = _error_line(cluster.cp(3, "status", "--interface", lab.ip(3), timeout_s=20))
    assert "2 managers found on 198.18.0.3" in line and "ma of cluster lab-a" in line and \
        "mb of cluster lab-b" in line and "pass --cluster NAME or --manager HOST:PORT" in line, line
    # once a manager of cluster default appears, the waiting worker joins it
    cluster.manager(5, "md")
    w4.wait_for("joined manager md of cluster default at 198.18.0.5:7425 as worker w4", 20)
    assert {w["name"] for w in cluster.status(3, f"{lab.ip(1)}:{PORT}", "lab-a")["workers"]} == {"ma"}


# -- names and placement ---------------------------------------------------------------------------


def test_a_second_worker_with_a_taken_name_is_refused(lab: Lab, tmp_path: Path) -> None:
    lab.add_host()
    cluster = ClusterLab(lab, tmp_path)
    manager = cluster.manager(1, "m1")
    address = f"{lab.ip(1)}:{PORT}"
    cluster.worker(2, "w2", "--manager", address)
    started = time.monotonic()
    second = cluster.cp(3, "worker", "--name", "w2", "--manager", address, "--interface", lab.ip(3),
                        "--data", str(cluster.data("w2-again")), timeout_s=30)
    line = _error_line(second)
    assert time.monotonic() - started < 15
    assert line == ("error: manager at 198.18.0.1:7425 refused worker w2: a worker named w2 is already connected "
                    "from 198.18.0.2; give this worker another --name (the default is the host name)"), line
    assert "refused a second worker named w2 from 198.18.0.3" in manager.text()
    workers = {w["name"]: w for w in cluster.status(1, address)["workers"]}
    assert workers["w2"]["host"] == lab.ip(2) and workers["w2"]["state"] == "ready"


def test_placement_errors_stop_a_run_before_anything_starts(lab: Lab, tmp_path: Path) -> None:
    cluster = ClusterLab(lab, tmp_path)
    manager = cluster.manager(1, "m1")
    address = f"{lab.ip(1)}:{PORT}"
    # w2's machine lacks the test plugin: `counter` is installed on the manager's machine only
    (tmp_path / "bare").mkdir()
    bare = ClusterLab(lab, tmp_path / "bare")
    bare.env["XDG_CONFIG_HOME"] = cluster.env["XDG_CONFIG_HOME"]  # another machine of the same cluster
    bare.env["PYTHONPATH"] = os.pathsep.join(
        p for p in bare.env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != PLUGIN_DIR)
    worker = bare.worker(2, "w2", "--manager", address)
    types = {w["name"]: w["node_types"] for w in cluster.status(1, address)["workers"]}
    assert "counter" in types["m1"] and "counter" not in types["w2"], types
    unknown = cluster.recipe("name: lost\nnodes:\n  c:\n    type: counter\n    worker: nope\n", "unknown.yaml")
    line = _error_line(cluster.cp(1, "run", str(unknown), "--duration", "2s", "--manager", address, timeout_s=30))
    assert line.startswith("error: manager at 198.18.0.1:7425: node c is placed on worker nope, which is not in the "
                           "cluster; known workers: m1 (ready), w2 (ready); "), line
    lacking = cluster.recipe("name: lacking\nnodes:\n  c:\n    type: counter\n    worker: w2\n", "lacking.yaml")
    line = _error_line(cluster.cp(1, "run", str(lacking), "--duration", "2s", "--manager", address, timeout_s=30))
    assert "node c: worker w2 does not have node type counter installed" in line, line
    # nothing started: no node process, no session folder, no word of a session in any log
    assert _node_processes(manager, worker) == []
    assert _sessions(cluster.data("m1")) == [] and _sessions(bare.data("w2")) == []
    said = manager.text() + worker.text()
    assert not re.search(r"session \S+:", said), said


# -- the command line ------------------------------------------------------------------------------


def test_bad_command_lines_say_what_and_where_in_one_line(lab: Lab, tmp_path: Path) -> None:
    cluster = ClusterLab(lab, tmp_path, timing={"answer_timeout_s": 2.0})
    data = str(tmp_path / "data")

    line = _error_line(cluster.cp(1, "worker", "--manager", "nonsense", "--data", data, timeout_s=20))
    assert line == ("error: --manager 'nonsense' is not HOST:PORT; write it as HOST:PORT, e.g. "
                    "--manager 192.168.1.10:7425"), line
    # a name that does not resolve: refused at once, not retried forever
    line = _error_line(cluster.cp(1, "worker", "--manager", "nonsense:7425", "--data", data, timeout_s=20))
    assert line.startswith("error: --manager nonsense:7425: nonsense is neither an IPv4 address nor a host name "
                           "this machine can resolve"), line
    assert "leave --manager out to find the manager over mDNS" in line

    line = _error_line(cluster.cp(1, "manager", "--interface", "192.0.2.1", "--data", data, timeout_s=20))
    assert line == ("error: 192.0.2.1 is not an address of this machine; its IPv4 addresses: 127.0.0.1 (lo), "
                    "198.18.0.1 (eth0); pass --interface (or set CP_INTERFACE) to one of them"), line

    holder = lab.python(1, "import socket, sys, time\ns = socket.create_server((sys.argv[1], int(sys.argv[2])))\n"
                        "print('listening', flush=True)\ntime.sleep(60)", [lab.ip(1), str(PORT)],
                        stdout=subprocess.PIPE)
    assert read_line(holder, 10) == "listening"
    line = _error_line(cluster.cp(1, "manager", "--interface", lab.ip(1), "--port", str(PORT), "--data", data,
                                  timeout_s=20))
    assert line == (f"error: cannot listen on 198.18.0.1:{PORT} (Address already in use); another manager runs "
                    "here? pick another --port"), line

    cluster.make_keys()  # a member machine, whose manager is not there
    started = time.monotonic()
    line = _error_line(cluster.cp(1, "status", "--manager", "127.0.0.1:1", timeout_s=20))
    assert time.monotonic() - started < 2.0 + 5.0  # the answer timeout, plus interpreter start
    assert line == ("error: cannot reach the manager at 127.0.0.1:1; is `cp manager` running there, and is its "
                    "port reachable from here?"), line

    recipe = cluster.recipe("name: unsure\non_worker_lost: maybe\nnodes:\n  cam:\n    type: test_video\n")
    line = _error_line(cluster.cp(1, "run", str(recipe), "--manager", f"{lab.ip(2)}:{PORT}", timeout_s=20))
    assert line == f"error: {recipe}:2: on_worker_lost must be continue or stop, got str 'maybe'", line


# -- interface hygiene -----------------------------------------------------------------------------


def test_every_listener_binds_the_chosen_interface_only(lab: Lab, tmp_path: Path) -> None:
    # TCP only: mDNS (UDP 5353) is zeroconf's listener, shared by every mDNS program of a machine and bound
    # to 0.0.0.0 by design; discovery joins the group and sends on the chosen interface only (test_discovery).
    cluster = ClusterLab(lab, tmp_path)
    cluster.manager(1, "m1")
    address = f"{lab.ip(1)}:{PORT}"
    worker = cluster.worker(2, "w2", "--manager", address)
    archives = _archive_ports(cluster, address)  # the manager's, its local worker's and w2's: on the interface
    assert sorted(a for a, _ in archives) == [lab.ip(1)] * 4 + [lab.ip(2)] * 2  # two ports each
    # the control port and the archive servers, nothing else while idle; a worker connects to the manager
    assert sorted(_listeners(lab, 1)) == sorted([(lab.ip(1), PORT), *(x for x in archives if x[0] == lab.ip(1))])
    assert sorted(_listeners(lab, 2)) == sorted(x for x in archives if x[0] == lab.ip(2))
    run = _start_run(cluster, cluster.recipe(UNDER_FIRE), address)
    worker.wait_for(": recording", 30)
    assert len(_node_processes(worker)) == 2  # what the placement test looks for, seen here
    for host, publishers in ((1, 1), (2, 2)):  # far on m1; cam and near on w2
        listening = [x for x in _listeners(lab, host) if x not in archives]
        outside = [(a, p) for a, p in listening if a not in (lab.ip(host), "127.0.0.1")]
        assert outside == [], listening
        on_interface = [p for a, p in listening if a == lab.ip(host) and p != PORT]
        assert len(on_interface) == publishers, listening
        assert any(a == "127.0.0.1" for a, _ in listening), listening  # node control, on loopback
    assert _stop_run(run)["manifest_status"] == "complete"


MDNS_PORT = 5353


def test_udp_sockets_bind_the_chosen_interface_only(lab: Lab, tmp_path: Path) -> None:
    # mDNS (UDP 5353) is zeroconf's shared multicast listener, bound to 0.0.0.0 by design: out of scope here.
    cluster = ClusterLab(lab, tmp_path)
    cluster.manager(1, "m1")
    address = f"{lab.ip(1)}:{PORT}"
    cluster.worker(2, "w2", "--manager", address)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # bounded: until w2 has a clock estimate, so its probes have gone out
        workers = {w["name"]: w for w in cluster.status(1, address)["workers"]}
        if workers["w2"].get("clock"):
            break
        time.sleep(0.2)
    assert workers["w2"].get("clock"), workers
    assert (lab.ip(1), PORT) in _listeners(lab, 1, "u")  # the manager's clock answers, beside its control port
    for host in (1, 2):
        udp = [(a, p) for a, p in _listeners(lab, host, "u") if p != MDNS_PORT]
        assert [(a, p) for a, p in udp if a not in (lab.ip(host), "127.0.0.1")] == [], (host, udp)
