"""`cp collect` in the namespace lab: a session from three machines into one verified folder, resumable."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from cpcli.cluster import keys
from cpcli.cluster import messages as m
from cpcli.cluster.archive_server import CHUNK_BYTES, ArchiveServer
from cpcli.cluster.collect import DISK_MARGIN_BYTES
from cpcli.cluster.parts import PartReport, pull_part
from cpcli.cluster.transfer import ArchiveLink, Refused
from cpcli.transport.curve import Credentials
from cpcli.transport.protocol import PROTOCOL_VERSION
from tests.cluster import PORT, ClusterLab, Proc
from tests.conftest import small_disk
from tests.lab import Lab, lab

__all__ = ["lab"]

pytestmark = pytest.mark.timeout(150)

RECIPE = """\
name: collect-me
nodes:
  cam:
    type: test_video
    worker: w2
    params: {width: 160, height: 120, rate_hz: 30}
    record: true
  gray:
    type: grayscale
    worker: w3
    inputs: [cam]
    sync: all
    record: true
  motion:
    type: motion
    worker: w2
    inputs: [gray]
    sync: all
    record: true
"""
TIMING = {"beat_s": 0.25, "answer_timeout_s": 3.0}
BIG_BYTES = 96 << 20  # at the shaped rate below, a few seconds on the wire
SHAPED_RATE = "200mbit"  # ~25 MB/s: slow enough to act in the middle of a transfer


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _session(lab: Lab, tmp_path: Path) -> tuple[ClusterLab, str, str]:
    """Manager on host 1, workers w2 and w3 on hosts 2 and 3; one short recorded session."""
    lab.add_host()
    cluster = ClusterLab(lab, tmp_path, TIMING)
    address = f"{lab.ip(1)}:{PORT}"
    cluster.manager(1, "m1", "--no-local-worker")
    cluster.worker(2, "w2", "--manager", address)
    cluster.worker(3, "w3", "--manager", address)
    done = cluster.cp(1, "run", str(cluster.recipe(RECIPE)), "--duration", "2s", "--json", "--manager", address)
    assert done.returncode == 0, done.stdout + done.stderr
    return cluster, address, Path(json.loads(done.stdout)["session_dir"]).name


def _collect(cluster: ClusterLab, address: str, out: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    done = cluster.cp(1, "collect", *extra, "--out", str(out), "--json", "--manager", address, timeout_s=90)
    try:
        return done.returncode, json.loads(done.stdout), done.stderr
    except ValueError:
        raise AssertionError(f"cp collect printed no JSON ({done.returncode}):\n{done.stdout}\n{done.stderr}") from None


def _big_file(cluster: ClusterLab, worker: str, session: str) -> Path:
    """A large file in a worker's part (an unrecorded one: the archive server hashes it when listed)."""
    path = cluster.data(worker) / session / worker / "big" / "blob.bin"
    path.parent.mkdir(parents=True)
    with open(path, "wb") as fh:
        for i in range(BIG_BYTES // (1 << 20)):
            fh.write(hashlib.sha256(str(i).encode()).digest() * (1 << 15))
    return path


def _shape(lab: Lab, host: int) -> None:
    shaper = lab.run(host, ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", SHAPED_RATE,
                            "burst", "256kb", "latency", "200ms"])
    assert shaper.wait(10) == 0


def _wait_for_part(path: Path, proc: subprocess.Popen[Any] | Proc, timeout_s: float) -> None:
    part = path.with_name(path.name + ".part")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # bounded by timeout_s
        if part.exists() and 0 < part.stat().st_size < BIG_BYTES // 2:
            return
        time.sleep(0.02)
    raise AssertionError(f"no partial {part} within {timeout_s:g} s")


def test_collect_gathers_every_part_verified_and_a_second_run_moves_nothing(lab: Lab, tmp_path: Path) -> None:
    cluster, address, session = _session(lab, tmp_path)
    out = tmp_path / "out"
    code, result, err = _collect(cluster, address, out)  # no SESSION: the latest
    assert code == 0, (result, err)
    assert result["session"] == session and result["complete"]
    assert 0 < result["transfer_s"] < 60 and result["transferred_bytes"] > 0
    folder = out / session
    sources = {"w2": cluster.data("w2") / session, "w3": cluster.data("w3") / session}
    compared = 0
    for worker, source in sources.items():
        for path in (source / worker).rglob("*"):
            if path.is_file():
                rel = path.relative_to(source)
                assert (folder / rel).read_bytes() == path.read_bytes(), rel
                compared += 1
        for log in (source / "logs").glob("*.log"):
            assert _sha(folder / "logs" / log.name) == _sha(log)
    assert compared >= 8
    for name in ("recipe.yaml", "events.jsonl"):
        assert _sha(folder / name) == _sha(cluster.data("m1") / session / name)
    assert not list(folder.rglob("*.part"))
    manifest = json.loads((folder / "manifest.json").read_text())
    original = json.loads((cluster.data("m1") / session / "manifest.json").read_text())
    assert manifest["nodes"].keys() == original["nodes"].keys() and manifest["workers"] == original["workers"]
    collected = manifest["collected"]
    assert collected["complete"] and not collected["missing"] and not collected["mismatched"]
    verified = {f["path"]: f["sha256"] for f in collected["verified"]}
    for node in original["nodes"].values():
        for f in node["files"]:
            assert verified[f["path"]] == f["sha256"] == _sha(folder / f["path"])
    assert set(collected["from"]) == {"manager", "w2", "w3"}
    inspect = cluster.cp(1, "inspect", str(folder))
    assert inspect.returncode == 0, inspect.stdout + inspect.stderr
    listed = cluster.cp(1, "collect", "--list", "--json", "--out", str(out), "--manager", address)
    assert listed.returncode == 0, listed.stderr
    assert [(s["name"], s["collected"]) for s in json.loads(listed.stdout)] == [(session, True)]

    code, again, err = _collect(cluster, address, out, session)
    assert code == 0, (again, err)
    assert again["transferred_bytes"] == 0
    human = cluster.cp(1, "collect", session, "--out", str(out), "--manager", address)
    assert human.returncode == 0 and re.search(r"files verified in .* \(0\.0 MB transferred in \d+\.\d s\)",
                                               human.stdout), human.stdout + human.stderr

    # a file changed on its worker after its record was written: fetched twice, then reported
    victim = sources["w2"] / "w2" / "cam" / "video.timestamps.csv"
    data = bytearray(victim.read_bytes())
    data[-2] ^= 0x01
    victim.write_bytes(bytes(data))
    (folder / "w2" / "cam" / "video.timestamps.csv").unlink()
    code, bad, err = _collect(cluster, address, out, session)
    assert code == 1
    assert [f["path"] for f in bad["parts"]["w2"]["mismatched"]] == ["w2/cam/video.timestamps.csv"]
    assert bad["parts"]["w3"]["mismatched"] == [] and bad["parts"]["w3"]["status"] == "complete"
    assert not (folder / "w2" / "cam" / "video.timestamps.csv").exists()
    mismatched = json.loads((folder / "manifest.json").read_text())["collected"]["mismatched"]
    assert [(f["path"], f["worker"]) for f in mismatched] == [("w2/cam/video.timestamps.csv", "w2")]
    human = cluster.cp(1, "collect", session, "--out", str(out), "--manager", address)
    assert human.returncode == 1 and "w2 incomplete" in human.stderr and "1 mismatched" in human.stderr


def test_a_worker_cut_off_mid_collect_is_reported_and_a_second_run_completes(lab: Lab, tmp_path: Path) -> None:
    cluster, address, session = _session(lab, tmp_path)
    big = _big_file(cluster, "w3", session)
    _shape(lab, 3)
    out = tmp_path / "out"
    proc = cluster.start(1, ["collect", session, "--out", str(out), "--json", "--manager", address], "collect")
    _wait_for_part(out / session / big.relative_to(cluster.data("w3") / session), proc, 30)
    lab.link_down(3)
    code = proc.wait(60)
    assert code == 1, proc.text()
    result = json.loads(proc.text()[proc.text().index("{"):])
    assert result["parts"]["w2"]["status"] == "complete" and result["parts"]["manager"]["status"] == "complete"
    w3 = result["parts"]["w3"]
    assert w3["status"] == "unreachable" and "w3/big/blob.bin" in {f["path"] for f in w3["missing"]}
    missing = json.loads((out / session / "manifest.json").read_text())["collected"]["missing"]
    assert {f["worker"] for f in missing} == {"w3"}
    assert (out / session / "w2" / "cam" / "video.timestamps.csv").exists()

    lab.link_up(3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # bounded: w3 rejoins once its link is back
        workers = {w["name"]: w for w in cluster.status(1, address)["workers"]}
        if workers["w3"]["state"] == "ready":
            break
        time.sleep(0.2)
    code, again, err = _collect(cluster, address, out, session)
    assert code == 0, (again, err)
    assert _sha(out / session / "w3" / "big" / "blob.bin") == _sha(big)
    assert again["transferred_bytes"] < BIG_BYTES  # it continued the partial file
    assert json.loads((out / session / "manifest.json").read_text())["collected"]["complete"]


def test_collect_killed_mid_file_resumes_with_little_transferred_twice(lab: Lab, tmp_path: Path) -> None:
    cluster, address, session = _session(lab, tmp_path)
    big = _big_file(cluster, "w2", session)
    _shape(lab, 2)
    out = tmp_path / "out"
    proc = cluster.start(1, ["collect", session, "--out", str(out), "--json", "--manager", address], "collect")
    target = out / session / big.relative_to(cluster.data("w2") / session)
    _wait_for_part(target, proc, 30)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    before = target.with_name(target.name + ".part").stat().st_size
    code, result, err = _collect(cluster, address, out, session)
    assert code == 0, (result, err)
    total = sum(p.stat().st_size for p in (out / session).rglob("*") if p.is_file() and p.name != "manifest.json")
    assert before + result["transferred_bytes"] < 1.2 * total
    assert _sha(target) == _sha(big)


def _listening_tcp_ports(lab: Lab, host: int) -> set[int]:
    listed = lab.run(host, ["ss", "-Htln"], stdout=subprocess.PIPE, text=True)
    out, _ = listed.communicate(timeout=10)
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def _firewall_source_port(lab: Lab, host: int, port: int) -> None:
    """Drop every packet host `host` sends from TCP port `port`, as a firewall closing that port would.

    (HTB sends what the u32 filter matches into a class whose queue holds nothing: the kernels
    these tests run on have no tc drop action and no netfilter tools.)
    """
    dev = ["dev", "eth0"]
    for argv in (["qdisc", "add", *dev, "root", "handle", "1:", "htb", "default", "10"],
                 ["class", "add", *dev, "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit"],
                 ["class", "add", *dev, "parent", "1:", "classid", "1:20", "htb", "rate", "10gbit"],
                 ["qdisc", "add", *dev, "parent", "1:20", "pfifo", "limit", "0"],
                 ["filter", "add", *dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip", "sport",
                  str(port), "0xffff", "flowid", "1:20"]):
        done = lab.run(host, ["tc", *argv], stderr=subprocess.PIPE, text=True)
        _, err = done.communicate(timeout=10)
        assert done.returncode == 0, (argv, err)


def test_a_worker_whose_data_port_is_firewalled_is_collected_over_curve(lab: Lab, tmp_path: Path) -> None:
    cluster, address, session = _session(lab, tmp_path)
    big = _big_file(cluster, "w2", session)
    archive = {w["name"]: w for w in cluster.status(1, address)["workers"]}["w2"]["archive"]
    data_ports = _listening_tcp_ports(lab, 2) - {int(archive.rsplit(":", 1)[1])}
    assert len(data_ports) == 1, data_ports  # the archive server's two ports are all w2 listens on now
    _firewall_source_port(lab, 2, data_ports.pop())
    out = tmp_path / "out"
    start = time.monotonic()
    code, result, err = _collect(cluster, address, out, session)
    assert code == 0 and result["complete"], (result, err)
    assert time.monotonic() - start < 30  # one silence of the data port (3 s here), then Curve carried it
    assert _sha(out / session / big.relative_to(cluster.data("w2") / session)) == _sha(big)


FILL_CHUNK_BYTES = 1 << 20  # the filler's writes: a full tmpfs is reached in a few hundred of them
SPARE_BYTES = 8 << 20  # above what the up-front check asks for: it passes, and the fill is what stops the collect


def _fill(path: Path, limit_bytes: int) -> int:
    """Write `path` until its disk is full (ENOSPC); the bytes written. Bounded: at most limit_bytes."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        block = b"\xff" * FILL_CHUNK_BYTES
        while written < limit_bytes:  # bounded by limit_bytes: each pass writes or raises
            try:
                n = os.write(fd, block)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
                return written
            written += n
    finally:
        os.close(fd)
    raise AssertionError(f"{path}: no ENOSPC after {written} bytes")


def test_collect_stops_cleanly_when_its_disk_fills_and_a_second_run_resumes_the_partial_file(
        lab: Lab, tmp_path: Path) -> None:
    cluster, address, session = _session(lab, tmp_path)
    big = _big_file(cluster, "w2", session)
    sources = {name: cluster.data(name) / session for name in ("m1", "w2", "w3")}
    to_collect = sum(p.stat().st_size for folder in sources.values() for p in folder.rglob("*") if p.is_file())
    _shape(lab, 2)
    with small_disk(tmp_path / "small", to_collect + DISK_MARGIN_BYTES + SPARE_BYTES) as out:
        target = out / session / big.relative_to(sources["w2"])
        part = target.with_name(target.name + ".part")
        filler = out / "filler.bin"
        with open(tmp_path / "collect.out", "wb") as stdout, open(tmp_path / "collect.err", "wb") as stderr:
            proc = lab.run(1, [sys.executable, "-m", "cpcli", "collect", session, "--out", str(out),
                               "--manager", address], stdout=stdout, stderr=stderr, env=cluster.env, cwd=tmp_path)
        try:
            _wait_for_part(target, proc, 30)
            _fill(filler, to_collect + DISK_MARGIN_BYTES + SPARE_BYTES)
            code = proc.wait(30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        out_text, err_text = (tmp_path / "collect.out").read_text(), (tmp_path / "collect.err").read_text()
        assert code == 1 and "Traceback" not in out_text + err_text, (code, out_text, err_text)
        errors = [line for line in err_text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"the disk of {out / session} is full" in errors[0], err_text
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)  # nothing of the collect is left behind
        held = part.read_bytes()
        assert 0 < len(held) < BIG_BYTES and not target.exists()
        with open(big, "rb") as source:
            assert source.read(len(held)) == held  # a prefix of the file: what a resume continues
        for folder in sources.values():
            for path in folder.rglob("*"):
                rel = path.relative_to(folder)
                if path.is_file() and (out / session / rel).is_file() and rel.name != "manifest.json":
                    assert _sha(out / session / rel) == _sha(path), rel  # what was verified stays as it was

        filler.unlink()
        code, result, err = _collect(cluster, address, out, session)
        assert code == 0, (result, err)
        collected = 0
        for folder in sources.values():
            for path in folder.rglob("*"):
                if path.is_file() and path.name != "manifest.json":
                    assert _sha(out / session / path.relative_to(folder)) == _sha(path), path
                    collected += path.stat().st_size
        assert not list((out / session).rglob("*.part"))
        assert json.loads((out / session / "manifest.json").read_text())["collected"]["complete"]
        assert result["transferred_bytes"] <= collected - len(held)  # the partial file continued, not refetched


def _member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Credentials:
    """A member's credentials of a cluster whose keys live under tmp_path."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    creds = keys.manager_keys("lab", create=True)
    assert creds is not None
    return keys.parse_token(keys.encode_token(creds))


def test_archive_server_refuses_paths_outside_the_session_and_survives_garbage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    part = data / "s1" / "w9" / "cam"
    part.mkdir(parents=True)
    (part / "video.timestamps.csv").write_bytes(b"index,t_ns\n0,0\n")
    (tmp_path / "secret.txt").write_text("not yours")
    (part / "link.csv").symlink_to(tmp_path / "secret.txt")
    (data / "s1" / "w9" / "worker.json").write_text(json.dumps({"worker": "w9", "phase": "finished", "nodes": {
        "cam": {"files": [{"path": "../escape", "kind": "x", "bytes": 1, "sha256": "0"}]}}, "files": []}))
    member = _member(tmp_path, monkeypatch)
    context: zmq.Context[Any] = zmq.Context()
    with ArchiveServer(data, "127.0.0.1", "w9", logging.getLogger("test"), lambda: member) as server:
        junk = context.socket(zmq.DEALER)  # a member's socket sending garbage
        junk.setsockopt(zmq.LINGER, 0)
        member.connect_to(junk)
        junk.connect(server.address)
        junk.send_multipart([b"FETCH", b"\xc1not msgpack"])
        junk.send_multipart([b"garbage"])
        link = ArchiveLink(context, server.address, 3.0, member)
        try:
            for bad in ("../../secret.txt", "/etc/passwd", "w9/cam/link.csv", "w9/../../secret.txt",
                        "other/cam/x.csv"):
                with pytest.raises(Refused):
                    link.request(m.FETCH, {"session": "s1", "path": bad, "offset": 0, "size": 10}, m.CHUNK)
            with pytest.raises(Refused):
                link.request(m.FETCH, {"session": "..", "path": "w9/cam/video.timestamps.csv", "offset": 0,
                                       "size": 10}, m.CHUNK)
            with pytest.raises(Refused):
                link.request(m.FETCH, {"session": "s1", "path": "w9/cam/video.timestamps.csv", "offset": 0,
                                       "size": CHUNK_BYTES + 1}, m.CHUNK)
            link.send(m.FETCH, {"session": "s1", "path": "w9/cam/video.timestamps.csv", "offset": 6, "size": 100})
            command, header, chunk = link.receive()
            assert command == m.CHUNK and chunk == b"t_ns\n0,0\n" and header["size"] == len(chunk)
            part_reply = link.request(m.PART, {"session": "s1"}, m.PART_REPLY)
            paths = {f["path"] for f in part_reply["files"]}
            assert "../escape" in paths and "w9/cam/link.csv" not in paths  # listed as recorded; the client refuses it
            listed = link.request(m.SESSIONS, {"v": PROTOCOL_VERSION}, m.SESSION_LIST)
            assert [s["name"] for s in listed["sessions"]] == ["s1"]
        finally:
            link.close()
            junk.close()
    context.term()
    assert server.served_bytes == len(b"t_ns\n0,0\n")


def test_a_part_listing_paths_outside_the_folder_is_refused_and_the_rest_collected(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, out = tmp_path / "data", tmp_path / "out" / "s1"
    (data / "s1" / "w9" / "cam").mkdir(parents=True)
    good = data / "s1" / "w9" / "cam" / "video.timestamps.csv"
    good.write_bytes(b"index,t_ns\n" + b"0,0\n" * 300_000)  # over one chunk
    entry = {"path": "w9/cam/video.timestamps.csv", "kind": "timestamps", "bytes": good.stat().st_size,
             "sha256": _sha(good)}
    evil = [{"path": p, "kind": "x", "bytes": 1, "sha256": "0"} for p in ("../escape", "/tmp/abs", "w9/../../up")]
    (data / "s1" / "w9" / "worker.json").write_text(json.dumps({"nodes": {"cam": {"files": [entry, *evil]}}}))
    member = _member(tmp_path, monkeypatch)
    context: zmq.Context[Any] = zmq.Context()
    with ArchiveServer(data, "127.0.0.1", "w9", None, lambda: member) as server:
        link = ArchiveLink(context, server.address, 3.0, member)
        try:
            reply = link.request(m.PART, {"session": "s1"}, m.PART_REPLY)
            part = PartReport("w9", server.address, files=reply["files"])
            seen: list[int] = []
            pull_part(link, "s1", out, part, lambda _p, done, _t: seen.append(done))
        finally:
            link.close()
    context.term()
    assert sorted(f["path"] for f in part.missing) == ["../escape", "/tmp/abs", "w9/../../up"]
    assert all("refused" in f["reason"] for f in part.missing)
    assert sorted(f["path"] for f in part.verified) == [entry["path"], "w9/worker.json"]
    assert part.status == "incomplete"
    assert (out / entry["path"]).read_bytes() == good.read_bytes() and seen[-1] >= entry["bytes"]
    assert not (tmp_path / "out" / "escape").exists() and not (tmp_path / "up").exists()


# -- --delete-remote ----------------------------------------------------------------------------


def _tree(folder: Path) -> dict[str, str]:
    """Every file under folder (relative path: sha256)."""
    return {p.relative_to(folder).as_posix(): _sha(p) for p in folder.rglob("*") if p.is_file()}


def _worker_parts(cluster: ClusterLab, session: str) -> tuple[dict[str, Path], dict[str, dict[str, str]]]:
    """The session folder of each worker, and what each held before the collect."""
    sources = {w: cluster.data(w) / session for w in ("w2", "w3")}
    return sources, {w: _tree(folder) for w, folder in sources.items()}


def _wait_ready(cluster: ClusterLab, address: str, worker: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # bounded by timeout_s
        if {w["name"]: w["state"] for w in cluster.status(1, address)["workers"]}.get(worker) == "ready":
            return
        time.sleep(0.2)
    raise AssertionError(f"{worker} not ready within {timeout_s:g} s")


def test_delete_remote_asks_first_and_deletes_a_part_only_once_all_of_it_is_verified(
        lab: Lab, tmp_path: Path) -> None:
    cluster, address, session = _session(lab, tmp_path)
    out = tmp_path / "out"
    sources, before = _worker_parts(cluster, session)
    records = _tree(cluster.data("m1") / session)
    assert {"manifest.json", "recipe.yaml", "events.jsonl"} <= records.keys()

    # no terminal to ask on and no --yes: refused before anything is collected or deleted
    done = cluster.cp(1, "collect", session, "--out", str(out), "--delete-remote", "--manager", address)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--yes" in done.stderr and not out.exists()
    assert {w: _tree(folder) for w, folder in sources.items()} == before

    # a file changed on w2 after its record was written: w2's part is kept, w3's deleted
    victim = sources["w2"] / "w2" / "cam" / "video.timestamps.csv"
    good = victim.read_bytes()
    victim.write_bytes(good[:-2] + bytes([good[-2] ^ 0x01]) + good[-1:])
    code, result, err = _collect(cluster, address, out, session, "--delete-remote", "--yes")
    assert code == 1, (result, err)
    w2, w3 = result["parts"]["w2"], result["parts"]["w3"]
    assert w2["status"] == "incomplete" and not w2["remote_deleted"] and "not verified" in w2["kept"]
    assert _tree(sources["w2"]).keys() == before["w2"].keys() and victim.exists()
    assert w3["status"] == "complete" and w3["remote_deleted"] and w3["deleted"]["files"] == len(before["w3"])
    assert not sources["w3"].exists()  # its part, its logs, then the emptied session folder
    from_ = json.loads((out / session / "manifest.json").read_text())["collected"]["from"]
    assert (from_["w2"]["remote_deleted"], from_["w3"]["remote_deleted"]) == (False, True)

    # put right on w2: the next run collects and deletes it, and checks w3's part against the copy here
    victim.write_bytes(good)
    code, result, err = _collect(cluster, address, out, session, "--delete-remote", "--yes")
    assert code == 0, (result, err)
    assert result["parts"]["w2"]["remote_deleted"] and result["parts"]["w3"]["remote_deleted"]
    assert result["parts"]["w3"]["status"] == "complete" and result["parts"]["w3"]["transferred_bytes"] == 0
    assert not sources["w2"].exists() and not sources["w3"].exists()
    assert _tree(cluster.data("m1") / session) == records  # the manager's records are never deleted
    folder = out / session
    for worker, files in before.items():
        assert {rel: _sha(folder / rel) for rel in files} == files, worker
    collected = json.loads((folder / "manifest.json").read_text())["collected"]
    assert collected["complete"] and all(collected["from"][w]["remote_deleted"] for w in ("w2", "w3"))
    assert not list(folder.glob(".cp-collect-probe-*"))
    inspect = cluster.cp(1, "inspect", str(folder))
    assert inspect.returncode == 0, inspect.stdout + inspect.stderr
    human = cluster.cp(1, "collect", session, "--out", str(out), "--manager", address)
    assert human.returncode == 0, human.stderr
    assert "w2: its copy was already gone from the worker" in human.stdout


def test_delete_remote_keeps_an_unreachable_workers_part_until_a_later_run_verifies_it(
        lab: Lab, tmp_path: Path) -> None:
    cluster, address, session = _session(lab, tmp_path)
    out = tmp_path / "out"
    sources, before = _worker_parts(cluster, session)
    lab.link_down(3)
    code, result, err = _collect(cluster, address, out, session, "--delete-remote", "--yes")
    assert code == 1, (result, err)
    assert result["parts"]["w2"]["remote_deleted"] and not sources["w2"].exists()
    w3 = result["parts"]["w3"]
    assert w3["status"] == "unreachable" and not w3["remote_deleted"] and "not verified" in w3["kept"]
    assert _tree(sources["w3"]) == before["w3"]

    lab.link_up(3)
    _wait_ready(cluster, address, "w3", 30)
    code, again, err = _collect(cluster, address, out, session, "--delete-remote", "--yes")
    assert code == 0, (again, err)
    assert again["parts"]["w3"]["remote_deleted"] and not sources["w3"].exists()
    assert again["parts"]["w2"]["status"] == "complete" and again["parts"]["w2"]["remote_deleted"]
    for worker, files in before.items():
        assert {rel: _sha(out / session / rel) for rel in files} == files, worker
    assert json.loads((out / session / "manifest.json").read_text())["collected"]["complete"]


def test_archive_server_deletes_a_part_only_when_told_exactly_what_it_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    session = data / "s1"
    (session / "w9" / "cam").mkdir(parents=True)
    (session / "w8").mkdir()
    (session / "logs").mkdir()
    csv = session / "w9" / "cam" / "video.timestamps.csv"
    csv.write_bytes(b"index,t_ns\n0,0\n")
    (session / "logs" / "cam.log").write_text("started\n")
    (session / "w8" / "other.csv").write_text("another worker's\n")
    (session / "manifest.json").write_text("{}")  # the manager's record, on a machine running both
    (tmp_path / "secret.txt").write_text("not yours")
    (session / "w9" / "cam" / "link.csv").symlink_to(tmp_path / "secret.txt")  # never listed, never followed
    (session / "w9" / "alias").symlink_to(session / "w9" / "cam")
    entry = {"path": "w9/cam/video.timestamps.csv", "kind": "timestamps", "bytes": 16, "sha256": _sha(csv)}
    aliased = dict(entry, path="w9/alias/video.timestamps.csv")  # the same file, through a symlinked folder

    def record(phase: str, *files: dict[str, Any]) -> None:
        (session / "w9" / "worker.json").write_text(json.dumps({"worker": "w9", "phase": phase,
                                                                "nodes": {"cam": {"files": list(files)}}}))

    member = _member(tmp_path, monkeypatch)
    context: zmq.Context[Any] = zmq.Context()
    probe = ".cp-collect-probe-" + "0" * 32
    with ArchiveServer(data, "127.0.0.1", "w9", None, lambda: member) as server, \
            ArchiveServer(data, "127.0.0.1", None, None, lambda: member) as manager:
        link = ArchiveLink(context, server.address, 3.0, member)
        to_manager = ArchiveLink(context, manager.address, 3.0, member)
        try:
            def listing() -> dict[str, str]:
                files = link.request(m.PART, {"session": "s1"}, m.PART_REPLY)["files"]
                return {f["path"]: f["sha256"] for f in files}

            record("running", entry)
            with pytest.raises(Refused, match="has not finished"):
                link.delete("s1", listing(), probe, 0)
            record("finished", entry, aliased)
            with pytest.raises(Refused, match="through a symlink"):
                link.delete("s1", listing(), probe, 0)
            record("finished", entry)
            held = listing()
            assert set(held) == {entry["path"], "w9/worker.json", "logs/cam.log"}
            hostile = [dict(held, **{entry["path"]: "0" * 64}),  # a wrong sha256
                       {k: v for k, v in held.items() if k != "logs/cam.log"},  # a file short
                       dict(held, **{"w9/cam/more.csv": "0" * 64}),  # a file too many
                       {"../escape": "0" * 64, **held}]
            for wrong in hostile:
                with pytest.raises(Refused, match="not what was verified"):
                    link.delete("s1", wrong, probe, 0)
            with pytest.raises(Refused, match="not a probe name"):
                link.delete("s1", held, "../manifest.json", 0)
            (session / probe).touch()  # the client collected into this very folder
            with pytest.raises(Refused, match="own folder"):
                link.delete("s1", held, probe, 0)
            (session / probe).unlink()
            with pytest.raises(Refused, match="never deleted"):
                to_manager.delete("s1", {"manifest.json": _sha(session / "manifest.json")}, probe, 0)
            assert csv.exists() and (session / "logs" / "cam.log").exists()

            size = sum((session / path).stat().st_size for path in held)
            for path in (entry["path"], "logs/cam.log"):  # seals of files about to go (cluster/sealed.py)
                link.request(m.SEAL, {"session": "s1", "path": path}, m.SEAL_REPLY)
            assert server.sealed.open_seals == 2
            done = link.delete("s1", held, probe, 0)
            assert server.sealed.open_seals == 0  # a deleted file is served no more
            assert (done["files"], done["bytes"], done["kept"]) == (3, size, 2)  # the two symlinks stay
            assert not csv.exists() and not (session / "w9" / "worker.json").exists()
            assert not (session / "logs").exists()
            assert (session / "w9" / "cam" / "link.csv").is_symlink() and (tmp_path / "secret.txt").exists()
            assert (session / "manifest.json").exists() and (session / "w8" / "other.csv").exists()
        finally:
            link.close()
            to_manager.close()
    context.term()
