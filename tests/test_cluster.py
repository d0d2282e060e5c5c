"""The cluster across real machines of the namespace lab: discovery, placement, data across hosts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.cluster import PORT, ClusterLab
from tests.lab import Lab, lab

__all__ = ["lab"]

pytestmark = pytest.mark.timeout(120)

THREE_HOSTS = """\
name: three-hosts
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
    inputs: [gray]
    sync: all
    record: true
"""


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_worker_finds_the_manager_over_mdns_with_no_address(lab: Lab, tmp_path: Path) -> None:
    cluster = ClusterLab(lab, tmp_path)
    cluster.manager(1, "m1")
    worker = cluster.worker(2, "w2")
    assert "found manager m1 of cluster default at 198.18.0.1:7425" in worker.text()
    status = cluster.status(2, f"{lab.ip(1)}:{PORT}")
    names = {w["name"]: w for w in status["workers"]}
    assert set(names) == {"m1", "w2"}
    assert names["w2"]["host"] == lab.ip(2) and names["w2"]["state"] == "ready"
    assert names["w2"]["cpu_count"] >= 1 and names["w2"]["disk_free"] > 0 and names["w2"]["memory_total"] > 0
    assert "test_video" in names["w2"]["node_types"]
    assert all(set(d) == {"kind", "device", "name", "types"} for d in names["w2"]["devices"])
    # cp status finds the manager over mDNS too, given only the interface
    found = cluster.cp(2, "status", "--json", "--interface", lab.ip(2), timeout_s=20)
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["manager"]["name"] == "m1"


def test_recipe_across_three_machines_two_hops(lab: Lab, tmp_path: Path) -> None:
    lab.add_host()
    cluster = ClusterLab(lab, tmp_path)
    cluster.manager(1, "m1")
    cluster.worker(2, "w2", "--manager", f"{lab.ip(1)}:{PORT}")
    cluster.worker(3, "w3", "--manager", f"{lab.ip(1)}:{PORT}")
    recipe = cluster.recipe(THREE_HOSTS)
    done = cluster.cp(1, "run", str(recipe), "--duration", "3s", "--json", "--manager", f"{lab.ip(1)}:{PORT}")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    session = Path(result["session_dir"])
    manifest = json.loads((session / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    nodes = manifest["nodes"]
    assert {n: v["worker"] for n, v in nodes.items()} == {"cam": "w2", "gray": "w3", "motion": "m1"}
    sent = nodes["cam"]["stats"]["samples_out"]
    assert sent >= 60
    assert nodes["gray"]["stats"]["samples_in"] == {"cam": sent}
    assert nodes["motion"]["stats"]["samples_in"] == {"gray": nodes["gray"]["stats"]["samples_out"]}
    assert all(sum(v["stats"]["dropped_in"].values()) == 0 for v in nodes.values())
    # each machine recorded its own nodes on its own disk
    name = session.name
    cam_dir = cluster.data("w2") / name / "w2" / "cam"
    gray_dir = cluster.data("w3") / name / "w3" / "gray"
    assert len(_rows(cam_dir / "video.timestamps.csv")) == sent
    assert len(_rows(gray_dir / "video.timestamps.csv")) == sent
    assert (cluster.data("m1") / name / "m1" / "motion" / "motion.csv").exists()
    assert not (cluster.data("m1") / name / "w2").exists()
    for worker in ("w2", "w3"):
        record = json.loads((cluster.data(worker) / name / worker / "worker.json").read_text())
        assert record["worker"] == worker and record["phase"] == "finished"
    # the manager's record lists every file with its worker's path
    paths = {f["path"] for v in nodes.values() for f in v["files"]}
    assert "w2/cam/video.timestamps.csv" in paths and "w3/gray/video.timestamps.csv" in paths
    assert manifest["workers"]["w2"]["host"] == lab.ip(2)
    events = [json.loads(line)["event"] for line in (session / "events.jsonl").read_text().splitlines()]
    assert events[0] == "session_starting" and "session_started" in events and events[-1] == "session_stopped"
