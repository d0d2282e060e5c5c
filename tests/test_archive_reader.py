"""`cpcli.archive.open_session`: a recorded session read back on one timeline, for analysis."""

from __future__ import annotations

import csv
import json
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from cpcli.archive import open_session
from cpcli.errors import ArchiveError
from tests.conftest import ROOT, cp

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reader")
    result = cp("run", str(ROOT / "recipes" / "demo.yaml"), "--duration", "2s", "--out", str(out), "--local",
                "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    return Path(json.loads(result.stdout)["session_dir"])


def test_every_stream_with_its_times_and_files(recorded: Path) -> None:
    session = open_session(recorded)
    assert set(session.streams) == {"cam.video", "mic.audio", "motion.motion", "level.level"}
    cam = session.stream("cam.video")
    assert cam.kind == "video" and cam.files and all(f.suffix == ".mp4" and f.exists() for f in cam.files)
    assert cam.missing == () and cam.timestamps_file == recorded / cam.worker / "cam" / "video.timestamps.csv"
    with open(cam.timestamps_file, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert cam.t_ns.tolist() == [int(r["t_ns"]) for r in rows]
    assert cam.index.tolist() == [int(r["index"]) for r in rows]
    assert cam.local_ns is not None and cam.local_ns.tolist() == [int(r["local_ns"]) for r in rows]
    assert (cam.cluster_ns == cam.t_ns + session.start_cluster_ns).all()
    assert session.start_utc is not None
    first = cam.utc[0].astype("datetime64[us]").item()
    assert first == session.start_utc.replace(tzinfo=None) + timedelta(microseconds=int(cam.t_ns[0]) // 1000)
    assert session.stream("mic").name == "mic.audio"  # a node with one recorded port by its id alone


def test_aligning_two_streams_in_a_few_lines(recorded: Path) -> None:
    session = open_session(recorded)
    cam, mic = session.stream("cam.video"), session.stream("mic.audio")
    frame = cam.index_at(mic.t_ns)  # the frame that was newest when each audio block was captured
    assert frame.shape == mic.t_ns.shape
    shown = frame >= 0
    assert (cam.t_ns[frame[shown]] <= mic.t_ns[shown]).all()
    after = frame[shown] + 1 < len(cam.t_ns)
    assert (cam.t_ns[frame[shown][after] + 1] > mic.t_ns[shown][after]).all()


def test_events_and_marks(recorded: Path, tmp_path: Path) -> None:
    copy = tmp_path / recorded.name
    shutil.copytree(recorded, copy)
    session = open_session(copy)
    assert session.events[0]["event"] == "session_starting" and session.marks() == []
    with open(copy / "events.jsonl", "a") as fh:  # what `cp mark` appends
        fh.write(json.dumps({"t_ns": 5, "event": "mark", "label": "x", "meta": {}}) + "\n")
    assert open_session(copy).marks() == [{"t_ns": 5, "event": "mark", "label": "x", "meta": {}}]


def test_a_session_without_manifest_reads_what_is_on_disk(recorded: Path, tmp_path: Path) -> None:
    copy = tmp_path / recorded.name
    shutil.copytree(recorded, copy)
    (copy / "manifest.json").unlink()
    session = open_session(copy)
    assert session.manifest == {} and session.start_utc is None
    assert len(session.stream("cam.video").t_ns) == len(open_session(recorded).stream("cam.video").t_ns)


def test_a_missing_file_is_listed_as_missing(recorded: Path, tmp_path: Path) -> None:
    copy = tmp_path / recorded.name
    shutil.copytree(recorded, copy)
    gone = sorted((copy / next(iter(open_session(copy).streams.values())).worker / "cam").glob("*.mp4"))[-1]
    gone.unlink()
    cam = open_session(copy).stream("cam.video")
    assert gone in cam.missing and gone not in cam.files


def test_not_a_session(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="is not a session folder"):
        open_session(tmp_path)


def test_unknown_stream_names_the_ones_there(recorded: Path) -> None:
    with pytest.raises(KeyError, match=r"has no stream 'nope'; it has cam.video, level.level"):
        open_session(recorded).stream("nope")
    assert np.issubdtype(open_session(recorded).stream("cam.video").t_ns.dtype, np.int64)
