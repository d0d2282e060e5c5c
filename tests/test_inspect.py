"""`cp inspect` and cpcli.archive.inspect: real recorded sessions, then broken on purpose."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from rich.console import Console

from cpcli.archive.inspect import SessionReport, StreamReport, inspect_session
from cpcli.cli import is_ours
from cpcli.cli.reports import findings_lines, streams_table
from cpcli.errors import ArchiveError
from tests.conftest import ROOT, cp, write_recipe

PLUGIN_DEVICES = Path(__file__).resolve().parent / "plugin_devices"  # the `ticker` event source
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(PLUGIN_DEVICES), os.environ.get("PYTHONPATH"))
                                                   if p)}
START_TIMEOUT_S = 20.0
CLEAN = """
name: inspected
nodes:
  cam: {type: test_video, params: {width: 64, height: 48, rate_hz: 30}, record: true}
  mic: {type: test_audio, params: {samplerate: 8000, channels: 1, blocksize: 256}, record: true}
  level: {type: audio_level, inputs: [mic], record: true}
  tick: {type: ticker, params: {rate_hz: 20}, record: true}
"""
LOUD = """
name: loud
nodes:
  hot_float: {type: test_audio, params: {samplerate: 8000, channels: 2, blocksize: 256, amplitude: 1.0},
              record: true}
  hot_int: {type: test_audio, params: {samplerate: 8000, channels: 1, blocksize: 256, amplitude: 1.0,
            dtype: int16}, record: true}
"""


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sessions recorded once by the real `cp run`: `clean` and `loud` (a full-scale tone)."""
    out = tmp_path_factory.mktemp("sessions")
    for name, text in (("clean", CLEAN), ("loud", LOUD)):
        recipe = write_recipe(out, text, f"{name}.yaml")
        result = cp("run", str(recipe), "-d", "2", "--out", str(out), "--session", name, env=ENV)
        assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def clean(recorded: Path, tmp_path: Path) -> Path:
    """A copy of the clean session, this test's to break."""
    return Path(shutil.copytree(recorded / "clean", tmp_path / "clean"))


def _stream(report: SessionReport, name: str) -> StreamReport:
    return next(s for s in report.streams if s.name == name)


def _problems(report: SessionReport) -> str:
    return "\n".join(f.line for f in report.problems)


def _file(session: Path, pattern: str) -> Path:
    return next(session.glob(f"*/{pattern}"))


def _rewrite_csv(path: Path, change: Any) -> None:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    rows = change(rows)
    with path.open("w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)


def test_a_clean_session_reports_every_stream_and_no_problem(clean: Path) -> None:
    report = inspect_session(clean)
    manifest = json.loads((clean / "manifest.json").read_text())
    assert report.has_manifest and report.status == "complete" and report.recipe == "inspected"
    assert {s.name: s.kind for s in report.streams} == {
        "cam.video": "video", "mic.audio": "audio", "level.level": "table", "tick.tick": "events"}
    assert not report.problems, _problems(report)
    assert report.exit_code == 0
    for stream in report.streams:
        stats = manifest["nodes"][stream.node]["stats"]
        assert stream.samples == stats["samples_out"] - stats["record_dropped"] > 10, stream.name
        assert stream.files and all(f.status == "ok" for f in stream.files), stream.files
        assert stream.index_missing == 0 and stream.non_monotonic == 0
        assert 1.0 < stream.duration_s < 3.0 and stream.jitter_p99_ms is not None
    cam = _stream(report, "cam.video")
    assert (cam.nominal_rate_hz, cam.nominal_from) == (30.0, "params.rate_hz")
    assert cam.video is not None and cam.video.frames_decoded == cam.video.timestamp_rows == cam.samples
    mic = _stream(report, "mic.audio")
    assert mic.audio is not None and mic.audio.frames_wav == mic.audio.frames_timestamps == 256 * mic.samples
    assert (mic.audio.samplerate_hz, mic.audio.channels, mic.audio.sample_format) == (8000, 1, "float32")
    assert mic.audio.clipped_samples == 0 and mic.nominal_rate_hz == 8000.0
    assert mic.rate_hz is not None and abs(mic.rate_hz - 8000) < 80  # frames per second of the block stamps
    assert _stream(report, "level.level").nominal_from == "median interval"
    assert {f.path for f in report.session_files} >= {"recipe.yaml", "events.jsonl"}


def test_cp_inspect_prints_the_table_and_exits_0_and_json_has_everything(clean: Path) -> None:
    result = cp("inspect", str(clean))
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("cam.video", "mic.audio", "level.level", "tick.tick"):
        assert name in result.stdout
    assert "ok: no problems in 4 streams" in result.stdout
    data = json.loads(cp("inspect", str(clean), "--json").stdout)
    assert data["exit_code"] == 0 and data["problems"] == [] and len(data["streams"]) == 4
    video = next(s for s in data["streams"] if s["kind"] == "video")
    assert {"duration_s", "samples", "rate_hz", "nominal_rate_hz", "gaps", "drops", "jitter_p99_ms",
            "files", "video"} <= set(video)


def test_changed_missing_and_resized_files_are_problems_that_name_the_file(clean: Path) -> None:
    video = _file(clean, "cam/video-0001.mp4")
    data = bytearray(video.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    video.write_bytes(bytes(data))
    _file(clean, "mic/audio-0001.wav").unlink()
    with _file(clean, "level/level.csv").open("a") as fh:
        fh.write("\n")
    result = cp("inspect", str(clean))
    assert result.returncode == 1
    assert "video-0001.mp4 does not match its sha256 in the manifest" in result.stdout
    assert "audio-0001.wav is missing" in result.stdout
    assert "level.csv has" in result.stdout and "the manifest says" in result.stdout
    assert "Traceback" not in result.stderr


def test_rows_missing_from_a_table_are_an_index_gap_problem(clean: Path) -> None:
    _rewrite_csv(_file(clean, "level/level.csv"), lambda rows: rows[:6] + rows[9:])
    report = inspect_session(clean)
    assert "level.level: 3 samples missing from the recording (index gaps, the first at index 5); " \
           "only 0 explained by recorder drops" in _problems(report)
    assert _stream(report, "level.level").index_missing == 3


def test_index_gaps_explained_by_recorder_drops_are_only_a_warning(clean: Path) -> None:
    table = _file(clean, "level/level.csv")
    _rewrite_csv(table, lambda rows: rows[:6] + rows[9:])
    manifest = json.loads((clean / "manifest.json").read_text())
    node = manifest["nodes"]["level"]
    node["stats"]["record_dropped"] = 3  # as if the recorder's queue had been full
    entry = next(f for f in node["files"] if f["path"].endswith("level.csv"))
    entry["bytes"], entry["sha256"] = table.stat().st_size, hashlib.sha256(table.read_bytes()).hexdigest()
    (clean / "manifest.json").write_text(json.dumps(manifest))
    report = inspect_session(clean)
    assert not report.problems, _problems(report)
    warnings = "\n".join(f.line for f in report.warnings)
    assert "level.level: 3 samples missing" in warnings and "the recorder dropped 3" in warnings
    assert "node level: dropped 3 samples" in warnings
    assert _stream(report, "level.level").drops.record_dropped == 3


def test_timestamps_going_backwards_are_a_problem_with_file_and_line(clean: Path) -> None:
    def swap(rows: list[list[str]]) -> list[list[str]]:
        rows[5][1], rows[6][1] = rows[6][1], rows[5][1]
        return rows

    timestamps = _file(clean, "cam/video.timestamps.csv")
    _rewrite_csv(timestamps, swap)
    report = inspect_session(clean)
    rel = timestamps.relative_to(clean).as_posix()
    assert f"cam.video: timestamps go backwards at 1 row (first at {rel}:7:" in _problems(report)
    assert _stream(report, "cam.video").non_monotonic == 1


def _local_minus_t(session: Path) -> dict[str, list[int]]:
    """local_ns - t_ns of every row of every recorded stream, by file name."""
    found: dict[str, list[int]] = {}
    for path in sorted(session.glob("*/*/*.csv")) + sorted(session.glob("*/*/*.jsonl")):
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh)) if path.suffix == ".csv" else [json.loads(line) for line in fh]
        found[path.name] = [int(r["local_ns"]) - int(r["t_ns"]) for r in rows]
    return found


def test_every_stream_keeps_the_raw_local_clock_beside_t_ns(clean: Path) -> None:
    found = _local_minus_t(clean)
    assert set(found) == {"video.timestamps.csv", "audio.timestamps.csv", "level.csv", "tick.jsonl"}
    differences = [d for values in found.values() for d in values]
    assert len(differences) > 40
    assert max(differences) - min(differences) < 1_000_000  # one machine: the same session start on its clock
    assert min(differences) > 0  # absolute monotonic time, not the session timeline
    with _file(clean, "level/level.csv").open(newline="") as fh:
        assert next(csv.reader(fh))[:3] == ["index", "t_ns", "local_ns"]


def test_the_local_clock_going_backwards_is_a_problem_with_file_and_line(clean: Path) -> None:
    def swap(rows: list[list[str]]) -> list[list[str]]:
        rows[5][2], rows[6][2] = rows[6][2], rows[5][2]
        return rows

    table = _file(clean, "level/level.csv")
    _rewrite_csv(table, swap)
    report = inspect_session(clean)
    rel = table.relative_to(clean).as_posix()
    assert f"level.level: local timestamps (local_ns) go backwards at 1 row (first at {rel}:7:" in _problems(report)
    assert _stream(report, "level.level").non_monotonic == 0  # t_ns is still in order


def _drop_local(path: Path) -> None:
    """Rewrite a recorded file as a cpcli before `local_ns` wrote it."""
    if path.suffix == ".jsonl":
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({k: v for k, v in e.items() if k != "local_ns"}, separators=(",", ":"))
                                + "\n" for e in lines))
    else:
        _rewrite_csv(path, lambda rows: [row[:2] + row[3:] for row in rows])


def test_a_session_recorded_before_local_ns_still_inspects_clean(clean: Path) -> None:
    before = {s.name: s.samples for s in inspect_session(clean).streams}
    manifest = json.loads((clean / "manifest.json").read_text())
    for node in manifest["nodes"].values():
        for entry in node["files"]:
            path = clean / entry["path"]
            if path.suffix in (".csv", ".jsonl"):
                _drop_local(path)
                entry["bytes"], entry["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    (clean / "manifest.json").write_text(json.dumps(manifest))
    assert not any("local_ns" in p.read_text() for p in clean.glob("*/*/*.*") if p.suffix in (".csv", ".jsonl"))
    report = inspect_session(clean)
    assert not report.problems, _problems(report)
    assert {s.name: s.samples for s in report.streams} == before
    assert all(f.status == "ok" for s in report.streams for f in s.files)


def test_a_truncated_video_segment_is_a_problem_in_frames(clean: Path) -> None:
    segment = _file(clean, "cam/video-0000.mp4")
    segment.write_bytes(segment.read_bytes()[:2000])
    report = inspect_session(clean)
    cam = _stream(report, "cam.video")
    assert cam.video is not None and cam.video.frames_decoded < cam.video.timestamp_rows
    problems = _problems(report)
    assert "video-0000.mp4 has 2000 bytes" in problems
    assert "video-0000.mp4 cannot be decoded" in problems or "video-0000.mp4 has 0 decodable frames" in problems


def test_a_truncated_wav_segment_is_a_problem_in_frames(clean: Path) -> None:
    segment = _file(clean, "mic/audio-0000.wav")
    segment.write_bytes(segment.read_bytes()[:-1000])
    report = inspect_session(clean)
    mic = _stream(report, "mic.audio")
    assert mic.audio is not None and mic.audio.frames_wav == mic.audio.frames_timestamps - 250
    problems = _problems(report)
    assert "audio-0000.wav is truncated: its header promises" in problems
    assert "frames, its timestamps list" in problems


def test_full_scale_audio_is_reported_as_clipped_in_float32_and_int16(recorded: Path) -> None:
    report = inspect_session(recorded / "loud")
    for name, sample_format, channels in (("hot_float.audio", "float32", 2), ("hot_int.audio", "int16", 1)):
        audio = _stream(report, name).audio
        assert audio is not None and (audio.sample_format, audio.channels) == (sample_format, channels)
        assert 0.01 < audio.clipped_share < 0.05, audio  # a full-scale sine is within 0.1 % of its peak 3 % of the time
        assert f"{name}: " in _problems(report) and "of audio samples are clipped" in _problems(report)
    assert report.exit_code == 1
    assert cp("inspect", str(recorded / "loud")).returncode == 1


def test_a_failed_node_and_a_decode_budget(clean: Path) -> None:
    manifest = json.loads((clean / "manifest.json").read_text())
    manifest["nodes"]["tick"].update(state="failed", error="the ticker fell over")
    (clean / "manifest.json").write_text(json.dumps(manifest))
    report = inspect_session(clean, decode_frames_max=0)
    assert "node tick: failed: the ticker fell over" in _problems(report)
    video = _stream(report, "cam.video").video
    assert video is not None and video.frames_decoded == 0 and video.frames_from_headers == video.timestamp_rows


def test_losses_a_device_reported_are_counted_as_drops(clean: Path) -> None:
    manifest = json.loads((clean / "manifest.json").read_text())
    manifest["nodes"]["mic"]["info"] = {"samplerate": 8000, "blocks_dropped": 4, "overflows": 2}
    (clean / "manifest.json").write_text(json.dumps(manifest))
    report = inspect_session(clean)
    assert _stream(report, "mic.audio").drops.device_dropped == 4
    assert _stream(report, "mic.audio").nominal_from == "info.samplerate"
    warnings = "\n".join(f.line for f in report.warnings)
    assert "node mic: dropped 4 samples" in warnings and "4 by its device" in warnings
    assert "node mic: its device reported 2 input overflows" in warnings
    assert not report.problems, _problems(report)


def test_an_unreadable_manifest_is_a_problem_and_the_disk_is_still_inspected(clean: Path) -> None:
    (clean / "manifest.json").write_text("{not json")
    report = inspect_session(clean)
    assert "manifest.json: cannot be read" in _problems(report)
    assert len(report.streams) == 4 and not report.has_manifest


def _launch(out: Path, recipe: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "cpcli", "run", str(recipe), "--out", str(out), "--session", "s"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            env=ENV, start_new_session=True)


@pytest.fixture
def killed(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """A `cp run` recording for about 2 s; the test kills it; nothing outlives the test."""
    proc = _launch(tmp_path, write_recipe(tmp_path, CLEAN))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        events = tmp_path / "s" / "events.jsonl"
        while not (events.exists() and "session_started" in events.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "the session never started"
            time.sleep(0.05)
        time.sleep(2.0)
        yield tmp_path / "s", proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def test_a_session_whose_cp_run_was_killed_is_reported_from_node_records(
        killed: tuple[Path, subprocess.Popen[bytes]]) -> None:
    session, proc = killed
    children = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)  # the nodes notice, close their files and write node.json
    proc.wait(5)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
    result = cp("inspect", str(session))
    assert "no manifest: cp run did not finish" in result.stdout
    assert result.returncode == 0, result.stdout
    report = inspect_session(session)
    assert {s.name for s in report.streams} == {"cam.video", "mic.audio", "level.level", "tick.tick"}
    assert all(f.status == "ok" for s in report.streams for f in s.files)  # checked against node.json


def test_a_session_whose_whole_process_group_was_killed_loses_only_its_end(
        killed: tuple[Path, subprocess.Popen[bytes]]) -> None:
    session, proc = killed
    os.killpg(proc.pid, signal.SIGKILL)  # every node dies at once: no node.json, a segment left open
    proc.wait(5)
    report = inspect_session(session)
    assert not report.has_manifest and report.status == "unfinished"
    assert {s.name for s in report.streams} == {"cam.video", "mic.audio", "level.level", "tick.tick"}
    assert not report.problems, _problems(report)
    assert all(s.samples > 10 for s in report.streams)
    assert all(f.status == "unverified" for s in report.streams for f in s.files)
    for line in (f.line for f in report.warnings if "killed" in f.what):
        assert line.startswith(("cam.video", "mic.audio")), line


def test_a_folder_that_is_not_a_session_is_one_error_line(tmp_path: Path, recorded: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = cp("inspect", str(tmp_path / "empty"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "is not a session folder (no manifest.json and no recorded streams)" in result.stderr
    assert "does not exist" in cp("inspect", str(tmp_path / "nowhere")).stderr
    with pytest.raises(ArchiveError, match="it holds session folders"):
        inspect_session(recorded)


def test_inspect_stays_ours_with_a_file_named_inspect_only_for_a_session_folder(
        clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert is_ours(["inspect", "backup/"])  # no file named inspect here
    (tmp_path / "inspect").write_text("notes")
    (tmp_path / "backup").mkdir()
    assert is_ours(["inspect", str(clean)])
    (clean / "manifest.json").unlink()
    assert is_ours(["inspect", str(clean)])  # a killed run's folder: <worker>/<node>/ with recordings
    assert not is_ours(["inspect", "backup/"])
    result = cp("inspect", "backup/", cwd=tmp_path)
    assert result.returncode == 0 and (tmp_path / "backup" / "inspect").read_text() == "notes"


def test_the_table_puts_notes_below_it_on_a_narrow_console(clean: Path) -> None:
    report = inspect_session(clean)
    for width, inline in ((80, False), (120, True)):
        console = Console(file=io.StringIO(), width=width, color_system=None)
        console.print(streams_table(report, width))
        for line in findings_lines(report):
            console.print(line)
        text = console.file.getvalue()  # type: ignore[attr-defined]
        assert max(len(line) for line in text.splitlines()) <= width
        assert "cam.video" in text and "ok: no problems in 4 streams" in text
        assert ("  cam.video: frames" in text) is not inline


def test_cluster_findings_clock_uncertainty_and_a_worker_never_back(tmp_path: Path) -> None:
    result = cp("run", str(ROOT / "recipes" / "demo.yaml"), "--duration", "1s", "--out", str(tmp_path / "s"),
                "--local", "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    session = Path(json.loads(result.stdout)["session_dir"])
    copy = tmp_path / "copy"
    shutil.copytree(session, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["workers"]["lab-02"] = {"host": "198.18.0.2", "clock": {"measured": True, "max_uncertainty_ns": 3_000_000}}
    manifest["lost_workers"] = {"lab-02": {"lost_at_ns": 4_200_000_000, "rejoined_at_ns": None, "finished": False}}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    found = {(f.where, f.what) for f in inspect_session(copy).findings}
    assert ("worker lab-02", "clock uncertainty reached 3.00 ms (above 1 ms): its timestamps may be off by that "
            "much") in found
    assert ("worker lab-02", "was lost at 4.2 s and never reported its recordings; they are on that machine "
            "(cp collect)") in found
    assert not any(f.where.startswith("worker") for f in inspect_session(session).findings)
