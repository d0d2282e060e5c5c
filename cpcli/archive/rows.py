"""A recorded stream's rows read back: the integer columns of its CSV files or JSON Lines, with their locations."""

from __future__ import annotations

import csv
import json
import operator
import re
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cpcli.archive.streams import RecordedStream

_EVENT = re.compile(rb'^\{"index":(-?\d+),"t_ns":(-?\d+),(?:"local_ns":(-?\d+),)?')  # EventsWriter's line start
_COLUMNS = {"video": ("index", "t_ns", "segment"), "audio": ("index", "t_ns", "segment", "frames"),
            "table": ("index", "t_ns")}
LOCAL = "local_ns"  # the recording machine's raw clock, the column after index and t_ns; older sessions lack it


@dataclass(frozen=True)
class Rows:
    """Integer columns of a stream's rows, with the files they came from, for `file:line` locations."""

    names: tuple[str, ...]
    data: array[int]  # row after row, len(names) values each
    parts: tuple[tuple[str, int, int], ...]  # (path, first row, line of the first row)
    bad: int  # rows with a value that is not an integer, or too few values
    first_bad: str  # where the first of those is, `file:line`
    unreadable: tuple[str, ...]  # why files could not be read

    @property
    def has_local(self) -> bool:
        """Whether the stream keeps `local_ns` beside `t_ns` (recorded by a cpcli that writes it)."""
        return LOCAL in self.names

    def np(self, column: str) -> npt.NDArray[np.int64]:
        table = np.frombuffer(self.data, dtype=np.int64) if self.data else np.zeros(0, np.int64)
        return table.reshape(-1, len(self.names))[:, self.names.index(column)]

    def where(self, row: int) -> str:
        for path, first, line in reversed(self.parts):
            if row >= first:
                return f"{path}:{line + row - first}"
        return "?"


@dataclass
class _Reading:
    """Rows so far, while the files of a stream are read one after another."""

    names: tuple[str, ...]
    data: array[int] = field(default_factory=lambda: array("q"))
    parts: list[tuple[str, int, int]] = field(default_factory=list)
    bad: int = 0
    first_bad: str = ""
    unreadable: list[str] = field(default_factory=list)
    decided: bool = False  # whether `names` holds `local_ns` is settled

    @property
    def count(self) -> int:
        return len(self.data) // len(self.names)

    def decide_local(self, has_local: bool) -> None:
        """The first file (or line) of a stream says whether it keeps `local_ns`; the rest must agree."""
        if not self.decided:
            self.decided = True
            if has_local:
                self.names = (*self.names, LOCAL)


def read_rows(root: Path, stream: RecordedStream) -> Rows:
    """The rows of a stream: media timestamps, table parts (the unnumbered file first) or events."""
    rows = _Reading(_COLUMNS.get(stream.kind, ("index", "t_ns")))
    present = [p for p in stream.data if (root / p).is_file()]
    if stream.kind in ("video", "audio"):
        if stream.timestamps is not None and (root / stream.timestamps).is_file():
            _read_csv(root, stream.timestamps, rows)
    elif stream.kind == "table":
        for rel in sorted(present, key=lambda p: (not p.endswith(f"/{stream.port}.csv"), p)):
            _read_csv(root, rel, rows)
    else:
        for rel in present:
            _read_jsonl(root, rel, rows)
    return Rows(rows.names, rows.data, tuple(rows.parts), rows.bad, rows.first_bad, tuple(rows.unreadable))


def _read_csv(root: Path, rel: str, rows: _Reading) -> None:
    try:
        with (root / rel).open(newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header:
                rows.decide_local(header[:3] == ["index", "t_ns", LOCAL])
            missing = [c for c in rows.names if c not in (header or [])]
            if missing:
                rows.unreadable.append(f"{rel} has no {', '.join(missing)} column")
                return
            assert header is not None
            get = operator.itemgetter(*(header.index(c) for c in rows.names))
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


def _read_jsonl(root: Path, rel: str, rows: _Reading) -> None:
    rows.parts.append((rel, rows.count, 1))
    try:
        with (root / rel).open("rb") as fh:
            for line_no, line in enumerate(fh, 1):
                match = _EVENT.match(line)
                try:
                    if match:
                        fields: tuple[Any, ...] = match.groups()
                    else:
                        obj = json.loads(line)
                        fields = (obj["index"], obj["t_ns"], obj.get(LOCAL))
                    rows.decide_local(fields[2] is not None)
                    rows.data.extend(tuple(int(v) for v in fields[: len(rows.names)]))  # int(None): a bad row
                except (ValueError, KeyError, TypeError, OverflowError):
                    rows.bad += 1
                    rows.first_bad = rows.first_bad or f"{rel}:{line_no}"
    except OSError as err:
        rows.unreadable.append(f"{rel} cannot be read ({err.strerror})")
