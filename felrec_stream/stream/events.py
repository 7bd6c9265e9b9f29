"""The canonical interaction-event table and the micro-batches cut from it.

Every source (dataset file, synthetic generator, Kafka topic) ends up as an Arrow table with
`EVENT_SCHEMA`: string ids (ints are rendered as decimal strings), an int64 timestamp in the
dataset's own unit (seconds for MovieLens), and an int64 `event_id` that breaks timestamp ties.
Tables are stably sorted by (timestamp, event_id); `event_id` defaults to the original row order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from felrec_stream.errors import DatasetError

EVENT_SCHEMA = pa.schema(
    [
        pa.field("user", pa.string(), nullable=False),
        pa.field("item", pa.string(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),
        pa.field("event_id", pa.int64(), nullable=False),
    ]
)


@dataclass(frozen=True)
class EventBatch:
    """A time-ordered micro-batch of events (numpy columns; ids are Python str objects)."""

    user: np.ndarray  # (B,) object[str]
    item: np.ndarray  # (B,) object[str]
    timestamp: np.ndarray  # (B,) int64
    event_id: np.ndarray  # (B,) int64

    def __len__(self) -> int:
        return len(self.user)

    @classmethod
    def empty(cls) -> "EventBatch":
        return cls(np.empty(0, dtype=object), np.empty(0, dtype=object), np.empty(0, dtype=np.int64),
                   np.empty(0, dtype=np.int64))

    @classmethod
    def from_table(cls, table: pa.Table) -> "EventBatch":
        return cls(
            user=np.asarray(table.column("user").to_pylist(), dtype=object),
            item=np.asarray(table.column("item").to_pylist(), dtype=object),
            timestamp=table.column("timestamp").to_numpy().astype(np.int64, copy=False),
            event_id=table.column("event_id").to_numpy().astype(np.int64, copy=False),
        )

    def to_table(self) -> pa.Table:
        return pa.table(
            {"user": list(self.user), "item": list(self.item),
             "timestamp": self.timestamp, "event_id": self.event_id},
            schema=EVENT_SCHEMA,
        )

    def take(self, index: np.ndarray | slice) -> "EventBatch":
        return EventBatch(self.user[index], self.item[index], self.timestamp[index], self.event_id[index])


def make_events(user: Sequence, item: Sequence, timestamp: Sequence, event_id: Sequence | None = None,
                sort: bool = True) -> pa.Table:
    """Build a canonical event table from columns, sorted unless `sort=False` (rows stay in input
    order, e.g. to report file lines); ids may be ints or strings."""
    n = len(user)
    if not (len(item) == n and len(timestamp) == n):
        raise DatasetError(f"event columns differ in length: user={n} item={len(item)} timestamp={len(timestamp)}")
    if event_id is None:
        event_id = np.arange(n, dtype=np.int64)
    table = pa.table(
        {
            "user": _as_string_ids(user, "user"),
            "item": _as_string_ids(item, "item"),
            "timestamp": pa.array(np.asarray(timestamp, dtype=np.int64)),
            "event_id": pa.array(np.asarray(event_id, dtype=np.int64)),
        }
    )
    table = table.cast(EVENT_SCHEMA)
    return sort_events(table) if sort else table


def _as_string_ids(values: Sequence, name: str) -> pa.Array:
    array = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    if pa.types.is_integer(array.type):
        array = pc.cast(array, pa.string())
    elif not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        raise DatasetError(f"{name} ids must be integers or strings, got {array.type}")
    if array.null_count:
        raise DatasetError(f"{array.null_count} {name} id(s) are missing")
    if len(array) and pc.any(pc.equal(pc.utf8_length(array), 0)).as_py():
        raise DatasetError(f"{name} ids must not be empty strings")
    return array


def sort_events(table: pa.Table) -> pa.Table:
    """Stable sort by (timestamp, event_id); duplicates of event_id are rejected."""
    validate_events(table)
    if len(table) and pc.count_distinct(table.column("event_id")).as_py() != len(table):
        raise DatasetError("event_id values must be unique")
    return table.sort_by([("timestamp", "ascending"), ("event_id", "ascending")])


def validate_events(table: pa.Table) -> None:
    if not table.schema.equals(EVENT_SCHEMA, check_metadata=False):
        missing = [f.name for f in EVENT_SCHEMA if f.name not in table.column_names]
        raise DatasetError(
            f"event table must have columns {EVENT_SCHEMA.names} with types "
            f"(string, string, int64, int64); missing={missing}, got schema {table.schema}"
        )
    for name in EVENT_SCHEMA.names:
        if table.column(name).null_count:
            raise DatasetError(f"event column {name!r} has {table.column(name).null_count} null value(s)")


def is_time_ordered(table: pa.Table) -> bool:
    ts = table.column("timestamp").to_numpy()
    ids = table.column("event_id").to_numpy()
    if len(ts) < 2:
        return True
    dt = np.diff(ts)
    return bool(np.all((dt > 0) | ((dt == 0) & (np.diff(ids) > 0))))


def iter_batches(table: pa.Table, batch_size: int) -> Iterator[EventBatch]:
    """Consecutive micro-batches in table order (the table must already be time-ordered)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    for start in range(0, len(table), batch_size):
        yield EventBatch.from_table(table.slice(start, batch_size))
