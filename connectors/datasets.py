"""Dataset files -> the canonical event table (`felrec_stream.stream.events.EVENT_SCHEMA`).

Every loader keeps *every* data row (a rating of any value is an interaction), renders ids as
strings, sets `event_id` to the 0-based data row number (blank lines and the header do not count)
and returns the table stably sorted by (timestamp, event_id), i.e. timestamp ties keep file order.

Parsing is done by `pyarrow.csv` with explicit column types (ML-25M has 25M rows); quoted values
may not span lines (Arrow's fast default), so a physical line is a row and errors can name it. Only when
Arrow rejects a file do we look closer, on a slow path that never runs for good files: the file is
re-read as raw bytes to find the rows that do not convert, and scanned line by line to report their
1-based line numbers and text in a `DatasetError`.

`load_dataset` optionally caches the canonical table as Parquet, keyed by the dataset name, the
absolute path, size and mtime of the source file, and the loader options.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import os
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from felrec_stream.config import KafkaConfig
from felrec_stream.data import synthetic
from felrec_stream.errors import DatasetError
from felrec_stream.log import get_logger
from felrec_stream.stream.events import EVENT_SCHEMA, is_time_ordered, make_events, sort_events, validate_events
from felrec_stream.stream.messages import TS_UNITS, invalid_events, latest_timestamp

log = get_logger(__name__)

# the timestamp rule of the file being loaded: (unit, latest accepted ts or None), set by load_dataset
_TS_RULE: ContextVar[tuple[str, int | None] | None] = ContextVar("felrec_ts_rule", default=None)
MAX_REPORTED = 5  # malformed rows quoted in one error message
CACHE_VERSION = 1  # bump when the canonical table of some format changes
_INT = pa.int64()
_STR = pa.string()
_SEP = pa.null()  # the empty column between the two ':' of a '::' separator


# ---------------------------------------------------------------------------------------------
# Registry and entry points


@dataclass(frozen=True)
class _Format:
    loader: Callable[..., pa.Table]
    filename: str | None  # file looked up when the path is a folder; None = path must be a file
    takes_path: bool = True


def _registry() -> dict[str, _Format]:
    ml_dat = _Format(_load_movielens_dat, "ratings.dat")
    ml_csv = _Format(_load_movielens_csv, "ratings.csv")
    return {
        "ml-100k": _Format(_load_movielens_100k, "u.data"),
        "ml-1m": ml_dat,
        "ml-10m": ml_dat,
        "ml-20m": ml_csv,
        "ml-25m": ml_csv,
        "ml-latest": ml_csv,
        "twitch": _Format(_load_twitch, "100k_a.csv"),
        "csv": _Format(load_csv, None),
        "parquet": _Format(load_parquet, None),
        "synthetic": _Format(load_synthetic, None, takes_path=False),
    }


def dataset_names() -> list[str]:
    """Names accepted by `load_dataset`."""
    return sorted(_registry())


def dataset_label(name: str, path: str | Path | None) -> str:
    """What reports call the data: the dataset's name, or the file's for the generic formats (csv,
    parquet), whose name says nothing about the data."""
    fmt = _registry().get(name)
    if fmt is None or not fmt.takes_path or fmt.filename is not None or path is None:
        return name
    return Path(path).name


def load_dataset(name: str, path: str | Path | None = None, cache_dir: str | Path | None = None,
                 timestamp_unit: str = "s", future_skew_s: float = KafkaConfig.future_skew_s,
                 **options: Any) -> pa.Table:
    """Load dataset `name` from `path` (folder or file) as a canonical, time-ordered event table.

    Every row is held to the topic's rules (`_events_from`), timestamps included: in
    `timestamp_unit` (a topic's `kafka.timestamp_unit`, "s" by default; dataset option
    `timestamp_unit=ms` for a file of milliseconds), before the year 2200 and at most
    `future_skew_s` ahead of the clock (0: no limit), so what trains also replays and is consumed.
    With `cache_dir`, the table is cached as Parquet and reused while the source file (size,
    mtime), its absolute path and the options are unchanged; an unreadable cache file is rebuilt.
    """
    fmt = _registry().get(name)
    if fmt is None:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}")
    if timestamp_unit not in TS_UNITS:
        raise DatasetError(f"timestamp_unit must be one of {', '.join(TS_UNITS)}, got {timestamp_unit!r}")
    source = _source_file(name, fmt, path)
    _check_options(name, fmt.loader, options)
    started = time.perf_counter()
    rule = (timestamp_unit, latest_timestamp(timestamp_unit, float(future_skew_s)))
    cache_file = None if cache_dir is None else _cache_file(Path(cache_dir), name, source,
                                                           {**options, "timestamp_unit": timestamp_unit})
    table = _read_cache(cache_file)
    if table is not None and rule[1] is not None and len(table) and pc.max(table.column("timestamp")).as_py() > rule[1]:
        table = None  # cached under a later clock: the source file's check names the line
    cached = table is not None
    if table is None:
        token = _TS_RULE.set(rule)
        try:
            table = fmt.loader(source, **options) if fmt.takes_path else fmt.loader(**options)
        finally:
            _TS_RULE.reset(token)
        if cache_file is not None:
            write_events_file(table, cache_file)
    log.info("dataset_loaded", dataset=name, path=str(source) if source else None, rows=len(table),
             cached=cached, seconds=round(time.perf_counter() - started, 3))
    return table


def _source_file(name: str, fmt: _Format, path: str | Path | None) -> Path | None:
    if not fmt.takes_path:
        if path is not None:
            raise DatasetError(f"dataset {name!r} is generated and takes no path (got {path})")
        return None
    if path is None:
        raise DatasetError(f"dataset {name!r} needs a path")
    path = Path(path)
    if path.is_dir():
        if fmt.filename is None:
            raise DatasetError(f"dataset {name!r} needs a file, got the folder {path}")
        path = path / fmt.filename
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    return path


def _check_options(name: str, loader: Callable[..., pa.Table], options: Mapping[str, Any]) -> None:
    params = inspect.signature(loader).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    known = [p for p in params if p != "path" and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = sorted(set(options) - set(known))
    if unknown and not accepts_any:
        raise DatasetError(f"dataset {name!r} takes no option(s) {', '.join(unknown)}"
                           f"{'; known: ' + ', '.join(known) if known else ''}")


# ---------------------------------------------------------------------------------------------
# Canonical Parquet event files and the cache


def read_events_file(path: str | Path) -> pa.Table:
    """Read a canonical Parquet event file (sorted on the way in if it is not time-ordered)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"event file not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"cannot read event file {path}: {exc}") from exc
    missing = [n for n in EVENT_SCHEMA.names if n not in table.column_names]
    if missing:
        raise DatasetError(f"event file {path} lacks column(s) {missing}; has {table.column_names}")
    table = table.select(EVENT_SCHEMA.names).replace_schema_metadata(None)
    try:
        table = table.cast(EVENT_SCHEMA)
    except (pa.ArrowException, ValueError) as exc:
        raise DatasetError(f"event file {path} does not have the event schema: {exc}") from exc
    return table if is_time_ordered(table) else sort_events(table)


def write_events_file(table: pa.Table, path: str | Path) -> Path:
    """Write a canonical event table as Parquet, atomically (readers never see half a file)."""
    validate_events(table)
    if not is_time_ordered(table):
        table = sort_events(table)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _cache_file(cache_dir: Path, name: str, source: Path | None, options: Mapping[str, Any]) -> Path:
    key: dict[str, Any] = {"version": CACHE_VERSION, "name": name, "options": dict(options)}
    if source is not None:
        stat = source.stat()
        key.update(path=str(source.resolve()), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return cache_dir / f"{name}-{digest[:20]}.parquet"


def _read_cache(cache_file: Path | None) -> pa.Table | None:
    if cache_file is None or not cache_file.exists():
        return None
    try:
        return read_events_file(cache_file)
    except DatasetError as exc:
        log.warning("dataset_cache_rebuilt", path=str(cache_file), reason=str(exc))
        return None


# ---------------------------------------------------------------------------------------------
# The formats


def _load_movielens_100k(path: Path) -> pa.Table:
    """`u.data`: user <tab> item <tab> rating <tab> unix seconds, no header."""
    spec = _CsvSpec(delimiter="\t", quoting=False, names=("user", "item", "rating", "timestamp"),
                    types={"user": _INT, "item": _INT, "timestamp": _INT})
    return _events_from(_read_csv(path, spec), "user", "item", "timestamp", **_file_rows(path, spec))


def _load_movielens_dat(path: Path) -> pa.Table:
    """ML-1M/10M `ratings.dat`: user::item::rating::timestamp, read as ':'-separated with the
    empty columns between the two colons checked to be empty."""
    names = ("user", "sep1", "item", "sep2", "rating", "sep3", "timestamp")
    spec = _CsvSpec(delimiter=":", quoting=False, names=names, field_width=2,
                    types={"user": _INT, "sep1": _SEP, "item": _INT, "sep2": _SEP, "sep3": _SEP,
                           "timestamp": _INT})
    return _events_from(_read_csv(path, spec), "user", "item", "timestamp", **_file_rows(path, spec))


def _load_movielens_csv(path: Path) -> pa.Table:
    """ML-20M/25M/latest `ratings.csv` with header userId,movieId,rating,timestamp."""
    spec = _CsvSpec(types={"userId": _INT, "movieId": _INT, "timestamp": _INT})
    return _events_from(_read_csv(path, spec), "userId", "movieId", "timestamp", **_file_rows(path, spec))


def _load_twitch(path: Path) -> pa.Table:
    """Twitch `100k_a.csv`: user_id, stream_id, streamer_name, time_start, time_stop, no header.
    As in the paper, the item is the streamer and the time is the start of the watched slot."""
    spec = _CsvSpec(names=("user_id", "stream_id", "streamer_name", "time_start", "time_stop"),
                    types={"user_id": _INT, "streamer_name": _STR, "time_start": _INT})
    return _events_from(_read_csv(path, spec), "user_id", "streamer_name", "time_start", **_file_rows(path, spec))


def load_csv(path: Path, user: str | int = "user", item: str | int = "item",
             timestamp: str | int = "timestamp", event_id: str | int | None = None,
             delimiter: str = ",", header: bool | str = True) -> pa.Table:
    """Any delimited file. Columns are named by header name, or by 0-based position (needed when
    `header` is false). Ids are kept verbatim as strings; timestamp and event_id must be integers."""
    header = _as_bool(header, "header")
    if len(delimiter) != 1:
        raise DatasetError(f"csv delimiter must be one character, got {delimiter!r}")
    names = _header_names(path, delimiter, True, header)
    roles = {"user": user, "item": item, "timestamp": timestamp, "event_id": event_id}
    columns = {role: _column_name(path, names, ref, header) for role, ref in roles.items() if ref is not None}
    if len(set(columns.values())) != len(columns):
        raise DatasetError(f"{path}: user, item, timestamp and event_id must be different columns, got {columns}")
    types = {columns["user"]: _STR, columns["item"]: _STR, columns["timestamp"]: _INT}
    if "event_id" in columns:
        types[columns["event_id"]] = _INT
    spec = _CsvSpec(delimiter=delimiter, names=None if header else tuple(names), types=types)
    table = _read_csv(path, spec)
    return _events_from(table, columns["user"], columns["item"], columns["timestamp"], columns.get("event_id"),
                        **_file_rows(path, spec))


def load_parquet(path: Path, user: str = "user", item: str = "item", timestamp: str = "timestamp",
                 event_id: str | None = None) -> pa.Table:
    """Any Parquet file; ids may be integer or string columns; timestamp an integer column (or an
    Arrow timestamp, converted to seconds)."""
    try:
        schema = pq.read_schema(path)
        wanted = [c for c in (user, item, timestamp, event_id) if c is not None]
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {missing}; the file has {schema.names}")
        table = pq.read_table(path, columns=wanted)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"cannot read Parquet file {path}: {exc}") from exc
    ts = table.column(timestamp)
    if pa.types.is_timestamp(ts.type):
        table = table.set_column(table.column_names.index(timestamp), timestamp,
                                 pc.cast(pc.cast(ts, pa.timestamp("s"), safe=False), _INT))
    elif not pa.types.is_integer(ts.type):
        raise DatasetError(f"{path}: timestamp column {timestamp!r} must be integer, got {ts.type}")
    def where(rows: list[int]) -> list[tuple[int, str]]:
        return [(r, f"row {r} (0-based)") for r in rows]

    _raise_on_missing_values(path, table, where)
    return _events_from(table, user, item, timestamp, event_id, source=path, where=where)


def load_synthetic(**options: Any) -> pa.Table:
    """The seeded synthetic stream (`felrec_stream.data.synthetic`); options are `size` (a preset name)
    and any `SyntheticConfig` field."""
    return synthetic.generate(synthetic.config_from_options(**options)).events


def _events_from(table: pa.Table, user: str, item: str, timestamp: str, event_id: str | None = None, *,
                 source: Path, where: Callable[[list[int]], list[tuple[int, str]]]) -> pa.Table:
    """The canonical table, after the wire format's rules (`invalid_events`): a file that a topic
    would reject fails here, naming its lines (`where` labels 0-based data rows)."""
    if len(table) == 0:
        raise DatasetError(f"{source} has no data rows")
    ids = None if event_id is None else table.column(event_id)
    events = make_events(table.column(user), table.column(item), table.column(timestamp), ids, sort=False)
    unit, not_after = _TS_RULE.get(None) or ("s", latest_timestamp("s"))
    problems = invalid_events(events, ts_unit=unit, limit=MAX_REPORTED, not_after=not_after)
    if problems:
        labels = dict(where(sorted({row for row, _ in problems})))
        raise DatasetError(f"{source}: invalid event(s): "
                           + "; ".join(f"{labels[row]}: {why}" for row, why in problems))
    return sort_events(events)


def _as_bool(value: bool | str, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return text in ("1", "true", "yes", "on")
    raise DatasetError(f"csv option {name} must be a boolean, got {value!r}")


def _column_name(path: Path, names: list[str], ref: str | int, header: bool) -> str:
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit() and not header):
        index = int(ref)
        if not 0 <= index < len(names):
            raise DatasetError(f"{path}: column position {index} out of range; the file has {len(names)} columns")
        return names[index]
    if not header:
        raise DatasetError(f"{path} has no header: name columns by 0-based position, not {ref!r}")
    if ref not in names:
        raise DatasetError(f"{path}: missing column {ref!r}; the header has {names}")
    return ref


# ---------------------------------------------------------------------------------------------
# CSV reading with precise errors


@dataclass(frozen=True)
class _CsvSpec:
    """How to read one delimited layout. `names` fixes a header-less layout (every row must have
    that many columns); None means the first non-blank line is the header."""

    types: Mapping[str, pa.DataType]  # the columns to read, with their types
    delimiter: str = ","
    quoting: bool = True
    names: tuple[str, ...] | None = None
    field_width: int = 1  # raw columns per field: 2 for '::' read as ':'


def _file_rows(path: Path, spec: _CsvSpec) -> dict[str, Any]:
    """`_events_from`'s source and row labeller for a delimited file ("line N: <text>")."""
    return {"source": path, "where": lambda rows: _lines_of_rows(path, spec, rows)}


def _read_csv(path: Path, spec: "_CsvSpec") -> pa.Table:
    """Read the typed columns of a delimited file; every malformed row becomes a DatasetError."""
    names = list(spec.names) if spec.names else _header_names(path, spec.delimiter, spec.quoting, True)
    _first_data_line(path, spec)  # raises on an empty file
    missing = [c for c in spec.types if c not in names]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; the header has {names}")
    try:
        table = _arrow_read(path, spec, spec.types)
    except pa.ArrowInvalid as exc:
        raise _diagnose(path, spec, names, exc) from None
    _raise_on_missing_values(path, table, lambda rows: _lines_of_rows(path, spec, rows))
    return table


def _arrow_read(path: Path, spec: _CsvSpec, types: Mapping[str, pa.DataType]) -> pa.Table:
    read = pacsv.ReadOptions(column_names=list(spec.names) if spec.names else None)
    parse = pacsv.ParseOptions(delimiter=spec.delimiter, quote_char='"' if spec.quoting else False)
    convert = pacsv.ConvertOptions(column_types=dict(types), include_columns=list(types),
                                   null_values=[""], strings_can_be_null=False, quoted_strings_can_be_null=False)
    return pacsv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)


def _header_names(path: Path, delimiter: str, quoting: bool, header: bool) -> list[str]:
    """Column names from the header line, or f0, f1, ... sized by the first line when header-less."""
    lineno, line = _first_nonblank_line(path)
    try:
        text = line.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: line {lineno} is not valid UTF-8: {_show(line)}") from None
    fields = _split(text, delimiter, quoting)
    return fields if header else [f"f{i}" for i in range(len(fields))]


def _first_nonblank_line(path: Path) -> tuple[int, bytes]:
    if path.stat().st_size == 0:
        raise DatasetError(f"{path} is empty")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.rstrip(b"\r\n"):
                return lineno, raw.rstrip(b"\r\n")
    raise DatasetError(f"{path} is empty (blank lines only)")


def _first_data_line(path: Path, spec: _CsvSpec) -> None:
    for _ in _data_lines(path, spec.names is None):
        return
    raise DatasetError(f"{path} has no data rows")


def _split(text: str, delimiter: str, quoting: bool) -> list[str]:
    if not quoting:
        return text.split(delimiter)
    return next(csv.reader([text], delimiter=delimiter), [""])


def _data_lines(path: Path, header: bool) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes) of every data row, counted as Arrow counts rows: blank lines
    and the header (the first non-blank line) are skipped."""
    with open(path, "rb") as f:
        skip = header
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip(b"\r\n")
            if not line:
                continue
            if skip:
                skip = False
                continue
            yield lineno, line


def _lines_of_rows(path: Path, spec: _CsvSpec, rows: list[int]) -> list[tuple[int, str]]:
    """'line N: <text>' labels for 0-based data rows (slow path: one scan up to the last row)."""
    wanted, found = set(rows), {}
    for row, (lineno, line) in enumerate(_data_lines(path, spec.names is None)):
        if row in wanted:
            found[row] = f"line {lineno}: {_show(line)}"
            if len(found) == len(wanted):
                break
    return [(row, found.get(row, f"data row {row}")) for row in rows]


def _show(line: bytes, limit: int = 200) -> str:
    text = line.decode("utf-8", errors="backslashreplace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _diagnose(path: Path, spec: _CsvSpec, names: list[str], exc: pa.ArrowInvalid) -> DatasetError:
    """Turn an Arrow parse/convert failure into an error naming the offending lines."""
    try:
        raw = _arrow_read(path, spec, {c: pa.binary() for c in spec.types})
    except pa.ArrowInvalid:
        return _column_count_error(path, spec, len(names), exc)
    problems: list[tuple[int, str]] = []
    for column, kind in spec.types.items():
        check = _CONVERTERS[kind]
        values = raw.column(column)
        for row in _failing_rows(values.combine_chunks(), check[0]):
            value = values[row].as_py() or b""
            problems.append((row, f"{column} {check[1]} ({_show(value)})" if value else f"{column} is empty"))
    if not problems:
        return DatasetError(f"cannot parse {path}: {exc}")
    problems = sorted(problems)[:MAX_REPORTED]
    lines = dict(_lines_of_rows(path, spec, sorted({row for row, _ in problems})))
    details = "; ".join(f"{lines[row]}: {why}" for row, why in problems)
    return DatasetError(f"{path}: malformed row(s): {details}")


def _column_count_error(path: Path, spec: _CsvSpec, expected: int, exc: Exception) -> DatasetError:
    width, shown = spec.field_width, spec.delimiter * spec.field_width
    bad = []
    for lineno, line in _data_lines(path, spec.names is None):
        text = line.decode("utf-8", errors="surrogateescape")
        count = len(_split(text, spec.delimiter, spec.quoting))
        if count != expected:
            got = (count + width - 1) // width
            bad.append(f"line {lineno}: expected {(expected + width - 1) // width} fields separated by "
                       f"{shown!r}, got {got}: {_show(line)}")
            if len(bad) == MAX_REPORTED:
                break
    if not bad:
        return DatasetError(f"cannot parse {path}: {exc}")
    return DatasetError(f"{path}: wrong number of columns: " + "; ".join(bad))


class _Rejected(Exception):
    pass


def _must_be_empty(values: pa.Array) -> None:
    if len(values) and pc.max(pc.binary_length(values)).as_py():
        raise _Rejected


_CONVERTERS: dict[pa.DataType, tuple[Callable[[pa.Array], Any], str]] = {
    _STR: (lambda a: pc.cast(a, _STR), "is not valid UTF-8"),
    _INT: (lambda a: pc.cast(pc.utf8_trim(pc.cast(a, _STR), " \t"), _INT), "is not an integer"),
    _SEP: (_must_be_empty, "is not empty (fields must be separated by '::')"),
}


def _failing_rows(values: pa.Array, convert: Callable[[pa.Array], Any]) -> list[int]:
    """The first MAX_REPORTED positions whose values `convert` rejects, found by bisection."""
    bad: list[int] = []

    def visit(start: int, length: int) -> None:
        if len(bad) >= MAX_REPORTED or length == 0:
            return
        try:
            convert(values.slice(start, length))
            return
        except (pa.ArrowInvalid, _Rejected):
            pass
        if length == 1:
            bad.append(start)
            return
        half = length // 2
        visit(start, half)
        visit(start + half, length - half)

    visit(0, len(values))
    return bad


def _raise_on_missing_values(path: Path, table: pa.Table,
                             where: Callable[[list[int]], list[tuple[int, str]]]) -> None:
    """Empty ids/timestamps are errors (never silently dropped); `where` labels the rows."""
    problems: list[tuple[int, str]] = []
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_null(column.type):
            continue
        missing = pc.is_null(column)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            missing = pc.or_kleene(missing, pc.equal(pc.utf8_length(column), 0))
        if pc.any(missing).as_py():
            rows = np.flatnonzero(missing.to_numpy(zero_copy_only=False))[:MAX_REPORTED]
            problems += [(int(r), name) for r in rows]
    if problems:
        problems = sorted(problems)[:MAX_REPORTED]
        labels = dict(where(sorted({row for row, _ in problems})))
        details = "; ".join(f"{labels[row]}: empty {name!r}" for row, name in problems)
        raise DatasetError(f"{path}: missing value(s): {details}")
