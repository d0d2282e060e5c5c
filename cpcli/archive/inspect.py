"""The data-quality report of a recorded session folder: per stream timing, drops, files, audio and video."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpcli.archive.files import HASH_CHUNK_BYTES
from cpcli.archive.mediacheck import (
    CLIP_CHUNK_SAMPLES,
    CLIP_LEVEL,
    CLIP_PROBLEM_SHARE,
    CRASH_TAIL_S,
    DECODE_FRAMES_MAX,
    WAV_FORMATS,
    WAVE_EXTENSIBLE,
)
from cpcli.archive.report import (
    AudioCheck,
    Drops,
    FileCheck,
    Finding,
    Findings,
    Gaps,
    SessionReport,
    Severity,
    StreamReport,
    VideoCheck,
)
from cpcli.archive.streamcheck import (
    GAP_PERIODS,
    NOMINAL_KEYS,
    RATE_MIN_SAMPLES,
    RATE_TOLERANCE,
    check_file,
    check_indexes,
    inspect_stream,
)
from cpcli.archive.streams import (
    DEVICE_DROP_KEYS,
    RecordedNode,
    RecordedStream,
    count_of,
    find_streams,
    not_a_session,
    read_manifest,
    read_records,
    scan_disk,
)
from cpcli.clock import CLOCK_WARN_NS

__all__ = [
    "CLIP_CHUNK_SAMPLES", "CLIP_LEVEL", "CLIP_PROBLEM_SHARE", "CRASH_TAIL_S", "DECODE_FRAMES_MAX", "DEVICE_DROP_KEYS",
    "GAP_PERIODS", "HASH_CHUNK_BYTES", "NOMINAL_KEYS", "RATE_MIN_SAMPLES", "RATE_TOLERANCE", "WAVE_EXTENSIBLE",
    "WAV_FORMATS", "AudioCheck", "Drops", "FileCheck", "Finding", "Gaps", "SessionReport", "Severity", "StreamReport",
    "VideoCheck", "inspect_session",
]


def inspect_session(session_dir: Path, *, decode_frames_max: int = DECODE_FRAMES_MAX) -> SessionReport:
    """Check a session folder, finished or left behind by a killed `cp run`, and report every stream.

    Raises:
        ArchiveError: the folder does not exist or holds neither a manifest nor recorded streams.
    """
    root = Path(session_dir)
    findings = Findings()
    if not root.is_dir():
        raise not_a_session(root)
    manifest = read_manifest(root, findings)
    disk = scan_disk(root)
    if manifest is None and not disk:
        raise not_a_session(root)
    nodes, expected = read_records(root, manifest, disk)
    if not (root / "manifest.json").exists():
        findings.warning("session", "no manifest: cp run did not finish; reporting what is on disk")
    if manifest is not None:
        _check_nodes(manifest, findings)
        _check_cluster(manifest, findings)
    streams = find_streams(root, expected, disk)
    _check_drops(nodes, streams, findings)
    results = [inspect_stream(root, s, nodes.get(s.node, RecordedNode()), expected, manifest is not None,
                              decode_frames_max, findings) for s in streams]
    reports = check_indexes(streams, [r for r, _ in results], [i for _, i in results], nodes, findings)
    session_files = tuple(check_file(root, str(e.get("path", "")), str(e.get("kind", "")), e, True, "session",
                                     findings) for e in (manifest or {}).get("files", []) if isinstance(e, dict))
    has = manifest is not None
    m = manifest or {}
    return SessionReport(
        path=str(root.resolve()), session=str(m.get("session", root.name)), recipe=m.get("recipe"),
        start_utc=m.get("start_utc"), duration_s=m["duration_ns"] / 1e9 if isinstance(m.get("duration_ns"), int)
        else None, status=str(m.get("status", "unknown")) if has else "unfinished", has_manifest=has,
        streams=tuple(reports), session_files=session_files, findings=tuple(findings.items))


def _check_nodes(manifest: dict[str, Any], findings: Findings) -> None:
    for node_id, entry in manifest["nodes"].items():
        if not isinstance(entry, dict):
            continue
        if entry.get("state") == "failed" or entry.get("error"):
            findings.problem(f"node {node_id}", f"failed: {entry.get('error') or 'no reason recorded'}")
        elif entry.get("record") and not entry.get("files"):
            findings.warning(f"node {node_id}", "was to be recorded but wrote no files")


def _check_cluster(manifest: dict[str, Any], findings: Findings) -> None:
    """What a cluster session's manifest says about its machines: clocks, and workers that were lost."""
    for name, worker in (manifest.get("workers") or {}).items():
        clock = worker.get("clock") if isinstance(worker, dict) else None
        if not isinstance(clock, dict) or not clock.get("measured"):
            continue
        worst = int(clock.get("max_uncertainty_ns") or 0)
        if worst > CLOCK_WARN_NS:
            findings.warning(f"worker {name}", f"clock uncertainty reached {worst / 1e6:.2f} ms (above "
                                               f"{CLOCK_WARN_NS / 1e6:g} ms): its timestamps may be off by that much")
    for name, lost in (manifest.get("lost_workers") or {}).items():
        if isinstance(lost, dict) and not lost.get("finished"):
            findings.problem(f"worker {name}", f"was lost at {int(lost.get('lost_at_ns') or 0) / 1e9:.1f} s and never "
                                               "reported its recordings; they are on that machine (cp collect)")


def _check_drops(nodes: dict[str, RecordedNode], streams: list[RecordedStream], findings: Findings) -> None:
    recorded = {s.node for s in streams}
    for node_id, node in nodes.items():
        d = node.drops
        if d.total and node_id in recorded:
            device = f", {d.device_dropped} by its device" if d.device_dropped else ""
            findings.warning(f"node {node_id}", f"dropped {d.total} samples ({d.dropped_in} inputs lost in transport, "
                                                f"{d.record_dropped} recorder queue full, {d.dropped_out} "
                                                f"shared-memory pool full{device})")
        overflows = count_of(node.info, "overflows")
        if overflows and node_id in recorded:
            findings.warning(f"node {node_id}", f"its device reported {overflows} input overflows (gaps in the audio)")
