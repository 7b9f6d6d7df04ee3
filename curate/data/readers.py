"""Raw records of local files: ``(location, record)`` items, bad input answered, never a traceback.

A bad *file* (not gzip, truncated, unparseable whole-file JSON, column lists of
unequal length, unreadable parquet) is a :class:`CurateError` naming the fix.
A bad *row* (a JSONL line that is not JSON, not UTF-8, nested too deep; a CSV
row with the wrong number of fields) is yielded as a :class:`RowError`, so it
is quarantined with its line and reason and rows in = pairs + quarantined.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from pathlib import Path
from typing import Any, Iterator

import polars as pl

from curate.data.formats import RowError
from curate.errors import CurateError

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv", ".csv.gz")
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _gzip_problem(path: Path, exc: Exception, lines: int) -> CurateError:
    if isinstance(exc, gzip.BadGzipFile):
        return CurateError(f"{path} is not a gzip file ({exc}); rename it without .gz if it is plain text, "
                           "or compress it with gzip")
    return CurateError(f"{path} is truncated or corrupt (the gzip stream breaks after {lines} lines: {exc}); "
                       "download or compress it again")


def _decode_line(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RowError("invalid_utf8", f"byte {raw[exc.start]:#04x} at column {exc.start} is not UTF-8; "
                                       "re-encode the file as UTF-8") from exc


def parse_json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise RowError("unparseable_line", f"{exc.msg} (column {exc.colno})") from exc
    except RecursionError as exc:
        raise RowError("too_deep", "the JSON is nested deeper than the parser allows") from exc


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    lineno = 0
    try:
        with _open_binary(path) as fh:
            for lineno, raw in enumerate(fh):
                if not raw.strip():
                    continue
                location = f"{path.name}:{lineno}"
                try:
                    yield location, parse_json_line(_decode_line(raw))
                except RowError as err:
                    yield location, err
    except _GZIP_ERRORS as exc:
        raise _gzip_problem(path, exc, lineno) from exc


def _read_text(path: Path) -> str:
    try:
        with _open_binary(path) as fh:
            data = fh.read()
    except _GZIP_ERRORS as exc:
        raise _gzip_problem(path, exc, 0) from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CurateError(f"{path} is not UTF-8 (byte {data[exc.start]:#04x} at offset {exc.start}); "
                          "re-encode it as UTF-8") from exc


def _column_rows(path: Path, data: dict) -> list[dict]:
    lengths = {key: len(value) for key, value in data.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{k}: {n}" for k, n in lengths.items())
        raise CurateError(f"{path} is column-oriented JSON whose columns differ in length ({shown}); "
                          "give every column one value per row")
    return [dict(zip(data, row)) for row in zip(*data.values())]


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise CurateError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise CurateError(f"{path} is nested deeper than the JSON parser allows; flatten it or use JSONL") from exc
    if isinstance(data, dict):  # {"data": [...]} or column-oriented {"chosen": [...], ...}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
            data = lists[0]
        elif lists and all(isinstance(v, list) for v in data.values()):
            data = _column_rows(path, data)
    if not isinstance(data, list):
        raise CurateError(f"{path}: expected a JSON list of records (or an object of equal-length columns)")
    for i, rec in enumerate(data):
        yield f"{path.name}:{i}", rec


def _csv_records(path: Path) -> Iterator[tuple[str, Any]]:
    csv.field_size_limit(2**31 - 1)  # replies can be longer than the 128 KiB default
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        return
    for i, row in enumerate(reader):
        location = f"{path.name}:{i}"
        if len(row) != len(header):
            yield location, RowError("ragged_row", f"{len(row)} fields where the header has {len(header)}")
        else:
            yield location, dict(zip(header, row))


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        frame = pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - polars raises several types for a bad file
        raise CurateError(f"{path} is not a readable parquet file ({exc.__class__.__name__}); "
                          "write it again or pass another file") from exc
    for i, rec in enumerate(frame.iter_rows(named=True)):
        yield f"{path.name}:{i}", rec


def table_records(rows, name: str) -> Iterator[tuple[str, Any]]:
    for i, rec in enumerate(rows):
        yield f"{name}:{i}", rec


def local_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Raw records of a local file or ``datasets.save_to_disk`` directory."""
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                split = "train" if "train" in ds else next(iter(ds))
                ds = ds[split]
            return table_records(ds, path.name)
        if (path / "pairs.parquet").exists():  # a curate run / curated directory
            return local_records(path / "pairs.parquet")
        raise CurateError(f"{path} is a directory but neither a datasets save_to_disk dir nor a curate run")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _jsonl_records(path)
    if name.endswith((".json", ".json.gz")):
        return _json_records(path)
    if name.endswith(".parquet"):
        return _parquet_records(path)
    if name.endswith((".csv", ".csv.gz")):
        return _csv_records(path)
    raise CurateError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)} or a save_to_disk dir")
