"""The wire format of interaction events on Kafka, and what to do with messages that break it.

Format (version 1): a UTF-8 JSON object, keyed by the user id (UTF-8 bytes) so that all events of
one user land in one partition and stay in order::

    {"v": 1, "user": "u42", "item": "i7", "ts": 1700000000, "event_id": 12}

- `user`, `item`: non-empty strings of at most `MAX_ID_CHARS` characters, no control characters,
  not whitespace-only (leading/trailing spaces are kept as they are: ids are opaque). Numbers are
  rejected rather than stringified, so that `1` and `"1"` never silently meet.
- `ts`: event time, a non-negative integer in the topic's unit (seconds by default; see
  `TS_UNITS`), below the year 2200 in that unit. A float is accepted only when it is integral
  (`1.7e9` from a JSON library that writes floats); `true`/`false` are rejected.
- `event_id` (optional): a non-negative integer below `DERIVED_EVENT_ID_BASE`; it breaks timestamp
  ties and identifies the event across replays. When it is absent, the consumer derives one from
  the message's position: `DERIVED_EVENT_ID_BASE | partition << 40 | offset`. That id is
  deterministic (re-reading the same topic gives the same ids, so ordering and replays are
  stable), unique within a topic, and never collides with explicit ids (they must stay below
  2**62).
- Extra fields are allowed and ignored (producers may add metadata without a version bump);
  duplicate keys, NaN/Infinity, a byte-order mark and lone surrogates are rejected.
- The key, when present, must equal the user id: a producer keying by something else breaks the
  per-user ordering that partitioning by user provides.

- `ts` more than `KafkaConfig.future_skew_s` ahead of the consumer's wall clock (`not_after`) is
  rejected: one event from the far future would make every later event "late" in follow mode.

Files are held to the same rules before they reach a topic or a model: `invalid_events` applies
`decode_event`'s id and integer checks to a whole event table (connectors/datasets.py runs it on
every file it loads, replay runs it with the topic's timestamp unit; both with the consumer's
clock limit, `latest_timestamp`), so `train`, `replay` and `consume` accept and reject the same events.

Bad messages are data, not exceptions: `decode_event` returns a `PoisonMessage` that says which
field is wrong and how, carries the raw bytes and the source position, and goes to the
dead-letter topic. This module is pure (no Kafka import) so it can be tested and reused anywhere.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from felrec_stream.errors import DatasetError
from felrec_stream.stream.events import EventBatch

SCHEMA_VERSION = 1
MAX_ID_CHARS = 256
DERIVED_EVENT_ID_BASE = 1 << 62
MAX_PARTITION_FOR_DERIVED_ID = (1 << 22) - 1
MAX_OFFSET_FOR_DERIVED_ID = (1 << 40) - 1
# Seconds from the epoch to 2200-01-01T00:00:00Z; timestamps beyond that are data errors
# (typically milliseconds sent to a topic that expects seconds).
_YEAR_2200_S = 7_258_118_400
TS_UNITS: Mapping[str, int] = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_MAX_EXACT_FLOAT = 2**53
_BOM = b"\xef\xbb\xbf"
# C0/C1 control characters and lone surrogates (json.loads accepts "\\ud800"; UTF-8 cannot hold it).
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)  # reused: hot path
_BAD_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Event:
    """One decoded interaction; `partition`/`offset` say where it was read (-1 when not from Kafka)."""

    user: str
    item: str
    ts: int
    event_id: int | None
    partition: int = -1
    offset: int = -1

    @property
    def order_key(self) -> tuple[int, int]:
        """(ts, event_id): the total order of the canonical event table."""
        return (self.ts, -1 if self.event_id is None else self.event_id)


@dataclass(frozen=True, slots=True)
class PoisonMessage:
    """A message that cannot become an event: the reason is exact and the raw bytes are kept."""

    kind: str  # machine-readable category, e.g. "wrong_type", "missing_field", "not_json"
    field: str | None  # the offending field, None when the whole message is wrong
    reason: str  # human-readable: which field and what is wrong with it
    raw: bytes | None  # the value bytes as received (None for a tombstone)
    key: bytes | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None


def derive_event_id(partition: int, offset: int) -> int:
    """Deterministic event id from the message position (used when a message carries none)."""
    if not (0 <= partition <= MAX_PARTITION_FOR_DERIVED_ID and 0 <= offset <= MAX_OFFSET_FOR_DERIVED_ID):
        raise ValueError(f"cannot derive an event id from partition={partition} offset={offset}")
    return DERIVED_EVENT_ID_BASE | (partition << 40) | offset


def max_timestamp(unit: str = "s") -> int:
    """Largest accepted `ts` for a unit: 2200-01-01 expressed in that unit."""
    if unit not in TS_UNITS:
        raise ValueError(f"unknown timestamp unit {unit!r}; known: {', '.join(TS_UNITS)}")
    return _YEAR_2200_S * TS_UNITS[unit]


class _Invalid(Exception):
    """Internal: one validation failure (kind, field, reason); never escapes this module."""

    def __init__(self, kind: str, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.field, self.reason = kind, field, reason


def encode_event(user: str, item: str, ts: int, event_id: int | None = None, *,
                 ts_unit: str = "s", max_bytes: int | None = None) -> tuple[bytes, bytes]:
    """(key, value) bytes of one event; raises DatasetError for an event a consumer would reject."""
    try:
        _check_id("user", user)
        _check_id("item", item)
        ts = _check_int("ts", ts, max_timestamp(ts_unit))
        body: dict[str, Any] = {"v": SCHEMA_VERSION, "user": user, "item": item, "ts": ts}
        if event_id is not None:
            body["event_id"] = _check_int("event_id", event_id, DERIVED_EVENT_ID_BASE - 1)
    except _Invalid as exc:
        raise DatasetError(f"event cannot be encoded: {exc.reason}") from None
    value = _ENCODER.encode(body).encode("utf-8")
    if max_bytes is not None and len(value) > max_bytes:
        raise DatasetError(f"event cannot be encoded: {len(value)} bytes > max_message_bytes={max_bytes}")
    return user.encode("utf-8"), value


def decode_event(raw: bytes | None, max_bytes: int = 65536, *, key: bytes | None = None,
                 topic: str | None = None, partition: int | None = None, offset: int | None = None,
                 ts_unit: str = "s", not_after: int | None = None) -> Event | PoisonMessage:
    """Validate one message value; never raises for bad input (it becomes a PoisonMessage).

    `not_after`: the latest accepted `ts` (the consumer's clock plus its allowed skew), None = any.
    """
    try:
        body = _parse(raw, max_bytes)
        user, item, ts, event_id = _fields(body, ts_unit)
        _check_not_after(ts, not_after)
        if key is not None and key != user.encode("utf-8"):
            raise _Invalid("key_mismatch", "key",
                           f"message 'key' {key[:64]!r} differs from field 'user' {user[:64]!r}: "
                           "producers must key by user id")
    except _Invalid as exc:
        return PoisonMessage(exc.kind, exc.field, exc.reason, raw, key, topic, partition, offset)
    if event_id is None and partition is not None and offset is not None:
        event_id = derive_event_id(partition, offset)
    return Event(user, item, ts, event_id,
                 -1 if partition is None else partition, -1 if offset is None else offset)


def _parse(raw: bytes | None, max_bytes: int) -> dict[str, Any]:
    """Bytes -> JSON object, with the size/encoding/syntax checks a JSON library would skip."""
    if raw is None:
        raise _Invalid("tombstone", None, "tombstone: message value is null (deletes are not events)")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise _Invalid("not_bytes", None, f"message value must be bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if len(raw) == 0:
        raise _Invalid("empty", None, "empty message value")
    if len(raw) > max_bytes:
        raise _Invalid("oversized", None, f"message is {len(raw)} bytes > max_message_bytes={max_bytes}")
    if raw.startswith(_BOM):
        raise _Invalid("bom", None, "message starts with a UTF-8 byte-order mark (JSON forbids it)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Invalid("not_utf8", None, f"value is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        body = _DECODER.decode(text)
    except _Invalid:
        raise
    except (ValueError, RecursionError) as exc:
        raise _Invalid("not_json", None, f"value is not JSON: {str(exc)[:120]}") from None
    if not isinstance(body, dict):
        raise _Invalid("not_object", None, f"JSON value must be an object, got {_json_type(body)}")
    return body


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects with a repeated key are ambiguous (which one wins differs between libraries)."""
    out = dict(pairs)
    if len(out) != len(pairs):  # rare: find the first repeated name for the reason
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _Invalid("duplicate_key", name, f"field {name!r} appears more than once")
            seen.add(name)
    return out


def _no_constants(name: str) -> Any:
    raise _Invalid("non_finite", None, f"{name} is not valid JSON (numbers must be finite)")


def _fields(body: Mapping[str, Any], ts_unit: str) -> tuple[str, str, int, int | None]:
    """Check the version, then each known field; extra fields are ignored on purpose."""
    if "v" not in body:
        raise _Invalid("missing_field", "v", "field 'v' (schema version) is missing")
    version = body["v"]
    if type(version) is not int:
        raise _Invalid("wrong_type", "v", f"field 'v' must be an integer, got {_json_type(version)}")
    if version != SCHEMA_VERSION:
        raise _Invalid("unknown_version", "v",
                       f"field 'v': schema version {version} is not supported (expected {SCHEMA_VERSION})")
    for name in ("user", "item", "ts"):
        if name not in body:
            raise _Invalid("missing_field", name, f"field {name!r} is missing")
    user = _check_id("user", body["user"])
    item = _check_id("item", body["item"])
    ts = _check_int("ts", body["ts"], max_timestamp(ts_unit), unit=ts_unit)
    event_id = _check_int("event_id", body["event_id"], DERIVED_EVENT_ID_BASE - 1) if "event_id" in body else None
    return user, item, ts, event_id


def _check_not_after(ts: int, not_after: int | None) -> None:
    if not_after is not None and ts > not_after:
        raise _Invalid("future_timestamp", "ts", f"field 'ts' = {ts} is ahead of the consumer's clock by more "
                       f"than kafka.future_skew_s (latest accepted: {not_after})")


def latest_timestamp(ts_unit: str = "s", future_skew_s: float = 86400.0, now: float | None = None) -> int | None:
    """The latest `ts` a consumer accepts now (`not_after`): its wall clock plus `future_skew_s`, in
    `ts_unit`; None when the skew is 0 (no limit). The consumer, `replay` and every file loader use it."""
    if not future_skew_s:
        return None
    return int(((time.time() if now is None else now) + future_skew_s) * TS_UNITS[ts_unit])


def id_problem(value: Any) -> str | None:
    """Why `value` cannot be a user or item id of a topic (a short reason that never quotes it), or None."""
    try:
        _check_id("id", value)
    except _Invalid as exc:
        return exc.reason
    return None


def _check_id(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid("wrong_type", name, f"field {name!r} must be a string, got {_json_type(value)}")
    if not value or value.isspace():
        raise _Invalid("empty_id", name, f"field {name!r} is empty or whitespace-only")
    if len(value) > MAX_ID_CHARS:
        raise _Invalid("id_too_long", name, f"field {name!r} has {len(value)} characters > {MAX_ID_CHARS}")
    bad = _BAD_CHARS.search(value)
    if bad is not None:
        char, position = bad.group(), bad.start()
        if "\ud800" <= char <= "\udfff":
            raise _Invalid("invalid_unicode", name, f"field {name!r} has a lone surrogate at {position}")
        raise _Invalid("control_char", name, f"field {name!r} has control character {char!r} at {position}")
    return value


def _check_int(name: str, value: Any, maximum: int, unit: str | None = None) -> int:
    """A non-negative integer <= maximum; integral floats are accepted (some JSON writers emit them)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer)):
        raise _Invalid("wrong_type", name, f"field {name!r} must be an integer, got {_json_type(value)}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Invalid("non_finite", name, f"field {name!r} is {value}")
        if not value.is_integer() or abs(value) > _MAX_EXACT_FLOAT:
            raise _Invalid("wrong_type", name, f"field {name!r} must be an integer, got float {value!r}")
    value = int(value)
    if value < 0:
        raise _Invalid(f"negative_{name}", name, f"field {name!r} is negative ({value})")
    if value > maximum:
        what = f"after the year 2200 in unit {unit!r}" if unit else f"above {maximum}"
        raise _Invalid("out_of_range", name, f"field {name!r} = {value} is {what}")
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)  # reused: hot path


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, float):
        return f"float {value!r}"
    return {dict: "object", list: "array", str: "string", int: "integer"}.get(type(value), type(value).__name__)


def invalid_events(table: pa.Table, ts_unit: str | None = "s", limit: int = 5,
                   not_after: int | None = None) -> list[tuple[int, str]]:
    """(row, reason) of the first `limit` rows of an event table that a consumer would dead-letter.

    The rules of `decode_event` (`_check_id` for user/item, `_check_int` for timestamp and
    event_id, `not_after` as the consumer's clock limit: `latest_timestamp`), so a file is valid
    for training and for a topic alike. `ts_unit` bounds timestamps by the year 2200 in that unit;
    None uses the widest, "ns". Ids are checked once per distinct value; numbers are checked vectorised.
    """
    problems: list[tuple[int, str]] = []
    for name in ("user", "item"):
        column = table.column(name)
        bad = {}
        for value in pc.unique(column).to_pylist():
            try:
                _check_id(name, value)
            except _Invalid as exc:
                bad[value] = exc.reason
        if bad:
            mask = pc.is_in(column, value_set=pa.array(list(bad), column.type)).to_numpy(zero_copy_only=False)
            problems += [(int(r), bad[column[int(r)].as_py()]) for r in np.flatnonzero(mask)[:limit]]
    for name, column, top, unit in (("ts", "timestamp", max_timestamp(ts_unit or "ns"), ts_unit),
                                    ("event_id", "event_id", DERIVED_EVENT_ID_BASE - 1, None)):
        values = table.column(column).to_numpy()
        for row in np.flatnonzero((values < 0) | (values > top))[:limit]:
            try:
                _check_int(name, int(values[row]), top, unit=unit)
            except _Invalid as exc:
                problems.append((int(row), exc.reason))
    if not_after is not None:
        ts = table.column("timestamp").to_numpy()
        for row in np.flatnonzero((ts > not_after) & (ts <= max_timestamp(ts_unit or "ns")))[:limit]:
            try:
                _check_not_after(int(ts[row]), not_after)
            except _Invalid as exc:
                problems.append((int(row), exc.reason))
    return sorted(problems)[:limit]


def events_to_batch(events: Sequence[Event]) -> EventBatch:
    """Columnar micro-batch of decoded events (every event must carry an event id)."""
    n = len(events)
    user = np.empty(n, dtype=object)
    item = np.empty(n, dtype=object)
    user[:] = [e.user for e in events]
    item[:] = [e.item for e in events]
    timestamp = np.fromiter((e.ts for e in events), dtype=np.int64, count=n)
    event_id = np.fromiter((e.event_id for e in events), dtype=np.int64, count=n)
    return EventBatch(user=user, item=item, timestamp=timestamp, event_id=event_id)
