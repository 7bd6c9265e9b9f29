"""Ordered event source over Kafka partitions: decode, dead-letter, merge by event time, micro-batch.

`KafkaSource` implements `felrec_stream.stream.source.Source` (lifecycle documented there):
    open(positions=None)       assign partitions explicitly (no group rebalancing: the job owns its
                               position) and seek to `positions` or to the beginning
    poll_batch() / batches()   EventBatch micro-batches in (timestamp, event_id) order
    positions()                per-partition next offsets after the last *yielded* event; persist
                               them with your state, then `open(positions)` resumes exactly
    commit()                   optional, for monitoring only: commits positions to a consumer group;
                               call it after your own state is durable
    close()

Ordering: each partition is read as a FIFO (offset order) and partitions are k-way merged by
(timestamp, event_id). An event is released when every partition that can still deliver data has
a queued head (then the merge is exact), or - in follow mode only - when more than
`KafkaConfig.reorder_window` events are held back or the oldest held event waited `max_delay_s`
(a partition is idle). An event that sorts before one already released is emitted anyway and
counted as `late`; nothing is dropped. In `until_end` mode (historical replay) the merge never
releases early, so the output is the exact (timestamp, event_id) order whenever each partition is
itself time-ordered, as `replay_events` writes it. Partitions with long queues are paused so the
consumer fetches the partitions the merge waits for; memory stays around the reorder window.

Why per-partition FIFO instead of one global re-sorting heap: positions. Because every partition
is emitted in offset order, "next offset after the last yielded event" is exact: an event still
held in the merge buffer or in the batcher is not yielded, so the position stays at or before
it, and a restart from saved positions neither loses nor repeats an event.

End of a historical topic: `max(ListOffsets latest, fetch high watermark)` captured at open
(Tansu's ListOffsets latest is wrong); records at or beyond it are not read.

Poison messages go to the dead-letter sink (counted, logged), never stop the source;
`positions()` flushes the sink first, so persisted positions never skip an unwritten dead letter.
Events more than `KafkaConfig.future_skew_s` ahead of the wall clock are poison too: one event
from the far future would otherwise make every later event "late" in follow mode.

Identity (`identity()`, `verify_identity()`): the topic id and the first record read per partition
(connectors/kafka/identity.py), so a snapshot is never resumed on a recreated topic of the same name.

Broker outages: kafka-python reconnects by itself; when no records came for
`request_timeout_ms`, the source checks that the broker is reachable. An unreachable broker is
waited for, with growing intervals and everything in memory kept, for `KafkaConfig.outage_timeout_s`
before the source fails. The first records after such a check (stall or outage) are decoded only
once the topic's identity is verified again: a broker that restarted without its data may hold a
recreated topic of the same name, and the source then fails instead of reading it at old offsets.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from connectors.kafka.admin import TopicAdmin, beginning_offsets, end_offsets, kafka_errors, new_consumer
from connectors.kafka.broker import tcp_reachable
from connectors.kafka.dlq import KafkaDeadLetters, MemoryDeadLetters
from connectors.kafka.identity import Anchor, check_identity, record_anchor
from felrec_stream.config import KafkaConfig
from felrec_stream.errors import DatasetError, KafkaError
from felrec_stream.log import get_logger
from felrec_stream.stream.batcher import MicroBatcher
from felrec_stream.stream.events import EVENT_SCHEMA, EventBatch, sort_events
from felrec_stream.stream.merger import PartitionMerger
from felrec_stream.stream.messages import (Event, PoisonMessage, decode_event, events_to_batch,
                                           latest_timestamp)
from felrec_stream.stream.source import DeadLetterSink, SourceStats

log = get_logger(__name__)

_MIN_PARTITION_CAP = 256  # queued events per partition before it may be paused
_POISON_LOG_LIMIT = 100  # individual poison log lines; the dead-letter topic has all of them
_OUTAGE_CHECK_MAX_S = 30.0  # longest interval between reachability checks during an outage
# kafka-python 3.0.12 bug (KAFKA-7548 port): records of a partition that is paused while a poll
# has drained only part of them are parked and never handed back after resume(), and the parked
# partition is never fetched again: the source would stall. With an unbounded max_poll_records
# every poll drains all fetched records, so nothing is ever parked; fetch sizes bound memory.
# read_committed: records of aborted transactions are never events (Tansu ignores it, harmlessly).
_FETCH_SETTINGS = {"max_poll_records": 2**31 - 1, "max_partition_fetch_bytes": 1 << 20, "fetch_max_bytes": 8 << 20,
                   "isolation_level": "read_committed"}


class KafkaSource:
    """Ordered, resumable micro-batches from one topic (all or some partitions); see module docstring."""

    def __init__(self, kafka_config: KafkaConfig, topic: str | None = None, *,
                 partitions: Sequence[int] | None = None, until_end: bool = True, batch_size: int = 1024,
                 max_wait_s: float = 0.05, max_delay_s: float = 1.0, group_id: str | None = None,
                 dead_letters: DeadLetterSink | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.kafka_config = kafka_config
        self.topic = topic or kafka_config.topic
        self.until_end = until_end
        self.group_id = group_id
        self.max_delay_s = max_delay_s
        self.stats = SourceStats()
        self._wanted = list(partitions) if partitions is not None else None
        self._clock = clock
        self._batcher: MicroBatcher[Event] = MicroBatcher(batch_size, max_wait_s, clock)
        self._dlq = dead_letters
        self._own_dlq = dead_letters is None
        self._dlq_pending = 0
        self._consumer: Any = None
        self._tps: dict[int, Any] = {}
        self._end: dict[int, int] = {}
        self._paused: set[int] = set()
        self._merger = PartitionMerger([])
        self._start: dict[int, int] = {}
        self._last_progress = clock()
        self._check_after_s = kafka_config.request_timeout_ms / 1000
        self._outage_since: float | None = None
        self._stopped = False
        self._topic_id: str | None = None
        self._anchors: dict[int, Anchor] = {}  # first record read per partition (identity)
        self._recheck_identity = False  # verify the identity before decoding more records (after a stall)

    # ----------------------------------------------------------------- lifecycle
    def open(self, positions: Mapping[int, int] | None = None) -> "KafkaSource":
        """Assign the partitions, capture end offsets, seek to `positions` (default: beginning)."""
        from kafka import TopicPartition

        with TopicAdmin(self.kafka_config) as admin:
            existing, self._topic_id = admin.describe(self.topic)
        wanted = existing if self._wanted is None else self._wanted
        missing = sorted(set(wanted) - set(existing))
        if missing:
            raise KafkaError(f"topic {self.topic!r} has partitions {existing}, not {missing}")
        self._end = end_offsets(self.kafka_config, self.topic, wanted)
        self._tps = {p: TopicPartition(self.topic, p) for p in wanted}
        self._consumer = new_consumer(self.kafka_config, group_id=self.group_id, **_FETCH_SETTINGS)
        try:
            with self._errors("assigning partitions"):
                self._consumer.assign(list(self._tps.values()))
            self.seek(positions)
        except BaseException:
            self.close()
            raise
        log.info("source_opened", topic=self.topic, partitions=wanted, end_offsets=self._end,
                 until_end=self.until_end, positions=self._start)
        return self

    def seek(self, positions: Mapping[int, int] | None = None) -> None:
        """Reposition (drops anything buffered); positions outside [earliest, end] are refused."""
        with self._errors("seeking"):
            begins = self._consumer.beginning_offsets(list(self._tps.values()))
        start = {p: begins[tp] for p, tp in self._tps.items()}
        for p, offset in (positions or {}).items():
            if p not in self._tps:
                raise KafkaError(f"position given for partition {p}, which this source does not read")
            if not start[p] <= offset <= self._end[p]:
                raise KafkaError(
                    f"position {offset} of {self.topic}[{p}] is outside the available offsets "
                    f"[{start[p]}, {self._end[p]}]: the topic was recreated, the broker restarted "
                    "(the embedded broker keeps data in memory) or retention deleted the events")
            start[p] = offset
        self._start = start
        self._merger = PartitionMerger(self._tps)
        while self._batcher.flush() is not None:
            pass
        for p, tp in self._tps.items():
            self._consumer.seek(tp, start[p])
        self._resume(set(self._paused))
        self._update_finished()

    def close(self) -> None:
        """Flush dead letters, close the consumer (no commit: positions are the caller's)."""
        try:
            if self._dlq is not None and self._dlq_pending:
                self._dlq.flush()
        finally:
            if self._consumer is not None:
                self._consumer.close(autocommit=False)
                self._consumer = None
            if self._own_dlq and self._dlq is not None:
                self._dlq.close()

    def __enter__(self) -> "KafkaSource":
        return self.open() if self._consumer is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def stop(self) -> None:
        """Make `batches()` return after the current batch (e.g. from a signal handler)."""
        self._stopped = True

    # ------------------------------------------------------------------- reading
    @property
    def exhausted(self) -> bool:
        """until_end only: every partition reached its end and every event was yielded."""
        return (self.until_end and self._merger.buffered == 0 and len(self._batcher) == 0
                and all(self._merger.is_finished(p) for p in self._tps))

    def batches(self, timeout_s: float = 0.1) -> Iterator[EventBatch]:
        """Yield micro-batches until the end (until_end) or until `stop()`."""
        while not self._stopped and not self.exhausted:
            batch = self.poll_batch(timeout_s)
            if batch is not None:
                yield batch

    def poll_batch(self, timeout_s: float = 0.1) -> EventBatch | None:
        """One ready micro-batch, or None when nothing is due within about `timeout_s`."""
        if self._consumer is None:
            raise KafkaError("source is not open: call open() first")
        batch = self._ready_batch()
        if batch is not None or self.exhausted:
            return batch
        deadline = self._batcher.deadline()
        wait = timeout_s if deadline is None else max(0.0, min(timeout_s, deadline - self._clock()))
        if not all(self._merger.is_finished(p) for p in self._tps):
            self._fetch(wait)
        self._release()
        self._update_pauses()  # also after empty polls: a partition may have become idle
        return self._ready_batch()

    def _ready_batch(self) -> EventBatch | None:
        events = self._batcher.poll()
        if events is None and self.until_end and self._merger.buffered == 0 and \
                all(self._merger.is_finished(p) for p in self._tps):
            events = self._batcher.flush()
        if not events:
            return None
        self.stats.events += len(events)
        self.stats.batches += 1
        return events_to_batch(events)

    def _fetch(self, wait_s: float) -> None:
        with self._errors("polling"):
            records = self._consumer.poll(timeout_ms=max(1, int(wait_s * 1000)))
        now = self._clock()
        if records and self._recheck_identity:  # before a record of a possibly other topic is decoded
            self._verify_unchanged()
        for tp, batch in records.items():
            self._merger.push(tp.partition, self._decode(tp, batch), now)
        self._update_finished()  # also without records: positions can pass control records
        if records:
            self._last_progress = now
            self._outage_over(now)
        else:
            self._check_stalled()

    def _decode(self, tp: Any, records: list[Any]) -> list[Event]:
        """Decode one partition's records; stop at the captured end in until_end mode."""
        end = self._end[tp.partition] if self.until_end else None
        not_after = self._not_after()
        events = []
        for record in records:
            if end is not None and record.offset >= end:
                self._consumer.seek(tp, end)  # never read past the end captured at open
                break
            if tp.partition not in self._anchors:
                self._anchors[tp.partition] = record_anchor(record)
            decoded = decode_event(record.value, self.kafka_config.max_message_bytes, key=record.key,
                                   topic=self.topic, partition=tp.partition, offset=record.offset,
                                   ts_unit=self.kafka_config.timestamp_unit, not_after=not_after)
            if isinstance(decoded, PoisonMessage):
                self._dead_letter(decoded)
            else:
                events.append(decoded)
        return events

    def _not_after(self) -> int | None:
        """Latest accepted event time (topic unit): wall clock + future_skew_s; None = no limit."""
        return latest_timestamp(self.kafka_config.timestamp_unit, self.kafka_config.future_skew_s)

    def _dead_letter(self, poison: PoisonMessage) -> None:
        if self._dlq is None:
            self._dlq = KafkaDeadLetters(self.kafka_config)
        self._dlq.send(poison)
        self._dlq_pending += 1
        self.stats.poison += 1
        if self.stats.poison <= _POISON_LOG_LIMIT:
            log.warning("poison_message", kind=poison.kind, field=poison.field, reason=poison.reason,
                        topic=poison.topic, partition=poison.partition, offset=poison.offset)

    def _release(self) -> None:
        """Move events the merge may release into the batcher."""
        window = self.kafka_config.reorder_window
        merger = self._merger

        def force() -> bool:
            if self.until_end:
                return False
            oldest = merger.oldest_arrival()
            return merger.buffered > window or (oldest is not None and self._clock() - oldest >= self.max_delay_s)

        late, early = merger.late, merger.released_early
        events = merger.pop(force)
        self.stats.late += merger.late - late
        self.stats.released_early += merger.released_early - early
        if events:
            self._batcher.add(events)

    # ------------------------------------------------------------ flow control
    def _update_finished(self) -> None:
        if not self.until_end:
            return
        for p, tp in self._tps.items():
            if not self._merger.is_finished(p) and self._consumer.position(tp) >= self._end[p]:
                self._merger.finish(p)
                self._pause({p})

    def _lagging(self, p: int) -> bool:
        """Data for p is (probably) waiting at the broker; in until_end mode any unfinished p is."""
        if self.until_end:
            return True
        highwater = self._consumer.highwater(self._tps[p])
        return highwater is None or self._consumer.position(self._tps[p]) < highwater

    def _update_pauses(self) -> None:
        """Pause partitions with long queues while the merge waits for a lagging partition."""
        waiting = [p for p in self._merger.starving() if self._lagging(p)]
        cap = max(_MIN_PARTITION_CAP, self.kafka_config.reorder_window // max(1, len(self._tps)))
        want = {p for p in self._tps if self._merger.is_finished(p)}
        if waiting:
            want |= {p for p in self._tps if self._merger.queue_len(p) >= cap}
        self._pause(want - self._paused)
        self._resume(self._paused - want)

    def _pause(self, partitions: set[int]) -> None:
        if partitions:
            self._consumer.pause(*[self._tps[p] for p in partitions])
            self._paused |= partitions

    def _resume(self, partitions: set[int]) -> None:
        if partitions:
            self._consumer.resume(*[self._tps[p] for p in partitions])
            self._paused -= partitions

    def _check_stalled(self) -> None:
        """No records for a while: wait out a broker outage (up to outage_timeout_s, state kept),
        fail at once when a position is past the end (the topic was recreated)."""
        now = self._clock()
        if now - self._last_progress < self._check_after_s:
            return
        self._last_progress = now
        self._recheck_identity = True  # the broker may have restarted meanwhile, the topic been recreated
        if not tcp_reachable(self.kafka_config.bootstrap_servers, 1.0):
            self._note_outage(now)
            return
        self._outage_over(now)
        for p, tp in self._tps.items():
            highwater = self._consumer.highwater(tp)
            if highwater is not None and self._consumer.position(tp) > highwater:
                raise KafkaError(f"position {self._consumer.position(tp)} of {self.topic}[{p}] is beyond the end "
                                 f"({highwater}): the topic was recreated or the broker restarted")

    def _verify_unchanged(self) -> None:
        """The topic is still the one read so far (its id, the first record read per partition), checked
        as a restart checks a snapshot's: after a stall or an outage, a broker restarted without its data
        may hold a recreated topic of the same name, whose records at our old offsets are other events
        (kafka-python would even reset a position beyond its end to the beginning)."""
        with TopicAdmin(self.kafka_config) as admin:
            partitions, topic_id = admin.describe(self.topic)
        reason, _ = check_identity(self.kafka_config, self.topic, partitions, topic_id, self.identity())
        if reason is not None:
            raise KafkaError(f"topic {self.topic!r} changed while it was read ({reason}); nothing read from it "
                             "since was applied. A restart refuses the snapshots of the old topic too: "
                             "restart with --reset-state to start over on the new one")
        self._recheck_identity = False

    def _outage_over(self, now: float) -> None:
        if self._outage_since is not None:
            log.info("broker_reachable_again", bootstrap_servers=self.kafka_config.bootstrap_servers,
                     outage_s=round(now - self._outage_since, 1))
            self._outage_since, self._check_after_s = None, self.kafka_config.request_timeout_ms / 1000

    def _note_outage(self, now: float) -> None:
        """One warning per check, checks at growing intervals; KafkaError once outage_timeout_s passed."""
        limit = self.kafka_config.outage_timeout_s
        if self._outage_since is None:
            self._outage_since, self._check_after_s = now, 1.0
        elif now - self._outage_since >= limit:
            raise KafkaError(f"Kafka broker at {self.kafka_config.bootstrap_servers} unreachable for "
                             f"{now - self._outage_since:.0f} s (kafka.outage_timeout_s={limit:g}) while reading "
                             f"{self.topic!r}; resume from positions {self.positions(flush=False)}")
        else:
            self._check_after_s = min(2 * self._check_after_s, _OUTAGE_CHECK_MAX_S)
        log.warning("broker_unreachable", bootstrap_servers=self.kafka_config.bootstrap_servers,
                    seconds=round(now - self._outage_since, 1), gives_up_after_s=limit,
                    next_check_s=self._check_after_s)

    # --------------------------------------------------------------- positions
    def positions(self, flush: bool = True) -> dict[int, int]:
        """Next offset per partition after the last yielded event (flushes dead letters first)."""
        if flush and self._dlq is not None and self._dlq_pending:
            self._dlq.flush()
            self._dlq_pending = 0
        pending: dict[int, int] = {}
        for event in self._batcher.pending:
            pending.setdefault(event.partition, event.offset)
        out = {}
        for p, tp in self._tps.items():
            candidates = [self._consumer.position(tp), pending.get(p), self._merger.first_offset(p)]
            out[p] = min(c for c in candidates if c is not None)
        return out

    def lag(self) -> dict[int, int]:
        """Records between positions() and the fetch high watermark, per partition (monitoring).

        The high watermark is the one end offset that is right on Tansu and Apache Kafka alike;
        partitions without a fetch response yet are left out.
        """
        positions = self.positions(flush=False)
        out = {}
        for p, tp in self._tps.items():
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                out[p] = max(0, int(highwater) - positions[p])
        return out

    def last_batch_record_times_ms(self) -> np.ndarray | None:
        """Not tracked yet: the worker's event-to-update latency then stays empty for historical topics."""
        return None

    def commit(self, positions: Mapping[int, int] | None = None) -> None:
        """Commit positions to the consumer group (monitoring/lag only); no-op without group_id."""
        from kafka.structs import OffsetAndMetadata

        positions = self.positions() if positions is None else positions
        if self.group_id is None:
            return
        offsets = {self._tps[p]: OffsetAndMetadata(int(o), "", -1) for p, o in positions.items()}
        with self._errors("committing offsets"):  # bounded: a broker outage must not hang the caller
            self._consumer.commit(offsets, timeout_ms=self.kafka_config.request_timeout_ms)

    # ------------------------------------------------------------------ identity
    def identity(self) -> dict[str, Any]:
        """Topic id and per-partition anchors (connectors/kafka/identity.py), JSON-able, for snapshots."""
        return {"topic_id": self._topic_id,
                "anchors": {str(p): list(a) for p, a in sorted(self._anchors.items())}}

    def verify_identity(self, stored: Mapping[str, Any]) -> str | None:
        """Why the topic is not the one `stored` (an `identity()`) describes; None when it is or
        cannot tell. Call before open(); matching anchors are kept in later `identity()`s."""
        with TopicAdmin(self.kafka_config) as admin:
            partitions, self._topic_id = admin.describe(self.topic)
        if not stored:
            return None
        reason, kept = check_identity(self.kafka_config, self.topic, partitions, self._topic_id, stored)
        if reason is None:
            self._anchors = {**self._anchors, **kept}  # the stored (older) anchors win
        return reason

    def earliest_positions(self) -> dict[int, int]:
        """First offset still available per partition (above 0 once retention deleted records)."""
        return beginning_offsets(self.kafka_config, self.topic)

    def _errors(self, action: str) -> Any:
        return kafka_errors(f"{action} on topic {self.topic!r}", self.kafka_config.bootstrap_servers)


def read_topic_table(kafka_config: KafkaConfig, topic: str | None = None,
                     dead_letters: DeadLetterSink | None = None, batch_size: int = 8192) -> pa.Table:
    """The whole topic (up to its end at open) as the canonical event table, for training/evaluation.

    Poison messages are counted and logged, and kept in memory unless a sink is given (reading a
    topic for training should not append to the dead-letter topic every time). Events repeated by
    a resumed replay (same event_id and content) are dropped once, with a warning.
    """
    sink = dead_letters if dead_letters is not None else MemoryDeadLetters()
    columns: dict[str, list[np.ndarray]] = {name: [] for name in EVENT_SCHEMA.names}
    source = KafkaSource(kafka_config, topic, until_end=True, batch_size=batch_size, max_wait_s=1.0,
                         dead_letters=sink)
    with source:
        for batch in source.batches():
            for name, values in zip(EVENT_SCHEMA.names, (batch.user, batch.item, batch.timestamp, batch.event_id)):
                columns[name].append(values)
    if source.stats.poison:
        log.warning("poison_skipped", topic=source.topic, count=source.stats.poison)
    arrays = {name: (np.concatenate(parts) if parts
                     else np.array([], dtype=object if name in ("user", "item") else np.int64))
              for name, parts in columns.items()}
    table = pa.table({"user": pa.array(arrays["user"].tolist(), pa.string()),
                      "item": pa.array(arrays["item"].tolist(), pa.string()),
                      "timestamp": pa.array(arrays["timestamp"], pa.int64()),
                      "event_id": pa.array(arrays["event_id"], pa.int64())}, schema=EVENT_SCHEMA)
    return sort_events(_drop_repeats(table, source.topic))


def _drop_repeats(table: pa.Table, topic: str) -> pa.Table:
    """Drop exact repeats of an event_id (a resumed replay may write a few twice); conflicts are errors."""
    ids = table.column("event_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    repeated = np.flatnonzero(ids[order][1:] == ids[order][:-1]) + 1
    if not len(repeated):
        return table
    rows = table.to_pydict()
    for k in repeated:
        first, again = order[k - 1], order[k]
        if any(rows[c][first] != rows[c][again] for c in ("user", "item", "timestamp")):
            raise DatasetError(f"topic {topic!r} holds different events with event_id {ids[again]}: "
                               "two datasets replayed into one topic? recreate it")
    keep = np.ones(len(ids), dtype=bool)
    keep[order[repeated]] = False
    log.warning("repeated_events_dropped", topic=topic, count=int(len(repeated)))
    return table.filter(pa.array(keep))
