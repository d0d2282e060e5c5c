"""The data-quality report of a recorded session folder: per stream timing, drops, files, audio and video."""

from __future__ import annotations

import csv
import hashlib
import json
import operator
import re
import struct
from array import array
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cpcli.archive.manifest import NODE_RECORD
from cpcli.archive.media import PARTIAL_DIR
from cpcli.errors import ArchiveError

GAP_PERIODS = 2.0  # an interval longer than this many median intervals is a gap
CLIP_LEVEL = 0.999  # an audio sample at this share of full scale or above counts as clipped
CLIP_PROBLEM_SHARE = 0.001  # more clipped samples than this share is a problem, fewer a warning
RATE_TOLERANCE = 0.10  # a measured rate this far (relative) from the nominal one earns a warning
RATE_MIN_SAMPLES = 10  # fewer samples say nothing about a rate
CRASH_TAIL_S = 2.0  # a killed run may lose this much: the last flush interval (1 s) and an open segment (1 s)
DECODE_FRAMES_MAX = 9000  # frames decoded per video stream (5 min at 30 fps); the rest counted from MP4 headers
HASH_CHUNK_BYTES = 1 << 20
CLIP_CHUNK_SAMPLES = 1 << 22  # audio scanned in pieces: bounded memory for hour-long recordings
WAV_FORMATS = {(1, 16): ("<i2", "int16"), (1, 32): ("<i4", "int32"), (3, 32): ("<f4", "float32"),
               (3, 64): ("<f8", "float64")}  # (format tag, bits) -> numpy dtype, name
WAVE_EXTENSIBLE = 0xFFFE
DEVICE_DROP_KEYS = ("blocks_dropped", "frames_dropped")  # counts a node puts in its info when its device lost data
NOMINAL_KEYS = {"video": ("fps", "rate_hz"), "audio": ("samplerate",), "table": ("rate_hz",), "events": ("rate_hz",)}
_SEGMENT = re.compile(r"^(?P<port>.+)-(?P<number>\d{4,})\.(?P<ext>mp4|wav|csv)$")
_EVENT = re.compile(rb'^\{"index":(-?\d+),"t_ns":(-?\d+),')  # how EventsWriter starts every line
_SEGMENT_KINDS = {"mp4": "video", "wav": "audio", "csv": "table"}
_COLUMNS = {"video": ("index", "t_ns", "segment"), "audio": ("index", "t_ns", "segment", "frames"),
            "table": ("index", "t_ns")}


class Severity(str, Enum):
    """A problem makes `cp inspect` exit 1; a warning is worth reading but the data is whole."""

    PROBLEM = "problem"
    WARNING = "warning"


@dataclass(frozen=True)
class Finding:
    """One thing wrong or worth knowing: what, and where (a stream `node.port`, a node or a file)."""

    severity: Severity
    where: str
    what: str

    @property
    def line(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass(frozen=True)
class FileCheck:
    """One file against its record: status ok, missing, size mismatch, hash mismatch, unlisted or unverified."""

    path: str
    kind: str
    status: str
    bytes: int | None
    expected_bytes: int | None


@dataclass(frozen=True)
class Gaps:
    """Intervals longer than GAP_PERIODS median intervals; the longest and when it began (session time)."""

    count: int = 0
    longest_ms: float = 0.0
    longest_at_s: float | None = None


@dataclass(frozen=True)
class Drops:
    """A node's losses: inputs lost in transport, recorder queue full, shared memory full (its stats),
    and what its device lost (`blocks_dropped`/`frames_dropped` in the info a node reports)."""

    dropped_in: int = 0
    record_dropped: int = 0
    dropped_out: int = 0
    device_dropped: int = 0

    @property
    def total(self) -> int:
        return self.dropped_in + self.record_dropped + self.dropped_out + self.device_dropped


@dataclass(frozen=True)
class AudioCheck:
    """What the WAV segments hold against the timestamps, and how much of it is clipped."""

    samplerate_hz: int | None
    channels: int | None
    sample_format: str
    frames_wav: int
    frames_timestamps: int
    clipped_samples: int
    clipped_share: float


@dataclass(frozen=True)
class VideoCheck:
    """Frames in the MP4 segments (decoded, or counted from headers past the budget) against timestamp rows."""

    segments: int
    frames_decoded: int
    frames_from_headers: int
    timestamp_rows: int


@dataclass(frozen=True)
class StreamReport:
    """One recorded port of one node: its timing, losses, files and media checks."""

    name: str
    worker: str
    node: str
    port: str
    kind: str
    samples: int
    first_t_ns: int | None
    last_t_ns: int | None
    duration_s: float
    rate_hz: float | None
    nominal_rate_hz: float | None
    nominal_from: str
    gaps: Gaps
    drops: Drops
    jitter_p99_ms: float | None
    index_missing: int
    non_monotonic: int
    files: tuple[FileCheck, ...]
    audio: AudioCheck | None = None
    video: VideoCheck | None = None
    notes: tuple[str, ...] = ()

    @property
    def files_ok(self) -> int:
        return sum(f.status == "ok" for f in self.files)


@dataclass(frozen=True)
class SessionReport:
    """The whole report: session facts, every stream, the session's own files, and the findings."""

    path: str
    session: str
    recipe: str | None
    start_utc: str | None
    duration_s: float | None
    status: str
    has_manifest: bool
    streams: tuple[StreamReport, ...]
    session_files: tuple[FileCheck, ...]
    findings: tuple[Finding, ...]

    @property
    def problems(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity is Severity.PROBLEM)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity is Severity.WARNING)

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["findings"] = [{"severity": f.severity.value, "where": f.where, "what": f.what} for f in self.findings]
        data["problems"] = [f.line for f in self.problems]
        data["warnings"] = [f.line for f in self.warnings]
        data["exit_code"] = self.exit_code
        return data


@dataclass
class _Node:
    """What the manifest (or, without one, the node's own node.json) says about a node."""

    params: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    drops: Drops = field(default_factory=Drops)


@dataclass
class _Stream:
    worker: str
    node: str
    port: str
    kind: str
    data: list[str] = field(default_factory=list)  # segments, table parts or the .jsonl, relative paths
    timestamps: str | None = None

    @property
    def name(self) -> str:
        return f"{self.node}.{self.port}"


@dataclass
class _Rows:
    """Integer columns of a stream's rows, with the files they came from, for `file:line` locations."""

    names: tuple[str, ...]
    data: array[int] = field(default_factory=lambda: array("q"))  # row after row, len(names) values each
    parts: list[tuple[str, int, int]] = field(default_factory=list)  # (path, first row, line of the first row)
    bad: int = 0
    first_bad: str = ""
    unreadable: list[str] = field(default_factory=list)

    def np(self, column: str) -> npt.NDArray[np.int64]:
        table = np.frombuffer(self.data, dtype=np.int64) if self.data else np.zeros(0, np.int64)
        return table.reshape(-1, len(self.names))[:, self.names.index(column)]

    @property
    def count(self) -> int:
        return len(self.data) // len(self.names)

    def where(self, row: int) -> str:
        for path, first, line in reversed(self.parts):
            if row >= first:
                return f"{path}:{line + row - first}"
        return "?"


class _Findings:
    def __init__(self) -> None:
        self.items: list[Finding] = []

    def problem(self, where: str, what: str) -> None:
        self.items.append(Finding(Severity.PROBLEM, where, what))

    def warning(self, where: str, what: str) -> None:
        self.items.append(Finding(Severity.WARNING, where, what))


def inspect_session(session_dir: Path, *, decode_frames_max: int = DECODE_FRAMES_MAX) -> SessionReport:
    """Check a session folder, finished or left behind by a killed `cp run`, and report every stream.

    Raises:
        ArchiveError: the folder does not exist or holds neither a manifest nor recorded streams.
    """
    root = Path(session_dir)
    findings = _Findings()
    if not root.is_dir():
        raise _not_a_session(root)
    manifest = _manifest(root, findings)
    disk = _scan(root)
    if manifest is None and not disk:
        raise _not_a_session(root)
    nodes, expected = _records(root, manifest, disk)
    if not (root / "manifest.json").exists():
        findings.warning("session", "no manifest: cp run did not finish; reporting what is on disk")
    if manifest is not None:
        _check_nodes(manifest, findings)
    streams = _streams(root, expected, disk)
    _check_drops(nodes, streams, findings)
    results = [_inspect_stream(root, s, nodes.get(s.node, _Node()), expected, manifest is not None,
                               decode_frames_max, findings) for s in streams]
    reports = _check_indexes(streams, [r for r, _ in results], [i for _, i in results], nodes, findings)
    session_files = tuple(_check_file(root, str(e.get("path", "")), str(e.get("kind", "")), e, True, "session",
                                      findings) for e in (manifest or {}).get("files", []) if isinstance(e, dict))
    has = manifest is not None
    m = manifest or {}
    return SessionReport(
        path=str(root.resolve()), session=str(m.get("session", root.name)), recipe=m.get("recipe"),
        start_utc=m.get("start_utc"), duration_s=m["duration_ns"] / 1e9 if isinstance(m.get("duration_ns"), int)
        else None, status=str(m.get("status", "unknown")) if has else "unfinished", has_manifest=has,
        streams=tuple(reports), session_files=session_files, findings=tuple(findings.items))


# -- what is there ------------------------------------------------------------------------------


def _not_a_session(root: Path) -> ArchiveError:
    if not root.exists():
        why = "it does not exist"
    elif not root.is_dir():
        why = "it is a file"
    else:
        why = "no manifest.json and no recorded streams"
    inner = sorted(p.parent.name for p in root.glob("*/manifest.json")) if root.is_dir() else []
    hint = (f"it holds session folders ({', '.join(inner[:3])}{', ...' if len(inner) > 3 else ''}); inspect one"
            if inner else "give the folder `cp run` printed as 'session folder:'")
    return ArchiveError(f"{root} is not a session folder ({why})", hint=hint)


def _manifest(root: Path, findings: _Findings) -> dict[str, Any] | None:
    path = root / "manifest.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        findings.problem("manifest.json", f"cannot be read ({err}); reporting what is on disk")
        return None
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), dict):
        findings.problem("manifest.json", "is not a cpcli manifest (no nodes); reporting what is on disk")
        return None
    return data


def _name_of(name: str) -> tuple[str, str, bool] | None:
    """(port, kind, is_timestamps) of a recorded file's name; kind "media" for timestamps; None: not a stream."""
    if name.endswith(".timestamps.csv"):
        return name[: -len(".timestamps.csv")], "media", True
    match = _SEGMENT.match(name)
    if match:
        return match["port"], _SEGMENT_KINDS[match["ext"]], False
    if name.endswith(".csv"):
        return name[:-4], "table", False
    if name.endswith(".jsonl"):
        return name[:-6], "events", False
    return None


def _scan(root: Path) -> dict[str, list[str]]:
    """Node folders `<worker>/<node>` on disk that hold node.json or recorded files, with their file names."""
    found: dict[str, list[str]] = {}
    try:
        workers = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for worker in workers:
            for node in sorted(p for p in worker.iterdir() if p.is_dir()):
                names = sorted(f.name for f in node.iterdir() if f.is_file())
                if NODE_RECORD in names or any(_name_of(n) for n in names):
                    found[f"{worker.name}/{node.name}"] = names
    except OSError as err:
        raise ArchiveError(f"cannot read the session folder {root} ({err.strerror})") from err
    return found


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _counts(stats: dict[str, Any], key: str) -> int:
    value = stats.get(key, 0)
    if isinstance(value, dict):
        return sum(int(v) for v in value.values() if isinstance(v, (int, float)))
    return int(value) if isinstance(value, (int, float)) else 0


def _records(root: Path, manifest: dict[str, Any] | None, disk: dict[str, list[str]]
             ) -> tuple[dict[str, _Node], dict[str, dict[str, Any]]]:
    """Each node's params and stats, and each file's expected record (from the manifest, else node.json)."""
    nodes: dict[str, _Node] = {}
    expected: dict[str, dict[str, Any]] = {}
    entries: list[tuple[str, dict[str, Any]]] = []
    if manifest is not None:
        entries = [(n, e) for n, e in manifest["nodes"].items() if isinstance(e, dict)]
    else:
        for rel in disk:
            try:
                record = json.loads((root / rel / NODE_RECORD).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(record, dict):
                entries.append((rel.split("/")[-1], record))
    for node_id, entry in entries:
        stats, info = _mapping(entry.get("stats")), _mapping(entry.get("info"))
        drops = Drops(_counts(stats, "dropped_in"), _counts(stats, "record_dropped"), _counts(stats, "dropped_out"),
                      sum(_counts(info, key) for key in DEVICE_DROP_KEYS))
        nodes[node_id] = _Node(_mapping(entry.get("params")), info, drops)
        for file in entry.get("files") or []:
            if isinstance(file, dict) and isinstance(file.get("path"), str):
                expected[file["path"]] = file
    return nodes, expected


def _media_kind(path: Path) -> str:
    """Video or audio, for timestamps whose segments are all gone: audio timestamps count `frames`."""
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            return "audio" if "frames" in fh.readline().strip().split(",") else "video"
    except OSError:
        return "video"


def _streams(root: Path, expected: dict[str, dict[str, Any]], disk: dict[str, list[str]]) -> list[_Stream]:
    """Every stream named by a record or found on disk, keyed by worker, node, port and kind."""
    paths = set(expected) | {f"{rel}/{name}" for rel, names in disk.items() for name in names}
    parsed = []
    for path in sorted(paths):
        parts = path.split("/")
        named = _name_of(parts[-1]) if len(parts) == 3 else None
        if named is not None:
            parsed.append((parts[0], parts[1], *named, path))
    media = {(w, n, p): k for w, n, p, k, _, _ in parsed if k in ("video", "audio")}
    streams: dict[tuple[str, str, str, str], _Stream] = {}
    for worker, node, port, kind, is_timestamps, path in parsed:
        if kind == "media":
            kind = media.get((worker, node, port)) or _media_kind(root / path)
        stream = streams.setdefault((worker, node, port, kind), _Stream(worker, node, port, kind))
        if is_timestamps:
            stream.timestamps = path
        else:
            stream.data.append(path)
    return list(streams.values())


# -- session and node level ---------------------------------------------------------------------


def _check_nodes(manifest: dict[str, Any], findings: _Findings) -> None:
    for node_id, entry in manifest["nodes"].items():
        if not isinstance(entry, dict):
            continue
        if entry.get("state") == "failed" or entry.get("error"):
            findings.problem(f"node {node_id}", f"failed: {entry.get('error') or 'no reason recorded'}")
        elif entry.get("record") and not entry.get("files"):
            findings.warning(f"node {node_id}", "was to be recorded but wrote no files")


def _check_drops(nodes: dict[str, _Node], streams: list[_Stream], findings: _Findings) -> None:
    recorded = {s.node for s in streams}
    for node_id, node in nodes.items():
        d = node.drops
        if d.total and node_id in recorded:
            device = f", {d.device_dropped} by its device" if d.device_dropped else ""
            findings.warning(f"node {node_id}", f"dropped {d.total} samples ({d.dropped_in} inputs lost in transport, "
                                                f"{d.record_dropped} recorder queue full, {d.dropped_out} "
                                                f"shared-memory pool full{device})")
        overflows = _counts(node.info, "overflows")
        if overflows and node_id in recorded:
            findings.warning(f"node {node_id}", f"its device reported {overflows} input overflows (gaps in the audio)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _check_file(root: Path, rel: str, kind: str, entry: dict[str, Any] | None, has_manifest: bool, where: str,
                findings: _Findings) -> FileCheck:
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
        digest = _sha256(path)
    except OSError as err:
        findings.problem(where, f"{rel} cannot be read ({err.strerror})")
        return FileCheck(rel, kind, "missing", size, want)
    if digest != entry.get("sha256"):
        findings.problem(where, f"{rel} does not match its sha256 in {source} (changed or corrupted)")
        return FileCheck(rel, kind, "hash mismatch", size, want)
    return FileCheck(rel, kind, "ok", size, want)


# -- one stream ---------------------------------------------------------------------------------


def _read_csv(root: Path, rel: str, wanted: tuple[str, ...], rows: _Rows) -> None:
    try:
        with (root / rel).open(newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            missing = [c for c in wanted if c not in (header or [])]
            if missing:
                rows.unreadable.append(f"{rel} has no {', '.join(missing)} column")
                return
            assert header is not None
            get = operator.itemgetter(*(header.index(c) for c in wanted))
            rows.parts.append((rel, rows.count, 2))
            extend = rows.data.extend
            for row in reader:
                try:
                    extend(tuple(map(int, get(row))))  # whole rows only: a bad value appends nothing
                except (ValueError, IndexError, OverflowError):
                    rows.bad += 1
                    rows.first_bad = rows.first_bad or f"{rel}:{reader.line_num}"
    except (OSError, csv.Error) as err:
        rows.unreadable.append(f"{rel} cannot be read ({err})")


def _read_jsonl(root: Path, rel: str, rows: _Rows) -> None:
    rows.parts.append((rel, rows.count, 1))
    try:
        with (root / rel).open("rb") as fh:
            for line_no, line in enumerate(fh, 1):
                match = _EVENT.match(line)
                try:
                    if match:
                        index, t_ns = int(match[1]), int(match[2])
                    else:
                        obj = json.loads(line)
                        index, t_ns = int(obj["index"]), int(obj["t_ns"])
                    rows.data.extend((index, t_ns))
                except (ValueError, KeyError, TypeError, OverflowError):
                    rows.bad += 1
                    rows.first_bad = rows.first_bad or f"{rel}:{line_no}"
    except OSError as err:
        rows.unreadable.append(f"{rel} cannot be read ({err.strerror})")


def _rows(root: Path, stream: _Stream) -> _Rows:
    wanted = _COLUMNS.get(stream.kind, ("index", "t_ns"))
    rows = _Rows(wanted)
    present = [p for p in stream.data if (root / p).is_file()]
    if stream.kind in ("video", "audio"):
        if stream.timestamps is not None and (root / stream.timestamps).is_file():
            _read_csv(root, stream.timestamps, wanted, rows)
    elif stream.kind == "table":
        for rel in sorted(present, key=lambda p: (not p.endswith(f"/{stream.port}.csv"), p)):
            _read_csv(root, rel, wanted, rows)
    else:
        for rel in present:
            _read_jsonl(root, rel, rows)
    return rows


def _nominal(node: _Node, kind: str) -> tuple[float | None, str]:
    for source, values in (("info", node.info), ("params", node.params)):
        for key in NOMINAL_KEYS.get(kind, ()):
            value = values.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                return float(value), f"{source}.{key}"
    return None, ""


def _inspect_stream(root: Path, stream: _Stream, node: _Node, expected: dict[str, dict[str, Any]],
                    has_manifest: bool, decode_frames_max: int, findings: _Findings
                    ) -> tuple[StreamReport, npt.NDArray[np.int64]]:
    name = stream.name
    problems_before = sum(f.severity is Severity.PROBLEM for f in findings.items)
    rels = [*stream.data, *([stream.timestamps] if stream.timestamps else [])]
    files = tuple(_check_file(root, rel, str((expected.get(rel) or {}).get("kind", stream.kind)), expected.get(rel),
                              has_manifest, name, findings) for rel in rels)
    partial = sorted((root / stream.worker / stream.node / PARTIAL_DIR).glob(f"{stream.port}-*.mp4"))
    if stream.kind == "video" and partial:
        findings.warning(name, f"{len(partial)} segment{'s' if len(partial) > 1 else ''} never closed, so not "
                               f"playable: {', '.join(f'{PARTIAL_DIR}/{p.name}' for p in partial)}")
    if stream.kind in ("video", "audio") and stream.timestamps is None:
        findings.problem(name, f"{stream.kind} without its {stream.port}.timestamps.csv")
    rows = _rows(root, stream)
    for message in rows.unreadable:
        findings.problem(name, message)
    if rows.bad:
        findings.problem(name, f"{rows.bad} unreadable rows (first at {rows.first_bad})")
    t = rows.np("t_ns")
    notes: list[str] = []
    nominal, nominal_from = _nominal(node, stream.kind)
    timing = _timing(t, rows, name, findings)
    rate = (len(t) - 1) * 1e9 / (t[-1] - t[0]) if len(t) >= 2 and t[-1] > t[0] else None
    audio = video = None
    if stream.kind == "audio":
        audio = _audio(root, stream, rows, has_manifest, findings)
        frames = rows.np("frames")
        if rate is not None:
            rate = float(frames[:-1].sum()) * 1e9 / float(t[-1] - t[0])
        if nominal is None and audio.samplerate_hz:
            nominal, nominal_from = float(audio.samplerate_hz), "wav header"
        if audio.clipped_samples:
            notes.append(f"clipped {audio.clipped_share:.2%}")
    elif stream.kind == "video":
        video, fps = _video(root, stream, rows, has_manifest, decode_frames_max, findings)
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
    problems = sum(f.severity is Severity.PROBLEM for f in findings.items) - problems_before
    if problems:
        notes.append(f"{problems} problem{'s' if problems > 1 else ''}")
    report = StreamReport(
        name=name, worker=stream.worker, node=stream.node, port=stream.port, kind=stream.kind, samples=len(t),
        first_t_ns=int(t[0]) if len(t) else None, last_t_ns=int(t[-1]) if len(t) else None,
        duration_s=float(t[-1] - t[0]) / 1e9 if len(t) >= 2 else 0.0, rate_hz=rate, nominal_rate_hz=nominal,
        nominal_from=nominal_from, gaps=timing[1], drops=node.drops, jitter_p99_ms=timing[2], index_missing=0,
        non_monotonic=timing[3], files=files, audio=audio, video=video, notes=tuple(notes))
    return report, rows.np("index")


def _timing(t: npt.NDArray[np.int64], rows: _Rows, name: str, findings: _Findings
            ) -> tuple[float | None, Gaps, float | None, int]:
    """(median interval ns, gaps, jitter p99 ms, backward steps); gaps and jitter against the median."""
    if len(t) < 2:
        return None, Gaps(), None, 0
    d = np.diff(t)
    back = np.flatnonzero(d < 0)
    if len(back):
        first = int(back[0]) + 1
        findings.problem(name, f"timestamps go backwards at {len(back)} row{'s' if len(back) > 1 else ''} "
                               f"(first at {rows.where(first)}: {t[first - 1] / 1e9:.3f} s -> {t[first] / 1e9:.3f} s)")
    positive = d[d > 0]
    if not len(positive):
        return None, Gaps(), None, len(back)
    median = float(np.median(positive))
    jitter = float(np.percentile(np.abs(d - median), 99)) / 1e6
    long = np.flatnonzero(d > GAP_PERIODS * median)
    gaps = Gaps()
    if len(long):
        worst = int(long[np.argmax(d[long])])
        gaps = Gaps(len(long), float(d[worst]) / 1e6, float(t[worst]) / 1e9)
        findings.warning(name, f"{len(long)} gaps longer than {GAP_PERIODS:g} periods ({median / 1e6:.3g} ms), "
                               f"longest {gaps.longest_ms:.0f} ms at {gaps.longest_at_s:.3f} s")
    return median, gaps, jitter, len(back)


def _check_indexes(streams: list[_Stream], reports: list[StreamReport], indexes: list[npt.NDArray[np.int64]],
                   nodes: dict[str, _Node], findings: _Findings) -> list[StreamReport]:
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
        dropped = nodes.get(node_id, _Node()).drops.record_dropped
        for port, missing, first in ports:
            what = f"{missing} samples missing from the recording (index gaps, the first at index {first})"
            if total <= dropped:
                findings.warning(f"{node_id}.{port}", f"{what}; the recorder dropped {dropped} (queue full)")
            else:
                findings.problem(f"{node_id}.{port}", f"{what}; only {dropped} explained by recorder drops")
    return reports


# -- audio and video ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Wav:
    tag: int
    channels: int
    rate: int
    bits: int
    align: int
    offset: int  # of the samples
    data_bytes: int  # as the header says
    file_bytes: int


def _wav_header(path: Path) -> _Wav:
    """The layout of a WAV file from its RIFF chunks. Raises ValueError naming what is wrong."""
    with path.open("rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise ValueError("no RIFF/WAVE header")
        fmt: tuple[int, int, int, int, int] | None = None
        while len(chunk := fh.read(8)) == 8:
            chunk_id, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if chunk_id == b"data":
                if fmt is None or fmt[4] <= 0:
                    raise ValueError("no usable fmt chunk before the data")
                return _Wav(*fmt, fh.tell(), size, path.stat().st_size)
            body = fh.read(size + (size & 1))
            if chunk_id == b"fmt ":
                if len(body) < 16:
                    raise ValueError("a short fmt chunk")
                tag, channels, rate, _, align, bits = struct.unpack("<HHIIHH", body[:16])
                if tag == WAVE_EXTENSIBLE and len(body) >= 26:
                    tag = struct.unpack("<H", body[24:26])[0]
                fmt = (tag, channels, rate, bits, align)
    raise ValueError("no data chunk")


def _clipped(path: Path, wav: _Wav, dtype: str, frames: int) -> int:
    """Samples at CLIP_LEVEL of full scale or beyond, read through a memory map a piece at a time."""
    count = frames * wav.channels
    if count == 0:
        return 0
    level = CLIP_LEVEL * (1.0 if dtype[1] == "f" else float(2 ** (wav.bits - 1)))
    data = np.memmap(path, dtype=np.dtype(dtype), mode="r", offset=wav.offset, shape=(count,))
    try:
        return sum(int(np.count_nonzero((part >= level) | (part <= -level)))
                   for part in (data[i : i + CLIP_CHUNK_SAMPLES] for i in range(0, count, CLIP_CHUNK_SAMPLES)))
    finally:
        del data


def _segments(stream: _Stream, column: npt.NDArray[np.int64], weights: npt.NDArray[np.int64] | None
              ) -> tuple[dict[int, str], dict[int, int], list[int]]:
    """Segment files by number, timestamp rows (or frames) per segment, and every number, in order."""
    files = {int(m["number"]): rel for rel in stream.data if (m := _SEGMENT.match(rel.rsplit("/", 1)[-1]))}
    per_segment: dict[int, int] = {}
    if len(column):
        unique, inverse = np.unique(column, return_inverse=True)
        sums = np.bincount(inverse, weights=weights) if weights is not None else np.bincount(inverse)
        per_segment = {int(u): int(s) for u, s in zip(unique, sums, strict=True)}
    return files, per_segment, sorted(set(files) | set(per_segment))


class _Tail:
    """Reports a mismatch as a problem, unless cp run was killed and the segment lies in the last
    CRASH_TAIL_S of the stream, where a crash may take what was not flushed yet."""

    def __init__(self, findings: _Findings, name: str, has_manifest: bool, rows: _Rows) -> None:
        self.findings, self.name, self.has_manifest = findings, name, has_manifest
        segment, t = rows.np("segment"), rows.np("t_ns")
        self.last_t: dict[int, int] = {}
        for number, t_ns in zip(segment.tolist(), t.tolist(), strict=True):
            self.last_t[number] = max(t_ns, self.last_t.get(number, t_ns))
        self.end_t = int(t.max()) if len(t) else 0

    def __call__(self, number: int, what: str) -> None:
        last = self.last_t.get(number)
        in_tail = (number > max(self.last_t, default=-1)) if last is None else \
            last >= self.end_t - CRASH_TAIL_S * 1e9
        if not self.has_manifest and in_tail:
            self.findings.warning(self.name, f"{what} (at the end, cut short when cp run was killed)")
        else:
            self.findings.problem(self.name, what)


def _audio(root: Path, stream: _Stream, rows: _Rows, has_manifest: bool, findings: _Findings) -> AudioCheck:
    files, in_timestamps, numbers = _segments(stream, rows.np("segment"), rows.np("frames"))
    report = _Tail(findings, stream.name, has_manifest, rows)
    frames_wav = clipped = samples = 0
    layouts: set[tuple[int, int, str]] = set()
    for number in numbers:
        rel = files.get(number, f"{stream.worker}/{stream.node}/{stream.port}-{number:04d}.wav")
        path, listed = root / rel, in_timestamps.get(number, 0)
        if not path.is_file():
            if number not in files:
                report(number, f"timestamps refer to {rel}, which is not there ({listed} frames lost)")
            continue
        try:
            wav = _wav_header(path)
        except (OSError, ValueError) as err:
            report(number, f"{rel} is not a readable WAV file ({err})")
            continue
        dtype, format_name = WAV_FORMATS.get((wav.tag, wav.bits), ("", ""))
        if not dtype:
            findings.problem(stream.name, f"{rel}: WAV format {wav.tag} with {wav.bits} bits is not one cpcli writes")
            continue
        available = max(0, wav.file_bytes - wav.offset)
        if wav.data_bytes > available:
            report(number, f"{rel} is truncated: its header promises {wav.data_bytes} bytes of audio, "
                           f"the file holds {available}")
        frames = min(wav.data_bytes, available) // wav.align
        if frames != listed:
            report(number, f"{rel} holds {frames} frames, its timestamps list {listed}")
        frames_wav += frames
        clipped += _clipped(path, wav, dtype, frames)
        samples += frames * wav.channels
        layouts.add((wav.rate, wav.channels, format_name))
    if len(layouts) > 1:
        findings.warning(stream.name, f"the audio format changes between segments: {sorted(layouts)}")
    share = clipped / samples if samples else 0.0
    if clipped:
        (findings.problem if share > CLIP_PROBLEM_SHARE else findings.warning)(
            stream.name, f"{share:.2%} of audio samples are clipped ({clipped} at |x| >= {CLIP_LEVEL:g} of full scale)")
    rate, channels, format_name = sorted(layouts)[0] if layouts else (None, None, "")
    return AudioCheck(rate, channels, format_name, frames_wav, int(rows.np("frames").sum()), clipped, share)


def _count_frames(path: Path, decode: bool, limit: int) -> tuple[int | None, float]:
    """(frames decoded, or from the header; None if OpenCV cannot open it) and the MP4's frame rate."""
    import cv2  # here: only inspecting video needs OpenCV

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            return None, 0.0
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        if not decode:
            return int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), fps
        count = 0
        while count < limit and capture.grab():
            count += 1
        return count, fps
    finally:
        capture.release()


def _video(root: Path, stream: _Stream, rows: _Rows, has_manifest: bool, budget: int, findings: _Findings
           ) -> tuple[VideoCheck, float | None]:
    """Decode the last segment (where a crash strikes) then the others from the start, within `budget` frames."""
    files, in_timestamps, numbers = _segments(stream, rows.np("segment"), None)
    report = _Tail(findings, stream.name, has_manifest, rows)
    decoded = by_header = 0
    fps: float | None = None
    for number in numbers[-1:] + numbers[:-1]:
        rel = files.get(number, f"{stream.worker}/{stream.node}/{stream.port}-{number:04d}.mp4")
        path, listed = root / rel, in_timestamps.get(number, 0)
        if not path.is_file():
            if number not in files:
                partial = path.parent / PARTIAL_DIR / path.name
                why = f"was never closed (only {PARTIAL_DIR}/{path.name}, not playable)" if partial.is_file() \
                    else "is not there"
                report(number, f"timestamps refer to {rel}, which {why}: {listed} frames lost")
            continue
        decode = listed <= budget
        count, segment_fps = _count_frames(path, decode, limit=max(budget, listed) + 1)
        if count is None:
            report(number, f"{rel} cannot be decoded ({listed} frames lost)")
            continue
        fps = fps or segment_fps or None
        if decode:
            budget -= count
            decoded += count
        else:
            by_header += count
        if count != listed:
            report(number, f"{rel} has {count} {'decodable frames' if decode else 'frames by its header'}, "
                           f"its timestamps list {listed}")
    return VideoCheck(len(numbers), decoded, by_header, int(len(rows.np("segment")))), fps
