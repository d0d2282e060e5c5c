"""Table rows as CSV and events as JSON Lines; which kind a value is."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from cpcli.archive.files import CsvSink, FileRecord, FileSink, PortFiles, StreamWriter
from cpcli.errors import ArchiveError

RESERVED_COLUMNS = ("index", "t_ns", "local_ns")  # every table starts with these; row keys of those names get `value_`


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a {type(value).__name__} is not JSON-able")


def _to_json(value: Any, where: str = "") -> str:
    try:
        return json.dumps(value, default=_json_default, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise ArchiveError(
            f"{where}cannot record a value of type {type(value).__name__} ({err})",
            hint="send arrays, dicts of scalars or JSON-able values",
        ) from err


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, np.bool_, np.integer, np.floating))


def kind_of(value: Any) -> str:
    """The sample kind by shape and type alone (JSON-ability of events is checked when written)."""
    if isinstance(value, np.ndarray):
        dtype, shape = value.dtype, value.shape
        if dtype == np.uint8 and value.size and (value.ndim == 2 or (value.ndim == 3 and shape[2] == 3)):
            return "video"
        is_float = dtype.kind == "f" and dtype.itemsize in (4, 8)
        is_int = dtype.kind == "i" and dtype.itemsize in (2, 4)
        if (value.ndim == 2 and shape[1] > 0 and (is_float or is_int)) or (
            value.ndim == 1 and (is_float or (is_int and dtype.itemsize == 2))
        ):
            return "audio"
        return "events"
    if isinstance(value, dict) and value and all(isinstance(k, str) and _is_scalar(v) for k, v in value.items()):
        return "table"
    return "events"


def classify(value: Any) -> str:
    """How a value is recorded: "video", "audio", "table" or "events".

    Video is an HxW or HxWx3 uint8 array; audio a (frames x channels) float32/float64/int16/int32
    array, or a 1-D float or int16 array (one channel); a table row a non-empty flat dict of str
    to scalars; anything else JSON-able (numpy arrays and scalars included) is an event.

    Raises:
        ArchiveError: the value cannot be recorded; the message names its type.
    """
    kind = kind_of(value)
    if kind == "events":
        _to_json(value)
    return kind


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, np.floating):
        return str(value)  # shortest text that reads back as the same float32/float64
    if isinstance(value, float):
        return float.__repr__(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value)


class TableWriter(StreamWriter):
    """Table rows into `<port>.csv`: `index,t_ns,local_ns` then the first row's columns in order.

    A row with a column the header lacks starts a new part `<port>-0001.csv` whose header adds
    the new columns; a row missing columns leaves them empty, like None.
    """

    def __init__(self, files: PortFiles, logger: logging.Logger) -> None:
        self._files, self._log = files, logger
        self._columns: list[str] = []
        self._sink: CsvSink | None = None
        self._part = 0
        self._records: list[FileRecord] = []
        self._closed_bytes = 0

    @property
    def bytes_written(self) -> int:
        return self._closed_bytes + (self._sink.bytes_written if self._sink else 0)

    def write(self, index: int, t_ns: int, local_ns: int, value: Any, rate_hz: float | None) -> None:
        row: Mapping[str, Any] = value
        new = [key for key in row if key not in self._columns]
        if self._sink is None or new:
            self._columns += new
            name = f"{self._files.port}.csv"
            if self._sink is not None:
                self._close_part()
                self._part += 1
                name = self._files.segment(self._part, "csv")
                self._log.info("%s: new columns %s, continuing in %s", self._files.where, new, name)
            header = [
                *RESERVED_COLUMNS,
                *(f"value_{c}" if c in RESERVED_COLUMNS else c for c in self._columns),
            ]
            self._sink = self._files.csv(name, "table", header)
        self._sink.write_row([index, t_ns, local_ns, *(_cell(row.get(c)) for c in self._columns)])

    def flush(self) -> None:
        if self._sink is not None:
            self._sink.flush()

    def close(self) -> list[FileRecord]:
        self._close_part()
        return list(self._records)

    def _close_part(self) -> None:
        if self._sink is not None:
            record = self._sink.close()
            self._sink = None
            self._records.append(record)
            self._closed_bytes += record.bytes


class EventsWriter(StreamWriter):
    """Events into `<port>.jsonl`, one `{"index":..,"t_ns":..,"local_ns":..,"value":..}` object a line."""

    def __init__(self, files: PortFiles) -> None:
        self._files = files
        self._sink: FileSink | None = None

    @property
    def bytes_written(self) -> int:
        return self._sink.bytes_written if self._sink else 0

    def write(self, index: int, t_ns: int, local_ns: int, value: Any, rate_hz: float | None) -> None:
        text = _to_json(value, f"{self._files.where}: ")
        if self._sink is None:
            self._sink = self._files.sink(f"{self._files.port}.jsonl", "events")
        line = f'{{"index":{int(index)},"t_ns":{int(t_ns)},"local_ns":{int(local_ns)},"value":{text}}}\n'
        self._sink.write(line.encode())

    def flush(self) -> None:
        if self._sink is not None:
            self._sink.flush()

    def close(self) -> list[FileRecord]:
        return [self._sink.close()] if self._sink else []
