"""The seams every stream job reads and writes through: `Source`, `DeadLetterSink`, and an in-memory source.

A `Source` is a resumable, ordered stream of event micro-batches. Lifecycle, as the streaming
worker (pipelines/worker.py) drives it:

    open(positions)        once. `positions` ({partition: next offset}) come from the job's own
                           durable state (a snapshot); None = from the beginning.
    poll_batch(timeout_s)  repeatedly: the next micro-batch in (timestamp, event_id) order, or
                           None when none is due within about `timeout_s` (the caller stays
                           responsive: time-based snapshots, stop requests).
    exhausted              True once a bounded source (a historical topic up to its end at open,
                           a table) has yielded every event; an unbounded source never is.
    positions()            between batches: per partition, the next offset after the last
                           *yielded* event. Events still held in a merge buffer or batcher are not
                           yielded, so the position stays at or before them. Persist positions
                           together with the state the yielded events produced; `open(positions)`
                           then resumes exactly: nothing lost, nothing repeated. Flushes the
                           dead-letter sink first, so persisted positions never pass a dead letter
                           that was not written.
    commit(positions)      optional, only after that state is durable: publishes the positions for
                           monitoring (a consumer group's lag). Never read back.
    lag()                  events between positions() and the end the source knows of, per
                           partition (monitoring; empty when it cannot tell).
    stats                  counters since open (`SourceStats`).
    last_batch_record_times_ms()  broker write times of the last batch's events, or None.
    stop()                 may be called from a signal handler or another thread: stop waiting for
                           data; the caller finishes its batch, persists and closes.
    close()                once, also after an error: flushes dead letters, releases connections.

Identity, for jobs that persist positions (callable before `open`):

    identity()             JSON-able description of what the source reads (for Kafka: the topic id
                           and the first record read per partition); persist it with the positions.
    verify_identity(stored)  why the source no longer reads what `stored` (an earlier identity())
                           described, e.g. a topic deleted and refilled under the same name: then
                           the stored positions point into other data. None when it is the same (or
                           it cannot tell); matching parts are kept in later identity() results.
    earliest_positions()   the first position still available per partition (above 0 once
                           retention deleted events: a restart "from the beginning" would skip them).

Implementations: `connectors.kafka.source.KafkaSource` (Kafka partitions, k-way merged by event
time) and `InMemorySource` below (tests, offline runs: no broker).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa

from felrec_stream.errors import DatasetError
from felrec_stream.stream.events import EventBatch
from felrec_stream.stream.messages import PoisonMessage


@dataclass
class SourceStats:
    """Counters a job reports: yielded events, dead letters, late and early-released events."""

    events: int = 0
    batches: int = 0
    poison: int = 0
    late: int = 0
    released_early: int = 0


@runtime_checkable
class Source(Protocol):
    """A resumable, ordered stream of event micro-batches (lifecycle in the module docstring)."""

    stats: SourceStats

    @property
    def exhausted(self) -> bool: ...

    def open(self, positions: Mapping[int, int] | None = None) -> "Source": ...

    def poll_batch(self, timeout_s: float = 0.1) -> EventBatch | None: ...

    def positions(self) -> dict[int, int]: ...

    def commit(self, positions: Mapping[int, int] | None = None) -> None: ...

    def lag(self) -> dict[int, int]: ...

    def last_batch_record_times_ms(self) -> np.ndarray | None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...

    def identity(self) -> dict[str, Any]: ...

    def verify_identity(self, stored: Mapping[str, Any]) -> str | None: ...

    def earliest_positions(self) -> dict[int, int]: ...


@runtime_checkable
class DeadLetterSink(Protocol):
    """Where poison messages go, so that nothing is dropped silently.

    `send()` per poison message (may be asynchronous); `flush()` before the caller persists or
    commits positions past those messages (raises when a dead letter could not be written);
    `close()` once. Delivery is at-least-once: a job that restarts from a position before a
    poison message sends it again.
    """

    def send(self, poison: PoisonMessage) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class InMemorySource:
    """A `Source` over events already in memory: one partition (0) whose offsets are row numbers.

    Batches are cut by count only (`batch_size` events, the last one shorter), so a run resumed
    from a position on the batch grid sees the same batches as an uninterrupted one. There are no
    poison messages (the events are already decoded) and no broker times. `first_offset` plays
    retention: the events before it are gone (never read, positions before it refused).
    """

    PARTITION = 0

    def __init__(self, events: pa.Table | EventBatch, batch_size: int = 1024, first_offset: int = 0) -> None:
        if batch_size < 1:
            raise DatasetError("batch_size must be >= 1")
        self._events = events if isinstance(events, EventBatch) else EventBatch.from_table(events)
        if not 0 <= first_offset <= len(self._events):
            raise DatasetError(f"first_offset {first_offset} is outside the {len(self._events)} events")
        self.batch_size = batch_size
        self.first_offset = first_offset
        self.stats = SourceStats()
        self.committed: dict[int, int] = {}  # the last commit() (monitoring only, as on Kafka)
        self.stopped = False
        self._next = first_offset
        self._open = False

    @property
    def exhausted(self) -> bool:
        return self._next >= len(self._events)

    def open(self, positions: Mapping[int, int] | None = None) -> "InMemorySource":
        start = dict(positions or {}).get(self.PARTITION, self.first_offset)
        if not self.first_offset <= start <= len(self._events):
            raise DatasetError(f"position {start} is outside the {len(self._events)} events of this source "
                               f"(available from {self.first_offset})")
        self._next, self._open = start, True
        return self

    def poll_batch(self, timeout_s: float = 0.1) -> EventBatch | None:
        if not self._open:
            raise DatasetError("source is not open: call open() first")
        if self.exhausted:
            return None
        end = min(self._next + self.batch_size, len(self._events))
        batch = self._events.take(slice(self._next, end))
        self._next = end
        self.stats.events += len(batch)
        self.stats.batches += 1
        return batch

    def positions(self) -> dict[int, int]:
        return {self.PARTITION: self._next}

    def commit(self, positions: Mapping[int, int] | None = None) -> None:
        self.committed = dict(self.positions() if positions is None else positions)

    def lag(self) -> dict[int, int]:
        return {self.PARTITION: len(self._events) - self._next}

    def last_batch_record_times_ms(self) -> np.ndarray | None:
        return None

    def stop(self) -> None:
        self.stopped = True  # nothing to wake up: poll_batch never waits

    def close(self) -> None:
        self._open = False

    def identity(self) -> dict[str, Any]:
        """The first event (its fields): another table under the same positions differs there."""
        return {"first_event": self._event(0) if len(self._events) else None}

    def verify_identity(self, stored: Mapping[str, Any]) -> str | None:
        first = stored.get("first_event")
        if first is None or (len(self._events) and list(first) == self._event(0)):
            return None
        return f"its first event is {self._event(0) if len(self._events) else None}, not {first}"

    def earliest_positions(self) -> dict[int, int]:
        return {self.PARTITION: self.first_offset}

    def _event(self, row: int) -> list[Any]:
        e = self._events
        return [str(e.user[row]), str(e.item[row]), int(e.timestamp[row]), int(e.event_id[row])]


class SkipDeadLetters:
    """A `DeadLetterSink` for a second reader of a topic (the online learner): the worker already
    dead-letters every poison message, so this one only counts the ones it skipped."""

    def __init__(self) -> None:
        self.skipped = 0

    def send(self, poison: PoisonMessage) -> None:
        self.skipped += 1

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
