"""The checks of one recorded stream in `cp inspect`: its files, rows, timing, rate and index gaps."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cpcli.archive.files import sha256_file
from cpcli.archive.media import PARTIAL_DIR
from cpcli.archive.mediacheck import check_audio, check_video
from cpcli.archive.report import FileCheck, Findings, Gaps, StreamReport
from cpcli.archive.rows import LOCAL, Rows, read_rows
from cpcli.archive.streams import RecordedNode, RecordedStream

GAP_PERIODS = 2.0  # an interval longer than this many median intervals is a gap
RATE_TOLERANCE = 0.10  # a measured rate this far (relative) from the nominal one earns a warning
RATE_MIN_SAMPLES = 10  # fewer samples say nothing about a rate
NOMINAL_KEYS = {"video": ("fps", "rate_hz"), "audio": ("samplerate",), "table": ("rate_hz",), "events": ("rate_hz",)}


def check_file(root: Path, rel: str, kind: str, entry: dict[str, Any] | None, has_manifest: bool, where: str,
               findings: Findings) -> FileCheck:
    """One file against its expected record (size, then sha256); `where` names it in findings."""
    path = root / rel
    want = entry.get("bytes") if entry is not None and isinstance(entry.get("bytes"), int) else None
    source = "the manifest" if has_manifest else "node.json"
    if not path.is_file():
        findings.problem(where, f"{rel} is missing")
        return FileCheck(rel, kind, "missing", None, want)
    size = path.stat().st_size
    if entry is None:
        if has_manifest:
            findings.warning(where, f"{rel} is not listed in the manifest")
        return FileCheck(rel, kind, "unlisted" if has_manifest else "unverified", size, None)
    if size != want:
        findings.problem(where, f"{rel} has {size} bytes, {source} says {want}")
        return FileCheck(rel, kind, "size mismatch", size, want)
    try:
        digest = sha256_file(path)[1]
    except OSError as err:
        findings.problem(where, f"{rel} cannot be read ({err.strerror})")
        return FileCheck(rel, kind, "missing", size, want)
    if digest != entry.get("sha256"):
        findings.problem(where, f"{rel} does not match its sha256 in {source} (changed or corrupted)")
        return FileCheck(rel, kind, "hash mismatch", size, want)
    return FileCheck(rel, kind, "ok", size, want)


def _nominal(node: RecordedNode, kind: str) -> tuple[float | None, str]:
    for source, values in (("info", node.info), ("params", node.params)):
        for key in NOMINAL_KEYS.get(kind, ()):
            value = values.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                return float(value), f"{source}.{key}"
    return None, ""


def inspect_stream(root: Path, stream: RecordedStream, node: RecordedNode, expected: dict[str, dict[str, Any]],
                   has_manifest: bool, decode_frames_max: int, findings: Findings
                   ) -> tuple[StreamReport, npt.NDArray[np.int64]]:
    """A stream's report (index gaps not yet counted) and its index column, for `check_indexes`."""
    name = stream.name
    problems_before = findings.problem_count
    rels = [*stream.data, *([stream.timestamps] if stream.timestamps else [])]
    files = tuple(check_file(root, rel, str((expected.get(rel) or {}).get("kind", stream.kind)), expected.get(rel),
                             has_manifest, name, findings) for rel in rels)
    partial = sorted((root / stream.worker / stream.node / PARTIAL_DIR).glob(f"{stream.port}-*.mp4"))
    if stream.kind == "video" and partial:
        findings.warning(name, f"{len(partial)} segment{'s' if len(partial) > 1 else ''} never closed, so not "
                               f"playable: {', '.join(f'{PARTIAL_DIR}/{p.name}' for p in partial)}")
    if stream.kind in ("video", "audio") and stream.timestamps is None:
        findings.problem(name, f"{stream.kind} without its {stream.port}.timestamps.csv")
    rows = read_rows(root, stream)
    for message in rows.unreadable:
        findings.problem(name, message)
    if rows.bad:
        findings.problem(name, f"{rows.bad} unreadable rows (first at {rows.first_bad})")
    t = rows.np("t_ns")
    notes: list[str] = []
    nominal, nominal_from = _nominal(node, stream.kind)
    timing = _timing(t, rows, name, findings)
    if rows.has_local:  # the recording machine's monotonic clock never steps back; older sessions lack it
        _backwards(rows.np(LOCAL), rows, name, f"local timestamps ({LOCAL})", findings)
    rate = (len(t) - 1) * 1e9 / (t[-1] - t[0]) if len(t) >= 2 and t[-1] > t[0] else None
    audio = video = None
    if stream.kind == "audio":
        audio = check_audio(root, stream, rows, has_manifest, findings)
        frames = rows.np("frames")
        if rate is not None:
            rate = float(frames[:-1].sum()) * 1e9 / float(t[-1] - t[0])
        if nominal is None and audio.samplerate_hz:
            nominal, nominal_from = float(audio.samplerate_hz), "wav header"
        if audio.clipped_samples:
            notes.append(f"clipped {audio.clipped_share:.2%}")
    elif stream.kind == "video":
        video, fps = check_video(root, stream, rows, has_manifest, decode_frames_max, findings)
        if nominal is None and fps:
            nominal, nominal_from = fps, "mp4 header"
        decoded = video.frames_decoded + video.frames_from_headers
        notes.append(f"frames {decoded}/{video.timestamp_rows}" + (
            f" ({video.frames_from_headers} by header)" if video.frames_from_headers else ""))
    if nominal is None and timing[0]:
        nominal, nominal_from = 1e9 / timing[0], "median interval"
        if stream.kind == "audio":
            nominal *= float(np.median(rows.np("frames"))) if len(rows.np("frames")) else 1.0
    elif nominal and rate and len(t) >= RATE_MIN_SAMPLES and abs(rate / nominal - 1) > RATE_TOLERANCE:
        findings.warning(name, f"measured {rate:.4g} Hz against {nominal:.4g} Hz nominal ({nominal_from}), "
                               f"{abs(rate / nominal - 1):.0%} {'below' if rate < nominal else 'above'}")
    if any(f.status == "unverified" for f in files):
        notes.append("unverified: no node.json")
    problems = findings.problem_count - problems_before
    if problems:
        notes.append(f"{problems} problem{'s' if problems > 1 else ''}")
    report = StreamReport(
        name=name, worker=stream.worker, node=stream.node, port=stream.port, kind=stream.kind, samples=len(t),
        first_t_ns=int(t[0]) if len(t) else None, last_t_ns=int(t[-1]) if len(t) else None,
        duration_s=float(t[-1] - t[0]) / 1e9 if len(t) >= 2 else 0.0, rate_hz=rate, nominal_rate_hz=nominal,
        nominal_from=nominal_from, gaps=timing[1], drops=node.drops, jitter_p99_ms=timing[2], index_missing=0,
        non_monotonic=timing[3], files=files, audio=audio, video=video, notes=tuple(notes))
    return report, rows.np("index")


def _timing(t: npt.NDArray[np.int64], rows: Rows, name: str, findings: Findings
            ) -> tuple[float | None, Gaps, float | None, int]:
    """(median interval ns, gaps, jitter p99 ms, backward steps); gaps and jitter against the median."""
    if len(t) < 2:
        return None, Gaps(), None, 0
    d = np.diff(t)
    back = _backwards(t, rows, name, "timestamps", findings)
    positive = d[d > 0]
    if not len(positive):
        return None, Gaps(), None, back
    median = float(np.median(positive))
    jitter = float(np.percentile(np.abs(d - median), 99)) / 1e6
    long = np.flatnonzero(d > GAP_PERIODS * median)
    gaps = Gaps()
    if len(long):
        worst = int(long[np.argmax(d[long])])
        gaps = Gaps(len(long), float(d[worst]) / 1e6, float(t[worst]) / 1e9)
        findings.warning(name, f"{len(long)} gaps longer than {GAP_PERIODS:g} periods ({median / 1e6:.3g} ms), "
                               f"longest {gaps.longest_ms:.0f} ms at {gaps.longest_at_s:.3f} s")
    return median, gaps, jitter, back


def _backwards(values: npt.NDArray[np.int64], rows: Rows, name: str, what: str, findings: Findings) -> int:
    """Rows whose `values` (nanoseconds) go back from the row before, found as a problem; how many."""
    back = np.flatnonzero(np.diff(values) < 0)
    if len(back):
        first = int(back[0]) + 1
        findings.problem(name, f"{what} go backwards at {len(back)} row{'s' if len(back) > 1 else ''} (first at "
                               f"{rows.where(first)}: {values[first - 1] / 1e9:.3f} s -> {values[first] / 1e9:.3f} s)")
    return len(back)


def check_indexes(streams: list[RecordedStream], reports: list[StreamReport], indexes: list[npt.NDArray[np.int64]],
                  nodes: dict[str, RecordedNode], findings: Findings) -> list[StreamReport]:
    """Index gaps per port (a port's table rows and events share one sequence), set against recorder drops."""
    by_port: dict[tuple[str, str], list[int]] = {}
    for i, stream in enumerate(streams):
        by_port.setdefault((stream.node, stream.port), []).append(i)
    missing_by_node: dict[str, list[tuple[str, int, int]]] = {}
    reports = list(reports)
    for (node_id, port), members in by_port.items():
        every = np.concatenate([indexes[i] for i in members])
        if not len(every):
            continue
        ordered = len(members) == 1 and bool(np.all(every[1:] > every[:-1]))
        unique = every if ordered else np.unique(every)  # recorded in order: unique already
        if len(every) > len(unique):
            findings.problem(f"{node_id}.{port}", f"{len(every) - len(unique)} rows repeat an index")
        missing = int(unique[-1]) + 1 - len(unique) if unique[0] >= 0 else 0
        if missing:
            off = np.flatnonzero(unique != np.arange(len(unique)))
            missing_by_node.setdefault(node_id, []).append((port, missing, int(off[0]) if len(off) else 0))
            for i in members:
                reports[i] = replace(reports[i], index_missing=missing, notes=(*reports[i].notes, f"{missing} missing"))
    for node_id, ports in missing_by_node.items():
        total = sum(m for _, m, _ in ports)
        dropped = nodes.get(node_id, RecordedNode()).drops.record_dropped
        for port, missing, first in ports:
            what = f"{missing} samples missing from the recording (index gaps, the first at index {first})"
            if total <= dropped:
                findings.warning(f"{node_id}.{port}", f"{what}; the recorder dropped {dropped} (queue full)")
            else:
                findings.problem(f"{node_id}.{port}", f"{what}; only {dropped} explained by recorder drops")
    return reports
